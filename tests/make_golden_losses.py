"""Record every tree config's golden losses into tests/golden_losses.json.

    python tests/make_golden_losses.py              # the reference records (on the reference CPU: see golden.py)
    python tests/make_golden_losses.py --this-cpu   # add this processor's records to `other_cpus`, nothing else

Per method: the config, iterations, seed, overrides, library versions, and every `train/*_loss` value logged
in the first iterations, as `float.hex` strings (bit-exact), with the iteration each value was logged at.
`tests/test_golden_losses.py` re-records them and asserts bit-equality.
"""

from __future__ import annotations

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
    env = environment()
    methods = {}
    for method, config in tree_configs().items():
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
    if "--this-cpu" in sys.argv[1:]:
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
