"""Record what every shipped asset samples (`tests/golden_samples.json`), before a refactor of samplers or
preconditioning, so `tests/test_golden_samples.py` can show the refactor leaves every array bit-identical.

    python tests/make_golden_samples.py              # the reference records (on the reference CPU: see golden.py)
    python tests/make_golden_samples.py --this-cpu   # add this processor's records to `other_cpus`, nothing else
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden_samples.json"
SEED, NUM = 0, 16
# NFE per asset: teachers at a few Heun/Euler budgets (and CFG where the teacher has labels), the student at 1.
CASES = {
    "edm_tree.pt": [(1, {}), (4, {}), (35, {}), (35, {"solver": "euler"}), (8, {"guidance_scale": 2.0})],
    "fm_tree.pt": [(1, {}), (4, {}), (35, {})],
    "edm_digits.pt": [(2, {}), (7, {}), (6, {"guidance_scale": 1.5})],
    "fm_digits.pt": [(2, {}), (7, {})],
    "dmd2_digits.pt": [(1, {})],
}


def draw(asset: str, nfe: int, options: dict) -> dict:
    from lit_fewstep.utils.checkpoint import load_module

    torch.set_num_threads(1)
    module = load_module(ROOT / "lit_fewstep" / "assets" / asset).eval()
    out = module.sample(NUM, nfe, generator=torch.Generator().manual_seed(SEED), **options)
    x = out.x.float().contiguous()
    return {"sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "nfe": out.nfe,
            "first": [float(v).hex() for v in x.flatten()[:4]]}


def key(asset: str, nfe: int, options: dict) -> str:
    return f"{asset} nfe={nfe} " + " ".join(f"{k}={v}" for k, v in sorted(options.items()))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    records = {key(a, n, o): draw(a, n, o) for a, cases in CASES.items() for n, o in cases}
    if "--this-cpu" in sys.argv[1:]:
        from lit_fewstep.utils.machine import cpu_name

        data = json.loads(OUT.read_text())
        data.setdefault("other_cpus", {})[cpu_name()] = {"about": {"torch": torch.__version__}, "samples": records}
        OUT.write_text(json.dumps(data, indent=1) + "\n")
        print(f"added {len(records)} records for {cpu_name()} to {OUT}")
        return
    OUT.write_text(json.dumps({"about": {"seed": SEED, "num": NUM, "torch": torch.__version__}, "samples": records},
                              indent=1) + "\n")
    print(f"wrote {len(records)} records to {OUT}")


if __name__ == "__main__":
    main()
