"""CTM on CPU beside CD from the same teacher, at one training budget (the issue's miniature claims).

    OMP_NUM_THREADS=1 python benchmarks/ctm.py --data tree --steps 600
    OMP_NUM_THREADS=1 python benchmarks/ctm.py --data digits --steps 150 --runs cd ctm ctm_features
    OMP_NUM_THREADS=1 python benchmarks/ctm.py --render        # rewrite the tables from the saved runs
    OMP_NUM_THREADS=1 python benchmarks/ctm.py --checkpoints runs/ctm_tree/version_0   # gamma = 0 along one long fit
    OMP_NUM_THREADS=1 python benchmarks/ctm.py --checkpoints runs/ctm_digits/version_0 --data digits

Every run trains from its config (`configs/cd/<data>.yaml`, `configs/ctm/<data>.yaml`, with the overrides named in
RUNS) for `--steps` iterations from seed `--seed` and is scored with `lit_fewstep.evaluation.Evaluator` (tree: sliced
W2, MMD, exact NLL against exact samples; digits: FID in the shipped classifier's feature space): CD with its
multistep sampler at 1/2/4/8 NFE, CTM with gamma = 0 (deterministic long jumps) and gamma = 1 (CM multistep) at
1/2/4/8 NFE and with Heun at 35 NFE on g(x, t, t); the teacher at 35 NFE (Heun). Each run's rows are saved in
benchmarks/results/ctm.json as soon as it ends (a later invocation adds runs; `--render` only rewrites ctm.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from consistency import build, score, train  # noqa: E402

from lit_fewstep.evaluation import Evaluator  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "ctm.md"
NFES = [1, 2, 4, 8]
# name -> (config method, label, overrides)
RUNS = {
    "cd": ("cd", "CD", {}),
    "ctm": ("ctm", "CTM (DSM + GAN)", {}),
    "ctm_no_dsm": ("ctm", "CTM without DSM (GAN on)", {"dsm_weight": 0}),
    "ctm_no_gan": ("ctm", "CTM without GAN (DSM on)", {"gan_start": None}),
    "ctm_features": ("ctm", "CTM, classifier-feature distance", {"distance": "features"}),
    "ctm_l2": ("ctm", "CTM, l2 distance", {"distance": "l2"}),
}


def rows_for(name: str, module, evaluator, num: int, seed: int) -> list[dict]:
    rows = []
    if name == "cd":
        samplers = [("multistep", nfe, {}) for nfe in NFES]
    else:
        samplers = ([("gamma=0", nfe, {"gamma": 0.0}) for nfe in NFES] + [("gamma=1", nfe, {"gamma": 1.0}) for nfe in NFES[1:]]
                    + [("Heun on g(x,t,t)", 35, {"solver": "heun"})])
    for sampler, nfe, options in samplers:
        rows.append({"sampler": sampler, "nfe": nfe, **score(module, evaluator, nfe, num, seed, **options)})
        print(name, rows[-1], flush=True)
    return rows


def iteration_of(path: Path) -> int:
    """Lightning's ``step=`` in a periodic checkpoint's file name (the order of the periodic checkpoints)."""
    return int(re.search(r"step=(\d+)", path.name).group(1))


def fit_checkpoints(run: Path) -> list[Path]:
    """The periodic checkpoints of one fit's version folder in training order, then its last.ckpt / model.pt."""
    files = sorted(run.glob("checkpoints/epoch=*-step=*.ckpt"), key=iteration_of)
    files += [path for path in (run / "checkpoints" / "last.ckpt", run / "model.pt") if path.exists()]
    if not files:
        raise SystemExit(f"--checkpoints: no checkpoints/*.ckpt or model.pt under {run}")
    return files


def along_the_fit(run: Path, data: str, seeds: list[int], num: int, tag: str | None = None) -> None:
    """Claim 2 over training time: every checkpoint of one fit, gamma = 0 at 1/2/4/8 NFE, medians over sampling
    seeds, with the leaderboard's evaluator; on the tree also why multi-step jumps lag: the spread of the samples
    (std per coordinate) against the teacher's 35-NFE Heun samples of the same sampling seed. The scores are the
    leaderboard's own (`leaderboard.score_model`: its sampler, seeds and samples)."""
    from leaderboard import evaluator_for, score_model

    evaluator = evaluator_for(data, 0)
    image = data != "tree"
    metrics = ("fid", "precision", "recall") if image else ("sw2", "nll", "mmd", "precision", "recall")
    primary = metrics[0]
    if not image:
        teacher = load_module(ROOT / "lit_fewstep" / "assets" / f"edm_{data}.pt").eval()
        reference = teacher.sample(num, 35, generator=torch.Generator().manual_seed(seeds[0])).x.std(0)
    # scores of the periodic checkpoints (immutable files) are kept beside the fit, so that scoring a fit while it
    # trains and again at its end scores every checkpoint once
    cache = run / f"along_the_fit_{data}_seeds{'-'.join(map(str, seeds))}_num{num}.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    rows = []
    for path in fit_checkpoints(run):
        if path.name in cached:
            rows += cached[path.name]
            continue
        module = load_module(path).eval()
        steps = int(module.iteration)  # training iterations (batches), saved with the module
        if any(r["iteration"] == steps for r in rows):
            continue  # the export of the last periodic checkpoint
        new_rows = []
        for nfe, scored in score_model(module, evaluator, NFES, seeds, num, {"gamma": 0.0}).items():
            new_rows.append({"iteration": steps, "nfe": nfe, **{k: scored[k] for k in metrics},
                             f"{primary}_per_seed": [round(v, 4) for v in scored[f"{primary}_per_seed"]]})
            if not image:
                spread = module.sample(num, nfe, generator=torch.Generator().manual_seed(seeds[0]),
                                       gamma=0.0).x.std(0)
                new_rows[-1]["spread_vs_teacher"] = [round(float(v), 3) for v in spread / reference]
        print(path.name, *new_rows, sep="\n", flush=True)
        rows += new_rows
        if path.name.startswith("epoch="):
            cached[path.name] = new_rows
            cache.write_text(json.dumps(cached, indent=1))
    command = (f"OMP_NUM_THREADS=1 python benchmarks/ctm.py --checkpoints {run} --data {data} --seeds "
               f"{' '.join(map(str, seeds))} --{'num_digits' if image else 'num'} {num}"
               + (f" --tag {tag}" if tag else ""))
    out = OUT.with_name(f"ctm_{data}_along_the_fit" + (f"_{tag}" if tag else ""))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": describe_machine(),
                                                    "config": (run / "config.yaml").read_text()
                                                    if (run / "config.yaml").exists() else None,
                                                    "rows": rows}, indent=1))
    header = ["iteration", "NFE", *metrics, f"{primary} per seed"] + ([] if image else ["spread (x, y)"])
    lines = [f"# CTM {data}: gamma = 0 sampling along one fit (generated by benchmarks/ctm.py)", "",
             f"Command: `{command}`  ", f"Machine: {describe_machine()}  ",
             f"{num} samples per score, medians over sampling seeds {seeds}; the leaderboard's evaluator"
             + (" and protocol." if image else " (10,000 exact reference samples). spread = std of the 1-/2-/4-/8-NFE "
                f"samples per coordinate over the teacher's (35-NFE Heun), sampling seed {seeds[0]}."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["iteration"], r["nfe"], *(f"{r[k]:.4g}" for k in metrics),
                 ", ".join(map(str, r[f"{primary}_per_seed"]))]
        if not image:
            cells.append(", ".join(map(str, r["spread_vs_teacher"])))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="tree", choices=["tree", "digits"])
    parser.add_argument("--steps", type=int, default=600, help="training iterations of every run")
    parser.add_argument("--runs", nargs="+", default=["cd", "ctm", "ctm_no_dsm", "ctm_no_gan"], choices=list(RUNS))
    parser.add_argument("--num", type=int, default=3000, help="samples per row (tree)")
    parser.add_argument("--num_digits", type=int, default=2000)
    parser.add_argument("--num_reference", type=int, default=3000, help="toy reference samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="only rewrite ctm.md from ctm.json")
    parser.add_argument("--timing", action="store_true",
                        help="only measure the training step against its network passes (benchmarks/timing.py) on "
                             "--data with the GAN on from the first iteration")
    parser.add_argument("--timing_steps", type=int, default=6)
    parser.add_argument("--timing_runs", type=int, default=3,
                        help="whole timing measurements (fresh model and fit each); the one of median ratio is kept")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="only score every checkpoint of this fit's version folder at gamma = 0 (--data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (--checkpoints)")
    parser.add_argument("--tag", default=None, help="--checkpoints: write ctm_<data>_along_the_fit_<tag>.md/.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoints is not None:
        num = args.num if args.data == "tree" else args.num_digits
        return along_the_fit(args.checkpoints, args.data, args.seeds, num, args.tag)
    store = OUT.with_suffix(".json")
    saved = json.loads(store.read_text()) if store.exists() else {}
    if args.timing:
        from timing import training_step_ratio
        measured = []
        for _ in range(args.timing_runs):  # one fit's ratio moves with the load of a shared CPU: take the median
            L.seed_everything(args.seed)
            model, datamodule = build("ctm", args.data, args.timing_steps, gan_start=0)
            measured.append(training_step_ratio(model, datamodule, steps=args.timing_steps, warmup=2, repeats=3,
                                                accelerator="cpu"))
        measured.sort(key=lambda r: r["ratio"])
        in_place = sorted(r["ratio_in_place"] for r in measured)
        result = dict(measured[len(measured) // 2], ratios=[round(r["ratio"], 3) for r in measured],
                      ratio_in_place=in_place[len(in_place) // 2], ratios_in_place=[round(r, 3) for r in in_place])
        result["command"] = (f"OMP_NUM_THREADS=1 python benchmarks/ctm.py --timing --data {args.data} "
                             f"--timing_steps {args.timing_steps} --timing_runs {args.timing_runs}")
        result["machine"] = describe_machine("CPU shared with other jobs")
        print(result, flush=True)
        saved.setdefault(args.data, {"runs": {}})["timing"] = result
        store.write_text(json.dumps(saved, indent=1, default=str))
    elif not args.render:
        data, num = args.data, (args.num if args.data == "tree" else args.num_digits)
        _, datamodule = build("cd", data, args.steps)
        evaluator = Evaluator(datamodule, num_reference=args.num_reference, seed=args.seed)
        command = (f"OMP_NUM_THREADS=1 python benchmarks/ctm.py --data {data} --steps {args.steps} --runs "
                   f"{' '.join(args.runs)} --num {args.num} --num_digits {args.num_digits} "
                   f"--num_reference {args.num_reference} --seed {args.seed}")
        entry = saved.setdefault(data, {"runs": {}})
        if "teacher" not in entry:
            teacher = load_module(ROOT / "lit_fewstep" / "assets" / f"edm_{data}.pt")
            entry["teacher"] = [{"sampler": "Heun", "nfe": 35, **score(teacher, evaluator, 35, num, args.seed)}]
            print("teacher", entry["teacher"], flush=True)
        for name in args.runs:
            method, label, overrides = RUNS[name]
            L.seed_everything(args.seed)
            gan = {"gan_start": args.steps // 2} if method == "ctm" else {}  # the GAN on for the second half
            model, datamodule = build(method, data, args.steps, **{**gan, **overrides})
            wall, step_time, status = train(model, datamodule, model.optimizer_steps_for(args.steps))
            print(f"{data} {name}: {args.steps} iterations in {wall:.1f} s ({step_time * 1000:.1f} ms/step) {status}",
                  flush=True)
            entry["runs"][name] = {"label": label, "overrides": overrides, "steps": args.steps, "train_s": round(wall, 1),
                                   "ms_per_step": round(step_time * 1000, 1), "status": status, "num": num,
                                   "command": command, "machine": describe_machine("CPU shared with other jobs"),
                                   "rows": rows_for(name, model, evaluator, num, args.seed) if status == "ok" else []}
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(saved, indent=1, default=str))
    write(saved)


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write(saved: dict) -> None:
    lines = ["# CTM on CPU beside CD (same teacher, same budget)", "",
             "Written by `benchmarks/ctm.py` (commands per run below). Every run trains from `configs/<method>/<data>.yaml` "
             "with the overrides named (CTM: the GAN switched on at half the run), at the same number of iterations and seed; CD and CTM both start from the "
             "shipped EDM teacher's weights (`lit_fewstep/assets/edm_<data>.pt`). Sampling EMA weights. Tree: sliced W2 "
             "(sw2), MMD and NLL under the exact density, against exact samples; digits: FID and precision/recall in "
             "the shipped digits classifier's feature space.", ""]
    for data, entry in saved.items():
        metric_keys = ["sw2", "mmd", "nll"] if data == "tree" else ["fid", "precision", "recall"]
        lines += [f"## {data}", "", "| model | sampler | NFE | " + " | ".join(metric_keys) + " | nfe spent | ms/step |",
                  "|---|---|---|" + "---|" * (len(metric_keys) + 2)]
        for row in entry.get("teacher", []):
            lines.append("| EDM teacher | Heun | 35 | " + " | ".join(_fmt(row.get(k, "-")) for k in metric_keys)
                         + f" | {row.get('nfe_spent')} | - |")
        for name, run in entry["runs"].items():
            for row in run["rows"]:
                lines.append(f"| {run['label']} | {row['sampler']} | {row['nfe']} | "
                             + " | ".join(_fmt(row.get(k, "-")) for k in metric_keys)
                             + f" | {row.get('nfe_spent')} | {run['ms_per_step']} |")
            if run["status"] != "ok":
                lines.append(f"| {run['label']} | - | - | {run['status']} |")
        t = entry.get("timing")
        if t:
            runs = (f"; the median of {len(t['ratios'])} whole measurements, whose ratios were "
                    f"{', '.join(f'{r:.2f}' for r in t['ratios'])}" if "ratios" in t else "")
            lines += ["", f"Training step vs its network passes (`benchmarks/timing.py` replay, GAN on, "
                          f"{t['steps']} measured steps{runs}): step {1e3 * t['step_s']:.0f} ms, passes alone "
                          f"{1e3 * t['floor_s']:.0f} ms, ratio {t['ratio']:.2f} (issue target <= 1.15)"
                          + (f"; in place (step time / time inside the networks' forwards and the autograd backwards "
                             f"of the same steps, median of {', '.join(f'{r:.2f}' for r in t['ratios_in_place'])}): "
                             f"**{t['ratio_in_place']:.2f}**" if "ratio_in_place" in t else "") + "; "
                          f"{t['calls_per_step']:g} network calls per step ({', '.join(t['passes'])}). "
                          f"`{t['command']}`; {t['machine']}."]
        lines += ["", "Runs (iterations, wall time, command, machine):", ""]
        for name, run in entry["runs"].items():
            lines.append(f"- {run['label']}: {run['steps']} iterations, {run['train_s']} s; `{run['command']}`; "
                         f"{run['machine']}")
        lines.append("")
    kept = OUT.read_text().split("\n## Observations", 1) if OUT.exists() else []
    tail = "\n## Observations" + kept[1] if len(kept) == 2 else ""  # hand-written, kept across rewrites
    OUT.write_text("\n".join(lines) + "\n" + tail)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
