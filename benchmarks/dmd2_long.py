"""A long one-step DMD2 distillation of the shipped digits teacher on CPU, tracked toward issue #4's target
(one-step FID within 1.10x of the teacher's 35-NFE FID).

    OMP_NUM_THREADS=1 python benchmarks/dmd2_long.py --iters 8000 --every 500 --set lr=3e-4 \
        --asset lit_fewstep/assets/dmd2_digits.pt

The student is `configs/dmd2/digits.yaml`'s model (its init_args, then `--set key=value` overrides), trained with
Lightning on one thread. Every `--every` iterations it is scored (FID on the shipped digits classifier's features,
2,000 one-step samples, seed 0) with the module's EMA, the raw weights and longer EMAs kept by this script
(0.99 and 0.998 per generator step). At the end every weight set and the teacher at 35 NFE (Heun) are scored with
`--seeds` sampling seeds, the same protocol for all, and the best weight set is exported to `--asset`. Results:
`--out` (markdown) and a JSON next to it; rows are appended as the run goes, so a stopped run still reports.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lit_fewstep.evaluation import Evaluator  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402
from lit_fewstep.utils.config import instantiate  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

CONFIG = ROOT / "configs" / "dmd2" / "digits.yaml"
EXTRA_EMAS = {"ema_0.99": 0.99, "ema_0.998": 0.998}  # per generator step


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


class WeightTracker(L.Callback):
    """Longer EMAs of the generator than the module's own, and periodic FID of every weight set."""

    def __init__(self, evaluator: Evaluator, every: int, num: int, generator_every: int, log):
        self.evaluator, self.every, self.num, self.progress_file = evaluator, every, num, log
        # Between generator steps the weights do not move, so a per-iteration EMA with decay d**(1/k) is the
        # per-generator-step EMA with decay d (k = iterations per generator step).
        self.decays = {k: d ** (1.0 / generator_every) for k, d in EXTRA_EMAS.items()}
        self.averages: dict[str, dict[str, torch.Tensor]] | None = None
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = pl_module.G.state_dict()
        if self.averages is None:
            self.averages = {k: {n: v.detach().clone() for n, v in weights.items()} for k in self.decays}
        for key, decay in self.decays.items():
            for n, v in weights.items():
                if v.dtype.is_floating_point:
                    self.averages[key][n].lerp_(v.detach(), 1.0 - decay)
        iteration = int(pl_module.iteration)
        if iteration % self.every == 0:
            row = {"iteration": iteration, "train_s": round(time.perf_counter() - self.start)}
            for key in self.weight_sets():
                row[key] = score(pl_module, self, key, self.evaluator, self.num, seed=0)["fid"]
            self.rows.append(row)
            print(json.dumps(row), file=self.progress_file, flush=True)

    def weight_sets(self):
        return ("ema", "raw", *self.decays)


@contextlib.contextmanager
def with_weights(model, tracker: WeightTracker, key: str):
    """The module's EMA slot holds weight set `key` inside the block (sample/export read the EMA); yields use_ema."""
    saved = {n: v.clone() for n, v in model.ema.state_dict().items()}
    if key in tracker.decays:
        model.ema.load_state_dict(tracker.averages[key])
    try:
        yield key != "raw"
    finally:
        model.ema.load_state_dict(saved)


@torch.no_grad()
def score(model, tracker, key, evaluator, num, seed) -> dict:
    with with_weights(model, tracker, key) as use_ema:
        return sample_and_score(model, 1, evaluator, num, seed, use_ema)


@torch.no_grad()
def sample_and_score(model, nfe: int, evaluator, num: int, seed: int, use_ema: bool = True) -> dict:
    """The protocol of every FID here: `num` samples from one `sample()` call seeded with `seed`."""
    out = model.sample(num, nfe, generator=torch.Generator().manual_seed(seed), use_ema=use_ema)
    return evaluator.score(out.x)


def rescore(args) -> None:
    """--rescore STUDENT: the exported student at 1 NFE and its teacher at 35 NFE over --seeds, no training."""
    evaluator = Evaluator(instantiate(yaml.safe_load(CONFIG.read_text())["data"]))
    student = load_module(args.rescore).eval()
    teacher = load_module(ROOT / student.teacher_ckpt).eval()
    rows = []
    for seed in args.seeds:
        row = {"seed": seed, "student_1nfe": sample_and_score(student, 1, evaluator, args.num, seed)["fid"],
               "teacher_35nfe": sample_and_score(teacher, 35, evaluator, args.num, seed)["fid"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("student_1nfe", "teacher_35nfe")}
    command = (f"OMP_NUM_THREADS=1 python benchmarks/dmd2_long.py --rescore {args.rescore} --num {args.num} "
               f"--seeds {' '.join(map(str, args.seeds))} --out {args.out}")
    lines = [f"# {args.rescore}: one-step student vs its teacher over {len(rows)} sampling seeds", "",
             f"Command: `{command}`", "", f"Machine: {describe_machine()}. FID on the shipped digits classifier's "
             f"features against the training split, {args.num:,} samples per score, one `sample()` call per seed.",
             "", "| seed | student, 1 NFE | teacher, 35 NFE (Heun) | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['student_1nfe']:.2f} | {r['teacher_35nfe']:.2f} | "
              f"{r['student_1nfe'] / r['teacher_35nfe']:.2f} |" for r in rows]
    lines.append(f"| **median** | **{med['student_1nfe']:.2f}** | **{med['teacher_35nfe']:.2f}** | "
                 f"**{med['student_1nfe'] / med['teacher_35nfe']:.2f}** |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "median": med}, indent=2))
    print(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=8000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--num", type=int, default=2000, help="samples per FID")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the final scores")
    parser.add_argument("--set", nargs="*", default=[], help="model init_args overrides, key=value")
    parser.add_argument("--asset", default=None, help="export the best weight set here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dmd2_digits_long.md"))
    parser.add_argument("--rescore", default=None, help="score an exported student and its teacher; no training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rescore:
        return rescore(args)

    config = yaml.safe_load(CONFIG.read_text())
    seed = int(config.get("seed_everything", 0))
    init_args = {**config["model"]["init_args"], **parse_overrides(args.set)}
    os.chdir(ROOT)  # the student records the config's relative teacher path, as `fit` from the repository root does
    teacher_path = init_args.pop("teacher_ckpt")
    L.seed_everything(seed, verbose=False)
    model = instantiate({"class_path": config["model"]["class_path"], "init_args": {"teacher_ckpt": teacher_path,
                                                                                    **init_args}})
    datamodule = instantiate(config["data"])
    evaluator = Evaluator(instantiate(config["data"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".progress.jsonl"), "w")
    tracker = WeightTracker(evaluator, args.every, args.num, model.phases[0].every, log)  # the generator phase
    steps = sum(p.repeats * sum(p.active(i) for i in range(args.iters)) for p in model.phases)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[tracker])
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    train_s = time.perf_counter() - start
    model.eval()

    final = {}
    for key in tracker.weight_sets():
        fids = [score(model, tracker, key, evaluator, args.num, s)["fid"] for s in args.seeds]
        final[key] = {"fid_per_seed": fids, "fid_median": statistics.median(fids)}
    teacher = load_module(teacher_path).eval()
    teacher_fids = [sample_and_score(teacher, 35, evaluator, args.num, s)["fid"] for s in args.seeds]
    teacher_median = statistics.median(teacher_fids)
    best = min(final, key=lambda k: final[k]["fid_median"])
    if args.asset:
        with with_weights(model, tracker, best):
            model.export(args.asset)
    command = ("OMP_NUM_THREADS=1 python benchmarks/dmd2_long.py " + " ".join(
        [f"--iters {args.iters}", f"--every {args.every}", f"--num {args.num}",
         "--seeds " + " ".join(map(str, args.seeds))] + (["--set " + " ".join(args.set)] if args.set else [])
        + ([f"--asset {args.asset}"] if args.asset else [])))
    result = {"command": command, "seed": seed, "num": args.num, "machine": describe_machine("CPU shared with other jobs"),
              "init_args": init_args, "iterations": int(model.iteration), "optimizer_steps": int(trainer.global_step),
              "train_s": train_s, "progress": tracker.rows, "final": final, "teacher_35nfe": teacher_fids,
              "teacher_median": teacher_median, "best": best, "asset": args.asset}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    print(out.read_text())


def write_report(r: dict, out: Path) -> None:
    keys = list(r["final"])
    lines = ["# DMD2 one-step digits student, long CPU run (issue #4 target)", "",
             f"Command: `{r['command']}`", "",
             f"Seed {r['seed']} (Lightning `seed_everything`); machine: {r['machine']}; {r['iterations']} iterations "
             f"({r['optimizer_steps']} optimizer steps) in {r['train_s'] / 60:.1f} min. Student settings: "
             f"`configs/dmd2/digits.yaml` with {json.dumps({k: v for k, v in r['init_args'].items()})}.", "",
             f"FID on the shipped digits classifier's features against the training split (1,618 images), {r['num']:,} "
             "samples per score. Weight sets: `ema` = the module's EMA (decay per generator step in the settings), "
             "`raw` = the generator's weights, `ema_0.99` / `ema_0.998` = longer EMAs kept by the script.", "",
             "## Final scores (same sampling seeds for every row)", "",
             "| model | NFE | FID per seed | median FID | ratio to teacher |", "|---|---|---|---|---|"]
    lines.append(f"| teacher (Heun) | 35 | {', '.join(f'{v:.2f}' for v in r['teacher_35nfe'])} | "
                 f"{r['teacher_median']:.2f} | 1.00 |")
    for k in keys:
        f = r["final"][k]
        lines.append(f"| student `{k}`{' (exported)' if k == r['best'] and r['asset'] else ''} | 1 | "
                     f"{', '.join(f'{v:.2f}' for v in f['fid_per_seed'])} | {f['fid_median']:.2f} | "
                     f"{f['fid_median'] / r['teacher_median']:.2f} |")
    lines += ["", "## Progress (sampling seed 0)", "", "| iteration | train s | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for row in r["progress"]:
        lines.append(f"| {row['iteration']} | {row['train_s']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
