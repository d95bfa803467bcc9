"""Record every tree config's golden losses into tests/golden_losses.json.

    python tests/make_golden_losses.py              # the reference records (on the reference CPU: see golden.py)
    python tests/make_golden_losses.py --this-cpu   # add this processor's records to `other_cpus`, nothing else
    python tests/make_golden_losses.py --only dmd2 msd --why "..."   # re-record these methods' reference records

`--only` is for a change meant to move some methods' losses (e.g. the same math in another float order): their
reference records are replaced, the reason is kept in the file's `updates`, and their records made on other
processors are dropped (they cannot be re-made here), so there they are compared within the cross-CPU tolerance
until `--this-cpu` is run on that processor again.

Per method: the config, iterations, seed, overrides, library versions, and every `train/*_loss` value logged
in the first iterations, as `float.hex` strings (bit-exact), with the iteration each value was logged at.
`tests/test_golden_losses.py` re-records them and asserts bit-equality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning  # noqa: E402
import torch  # noqa: E402

from golden import ITERATIONS, SEED, record, tree_configs  # noqa: E402
from lit_fewstep.utils.machine import cpu_name  # noqa: E402

OUT = Path(__file__).resolve().parent / "golden_losses.json"


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--this-cpu", action="store_true", help="add this processor's records to other_cpus")
    parser.add_argument("--only", nargs="+", choices=sorted(tree_configs()), help="re-record these methods")
    parser.add_argument("--why", help="why the --only methods' losses moved (kept in the file's updates)")
    args = parser.parse_args()
    if args.only and not args.why:
        parser.error("--only: say why these methods' losses moved (--why \"...\"); it is kept in the file.")
    env = environment()
    methods = {}
    for method, config in tree_configs().items():
        if args.only and method not in args.only:
            continue
        rec = record(config, ITERATIONS, SEED)
        methods[method] = {
            "config": rec.config,
            "iterations": rec.iterations,
            "seed": rec.seed,
            "overrides": rec.overrides,
            "torch": env["torch"],
            "losses": {name: [v.hex() for v in values] for name, values in rec.losses.items()},
            "loss_iterations": rec.loss_iterations,
        }
        print(f"{method}: " + ", ".join(f"{name} x{len(v)}" for name, v in rec.losses.items()), file=sys.stderr)
    if args.only:
        data = json.loads(OUT.read_text())
        if data["environment"] != env:
            raise SystemExit(f"--only: the reference records were made in {data['environment']}, this is {env}; "
                             "re-record every method instead.")
        data["methods"].update(methods)
        for other in data.get("other_cpus", {}).values():
            for method in methods:
                other["methods"].pop(method, None)
        data.setdefault("updates", []).append({"methods": sorted(methods), "why": args.why})
        return _write(data)
    if args.this_cpu:
        data = json.loads(OUT.read_text())
        data.setdefault("other_cpus", {})[cpu_name()] = {
            "environment": env, "methods": {m: {"losses": r["losses"]} for m, r in methods.items()}}
        return _write(data)
    data = {
        "about": "Per-phase (and component) losses logged as train/*_loss in the first iterations of every "
                 "configs/<method>/tree.yaml on CPU, 1 thread, seed 0, recorded before the core refactor by "
                 "tests/make_golden_losses.py; values are float.hex strings (float.fromhex reads them back "
                 "exactly); loss_iterations gives the module's iteration counter at each value.",
        "environment": env,
        "methods": methods,
    }
    return _write(data)


def _write(data: dict) -> Path:
    text = json.dumps(data, indent=1)
    # one line per list of values
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == data
    OUT.write_text(text + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return OUT


if __name__ == "__main__":
    main()
