"""Consistency family on CPU: CD, CT, iCT, sCD, sCT on the tree toy and 8x8 digits, beside the EDM teacher.

    OMP_NUM_THREADS=1 python benchmarks/consistency.py --tree_steps 600 --digits_steps 150

For each data set: the shipped EDM teacher (lit_fewstep/assets/edm_<data>.pt) at 35 NFE (Heun), then every method
trained from its config (configs/<method>/<data>.yaml; curricula compressed to the run's length) and scored at
1, 2, 4, 8 NFE with `lit_fewstep.evaluation.Evaluator`; an sCD ablation without tangent normalization and without
tangent warm-up; the training-step time of sCD relative to CD (JVP cost). Writes benchmarks/results/consistency.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.evaluation import Evaluator  # noqa: E402
from lit_fewstep.methods.base import NonFiniteError  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402
from lit_fewstep.utils.config import instantiate  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

METHODS = ["cd", "ct", "ict", "scd", "sct"]
NFES = [1, 2, 4, 8]


class StepTimer(L.Callback):
    """Wall time of training steps after the first `skip` (warm-up) ones."""

    def __init__(self, skip: int = 5):
        self.skip, self.times, self._t = skip, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)

    @property
    def mean(self) -> float:
        return sum(self.times) / max(1, len(self.times))


def build(method: str, data: str, steps: int, **overrides):
    config = yaml.safe_load((ROOT / "configs" / method / f"{data}.yaml").read_text())
    init = config["model"]["init_args"]
    if "total_steps" in init:
        init["total_steps"] = steps  # compress the N(k) curriculum to this run
    if "warmup_steps" in init:
        init["warmup_steps"] = min(init["warmup_steps"], max(1, steps // 4))
    init.update(overrides)
    return instantiate(config["model"]), instantiate(config["data"])


def train(model, datamodule, steps: int):
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    start = time.perf_counter()
    status = "ok"
    try:
        trainer.fit(model, datamodule)
    except NonFiniteError as err:
        status = f"diverged: {str(err).split(' Stopped')[0]}"
    return time.perf_counter() - start, timer.mean, status


def score(module, evaluator, nfe: int, num: int, seed: int, **options) -> dict:
    generator = torch.Generator().manual_seed(seed)
    xs = []
    for begin in range(0, num, 1000):
        out = module.sample(min(1000, num - begin), nfe, generator=generator, **options)
        xs.append(out.x)
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        return {"nfe_spent": out.nfe, "nonfinite": True}
    return {"nfe_spent": out.nfe, **evaluator.score(x)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree_steps", type=int, default=600)
    parser.add_argument("--digits_steps", type=int, default=150)
    parser.add_argument("--num", type=int, default=3000, help="samples per (method, NFE) on the toy")
    parser.add_argument("--num_digits", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", nargs="+", default=["tree", "digits"])
    parser.add_argument("--ablation_data", nargs="*", default=["tree"], help="data sets that get the sCM ablation")
    parser.add_argument("--num_reference", type=int, default=3000, help="toy reference samples")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "consistency.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    results = {}
    for data in args.data:
        steps = args.tree_steps if data == "tree" else args.digits_steps
        num = args.num if data == "tree" else args.num_digits
        rows, timing = [], {}
        teacher = load_module(ROOT / "lit_fewstep" / "assets" / f"edm_{data}.pt")
        _, datamodule = build("cd", data, steps)
        evaluator = Evaluator(datamodule, num_reference=args.num_reference, seed=args.seed)
        rows.append({"method": "EDM teacher (Heun)", "nfe": 35, **score(teacher, evaluator, 35, num, args.seed)})
        print(rows[-1], flush=True)
        runs = [(m, m, {}) for m in METHODS] + ([
            ("scd", "sCD, no tangent normalization", {"tangent_norm": "none"}),
            ("scd", "sCD, no tangent warm-up", {"warmup_steps": 0}),
            ("scd", "sCD, neither", {"tangent_norm": "none", "warmup_steps": 0}),
        ] if data in args.ablation_data else [])
        for method, label, overrides in runs:
            L.seed_everything(args.seed)
            model, datamodule = build(method, data, steps, **overrides)
            wall, step_time, status = train(model, datamodule, steps)
            timing[label] = step_time
            print(f"{data} {label}: {steps} steps in {wall:.1f} s ({step_time * 1000:.1f} ms/step) {status}", flush=True)
            for nfe in NFES:
                row = {"method": label, "nfe": nfe, "train_steps": steps, "train_s": round(wall, 1),
                       "ms_per_step": round(step_time * 1000, 1), "status": status}
                row.update(score(model, evaluator, nfe, num, args.seed) if status == "ok" else {})
                rows.append(row)
                print(row, flush=True)
        results[data] = {"rows": rows, "timing": timing, "steps": steps, "num": num}
    total = time.perf_counter() - t_all
    write(results, args, total)


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write(results: dict, args, total: float) -> None:
    machine = describe_machine("CPU shared with other developers' jobs (timings are noisy)")
    lines = ["# Consistency family on CPU (CD, CT, iCT, sCD, sCT)", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/consistency.py --tree_steps {args.tree_steps} "
             f"--digits_steps {args.digits_steps} --num {args.num} --num_digits {args.num_digits} "
             f"--num_reference {args.num_reference} --seed {args.seed}`",
             f"Seed {args.seed}; machine: {machine}; total wall time {total / 60:.1f} min.", "",
             "Every method trains from its `configs/<method>/<data>.yaml` for the step count below (curricula N(k) "
             "compressed to the run, sCM tangent warm-up capped at a quarter of the run). CD starts from the "
             "teacher's weights (official setting); CT, iCT, sCT and sCD start from random weights. Samples use the "
             "sampling EMA and the default intermediate levels (`consistency_sigmas`: Karras grid with nfe + 1 points).",
             "Toy metrics against exact samples of the tree mixture: sliced W2 (sw2), MMD, NLL under the exact density; "
             "digits: FID and precision/recall in the shipped digits classifier's feature space.", ""]
    for data, res in results.items():
        lines += [f"## {data} ({res['steps']} training steps, {res['num']} samples per row)", ""]
        rows = res["rows"]
        keys = [k for k in rows[0] if k not in ("method", "nfe")]
        metric_keys = [k for k in ("sw2", "mmd", "nll", "fid", "precision", "recall", "nfe_spent") if k in keys]
        lines.append("| method | NFE | " + " | ".join(metric_keys) + " | train steps | ms/step | status |")
        lines.append("|---|---|" + "---|" * (len(metric_keys) + 3))
        for row in rows:
            cells = [row["method"], str(row["nfe"])] + [_fmt(row.get(k, "-")) for k in metric_keys]
            cells += [str(row.get("train_steps", "-")), _fmt(row.get("ms_per_step", "-")), row.get("status", "-")]
            lines.append("| " + " | ".join(cells) + " |")
        t = res["timing"]
        if t.get("cd") and t.get("scd"):
            lines += ["", f"Training-step time sCD / CD on {data}: {t['scd'] / t['cd']:.2f}x "
                          f"({t['scd'] * 1000:.1f} vs {t['cd'] * 1000:.1f} ms/step; CD = 2 teacher NFE (Heun) + student "
                          "forward/backward + target forward; sCD = 1 teacher NFE + student JVP + forward/backward). "
                          "Target <= 3x."]
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
