"""How much of a class-conditional FID's spread over sampling seeds is the draw of the classes?

    OMP_NUM_THREADS=1 python benchmarks/class_labels.py                  # digits teacher, seeds 0-9, both draws
    OMP_NUM_THREADS=1 python benchmarks/class_labels.py --seeds 0 1 2 --num 2000

The shipped EDM digits teacher (35-NFE Heun, the leaderboard's reference row) is scored by the leaderboard's
evaluator at each sampling seed twice: with its classes drawn uniformly at random (the model's own default, and the
scoring before 2026-12-05) and with the classes in the reference set's proportions (`Evaluator.class_labels`, the
scoring since). Both use the same seeded sampling generator; the class counts' chi-square against the proportional
counts is listed beside the uniform draw's FID. Writes benchmarks/results/class_labels.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.leaderboard import TEACHER, evaluator_for  # noqa: E402
from benchmarks.run import exact_command, git_state, machine, write_atomically  # noqa: E402
from lit_fewstep.methods.sampling import draw  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--nfe", type=int, default=35)
    args = parser.parse_args()

    evaluator = evaluator_for("digits", 0)
    teacher = load_module(ROOT / TEACHER["digits"]).eval()
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name in ("uniform", "reference"):
            labels = evaluator.class_labels(teacher, args.num, seed, name)
            x, drawn, _, _ = draw(teacher, args.num, args.nfe, seed, labels, True, 1000, solver="heun")
            row[name] = evaluator.score(x)
            if name == "uniform":
                counts = torch.bincount(drawn, minlength=teacher.num_classes).double()
                proportional = evaluator.class_labels(teacher, args.num, seed)
                expected = torch.bincount(proportional, minlength=teacher.num_classes)
                row["chi2"] = float(((counts - expected) ** 2 / expected).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)

    def fids(name):
        return [r[name]["fid"] for r in rows]

    lines = ["# FID's spread over sampling seeds: uniform random classes vs the reference's proportions", "",
             f"`{exact_command()}`; {machine()}; git {git_state()}.", "",
             f"The shipped EDM digits teacher (`{TEACHER['digits']}`), Heun at {args.nfe} NFE, {args.num} samples "
             "per seed, FID on the shipped digits classifier's features against the training split (the "
             "leaderboard's evaluator). chi2: the uniform draw's class counts against the proportional counts.", "",
             "| seed | FID, uniform classes | chi2 of its class counts | FID, reference proportions |",
             "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['uniform']['fid']:.3f} | {r['chi2']:.1f} | {r['reference']['fid']:.3f} |"
              for r in rows]
    summary = {name: {"median": statistics.median(fids(name)), "min": min(fids(name)), "max": max(fids(name)),
                      "stdev": statistics.stdev(fids(name)) if len(rows) > 1 else 0.0}
               for name in ("uniform", "reference")}
    lines += ["", "| classes | median | min | max | standard deviation |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['stdev']:.3f} |"
              for name, s in summary.items()]
    if len(rows) > 2:
        chi2, uniform = [r["chi2"] for r in rows], fids("uniform")
        mc, mu = statistics.mean(chi2), statistics.mean(uniform)
        corr = sum((c - mc) * (u - mu) for c, u in zip(chi2, uniform)) / (
            (sum((c - mc) ** 2 for c in chi2) * sum((u - mu) ** 2 for u in uniform)) ** 0.5)
        summary["uniform"]["corr_chi2_fid"] = corr
        lines += ["", f"Correlation of the uniform draw's FID with its class counts' chi2 over the seeds: {corr:.2f}."]
    write_atomically(RESULTS / "class_labels.md", "\n".join(lines) + "\n")
    write_atomically(RESULTS / "class_labels.json", json.dumps({"command": exact_command(), "machine": machine(),
                                                                "rows": rows, "summary": summary}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
