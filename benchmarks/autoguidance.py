"""Autoguidance vs classifier-free guidance on the tree toy (Karras et al. 2024, Fig. 1 in miniature).

The main model is the shipped class-conditional EDM tree teacher (`configs/edm/tree.yaml`); the guide is the same
network trained for 1/8 of the iterations (`configs/autoguidance/tree_guide.yaml`, trained here unless --guide is
given; a half-width guide of the same budget did less well here: 16.7% outliers at best against 13.2%); CFG uses the main model's own null label (label dropout 0.1). For each guidance scale w we
draw class-conditional samples (35-NFE Heun) and measure against the exact distribution of that class:

- energy distance to exact samples (how far the whole distribution moved);
- outlier rate: the fraction of samples outside the region holding 99% of the true class's mass (exact density
  below the 1% quantile of exact samples' densities).

Guidance of either kind trades spread for fewer outliers; the paper's claim is that autoguidance does so while
staying close to the true distribution, and CFG does not. We compare at equal or lower outlier rate: for each CFG
point, the autoguidance point of lowest energy distance among those with no more outliers, and their ratio. (On
this toy CFG never lowers the outlier rate below the unguided model's, so an exact match of outlier rates between the
two sweeps does not exist; "no more outliers" is the fair side of that comparison for CFG.)

    OMP_NUM_THREADS=1 python benchmarks/autoguidance.py [--guide PATH] [--num 4000] [--seed 0]

`--data digits`: the shipped digits teacher guided by `--guide` or a guide trained from `--guide_config` (default
`configs/autoguidance/digits_guide.yaml`; `digits_guide_small.yaml` is the paper's kind, smaller and shorter-trained);
FID (shipped digits classifier features) of no guidance, CFG and autoguidance over the sweep, median over `--seeds`.

    OMP_NUM_THREADS=1 python benchmarks/autoguidance.py --data digits [--guide PATH | --guide_config YAML] \\
        [--num 5000] [--seeds 0 1 2] [--scales 1.1 1.25 1.5] [--cfg_scales 1.05 1.1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.data.toy import tree  # noqa: E402
from lit_fewstep.metrics.distribution import energy_distance  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

MAIN = ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"
GUIDE_CONFIG = "configs/autoguidance/tree_guide.yaml"
SCALES = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0]
OUTLIER_MASS = 0.01


def train_guide(root: Path, config: str = GUIDE_CONFIG) -> Path:
    run = root / "guide_run"
    subprocess.run([sys.executable, "-m", "lit_fewstep", "fit", "--config", config,
                    "--trainer.logger.init_args.save_dir", str(run), "--trainer.enable_progress_bar", "false"],
                   cwd=ROOT, check=True)
    return max(run.rglob("model.pt"), key=lambda path: path.stat().st_mtime)  # this fit's, not an older one's


def score(x: torch.Tensor, labels: torch.Tensor, dist, exact: torch.Tensor, threshold: float) -> dict:
    log_p = dist.log_prob(x.double(), class_labels=labels)
    return {"energy_distance": float(energy_distance(x, exact)), "outlier_rate": float((log_p < threshold).double().mean())}


def best_at_most(rows: list[dict], outlier_rate: float) -> dict | None:
    """The row of lowest energy distance among those with at most `outlier_rate` outliers."""
    return min((r for r in rows if r["outlier_rate"] <= outlier_rate), key=lambda r: r["energy_distance"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guide", default=None, help="guide checkpoint (default: train tree_guide.yaml)")
    parser.add_argument("--num", type=int, default=4000, help="samples per class per point")
    parser.add_argument("--nfe", type=int, default=35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default benchmarks/results/autoguidance[_digits].md")
    parser.add_argument("--data", choices=["tree", "digits"], default="tree")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="digits: the guidance scales swept")
    parser.add_argument("--cfg_scales", type=float, nargs="+", default=None, help="digits: CFG's scales (default --scales)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="digits: sampling seeds (median; default --seed)")
    parser.add_argument("--resume", action="store_true", help="digits: reuse the rows already in --out's JSON")
    parser.add_argument("--main", default=None,
                        help=f"digits: the main model (default the shipped {DIGITS_MAIN})")
    parser.add_argument("--guide_config", default=None, help=f"digits: the guide's config (default {DIGITS_GUIDE_CONFIG})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data == "digits":
        return digits(args)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "autoguidance.md")
    start = time.time()
    work = ROOT / "runs" / "benchmark_autoguidance"
    guide_path = Path(args.guide) if args.guide else train_guide(work)
    main_model, guide = load_module(MAIN).eval(), load_module(guide_path).eval()
    dist = tree()
    rows, samples = [], {}
    g = torch.Generator().manual_seed(args.seed)
    exact, thresholds = {}, {}
    for c in (0, 1):
        # exact reference samples of class c, and its 99%-mass density level
        xs, ys = dist.sample(200_000, generator=g)
        x_c = xs[ys == c][: 50_000].float()
        thresholds[c] = float(torch.quantile(dist.log_prob(x_c.double(), class_labels=torch.full((len(x_c),), c)),
                                             OUTLIER_MASS))
        exact[c] = x_c[: args.num]
    for kind in ("none", "cfg", "autoguidance"):
        for scale in ([1.0] if kind == "none" else SCALES[1:]):
            per_class = []
            for c in (0, 1):
                labels = torch.full((args.num,), c, dtype=torch.long)
                options = {"guidance_scale": scale}
                if kind == "autoguidance":
                    options["guide"] = guide
                out = main_model.sample(args.num, args.nfe, class_labels=labels,
                                        generator=torch.Generator().manual_seed(args.seed + 10 + c), **options)
                per_class.append(score(out.x, labels, dist, exact[c], thresholds[c]))
                samples[(kind, scale, c)] = out.x
            row = {"guidance": kind, "scale": scale, "nfe": out.nfe,
                   "energy_distance": float(np.mean([p["energy_distance"] for p in per_class])),
                   "outlier_rate": float(np.mean([p["outlier_rate"] for p in per_class]))}
            rows.append(row)
            print(row, flush=True)
    auto_rows = [r for r in rows if r["guidance"] == "autoguidance"]
    for r in rows:
        if r["guidance"] == "cfg":
            auto = best_at_most(auto_rows, r["outlier_rate"])
            r["best_autoguidance_with_no_more_outliers"] = None if auto is None else auto["scale"]
            r["ratio_cfg_over_auto"] = None if auto is None else r["energy_distance"] / auto["energy_distance"]
    figure = Path(args.out).with_suffix(".png")
    plot(samples, exact, rows, figure)
    write(rows, args, guide_path, time.time() - start, figure)


def plot(samples, exact, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # autoguidance at its fewest outliers, CFG at the outlier rate closest to it
    auto = min((r for r in rows if r["guidance"] == "autoguidance"), key=lambda r: r["outlier_rate"])
    cfg = min((r for r in rows if r["guidance"] == "cfg"), key=lambda r: abs(r["outlier_rate"] - auto["outlier_rate"]))
    panels = [("exact", None), ("no guidance", ("none", 1.0)), (f"CFG w={cfg['scale']}", ("cfg", cfg["scale"])),
              (f"autoguidance w={auto['scale']}", ("autoguidance", auto["scale"]))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharex=True, sharey=True)
    for ax, (title, key) in zip(axes, panels):
        for c, color in ((0, "tab:blue"), (1, "tab:orange")):
            x = exact[c] if key is None else samples[(key[0], key[1], c)]
            ax.scatter(x[:, 0], x[:, 1], s=0.4, alpha=0.5, color=color)
        ax.set_title(title)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(rows, args, guide_path, seconds, figure) -> None:
    out = Path(args.out)
    lines = ["# Autoguidance vs CFG on the tree toy", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/autoguidance.py"
             f"{' --guide ' + str(args.guide) if args.guide else ''} --num {args.num} --seed {args.seed}`  ",
             f"Machine: {describe_machine()}; {seconds / 60:.1f} min including training the guide.  ",
             f"Main model: `lit_fewstep/assets/edm_tree.pt` (configs/edm/tree.yaml). Guide: `{GUIDE_CONFIG}` "
             f"(the same MLP 128 x 3 trained for 500 iterations, 1/8 of the main model's). CFG: the main model's null label.  ",
             f"Class-conditional samples, {args.num} per class, {args.nfe}-NFE Heun (guided: twice the evaluations); "
             f"metrics averaged over the two classes against the exact class-conditional distribution. Outlier: "
             f"exact density below the level that holds {100 * (1 - OUTLIER_MASS):.0f}% of the class's mass.", "",
             "| guidance | w | NFE | energy distance | outlier rate | best autoguidance w with no more outliers | "
             "CFG / autoguidance energy distance |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        auto = r.get("best_autoguidance_with_no_more_outliers")
        ratio = r.get("ratio_cfg_over_auto")
        lines.append(f"| {r['guidance']} | {r['scale']} | {r['nfe']} | {r['energy_distance']:.5f} | "
                     f"{r['outlier_rate']:.4f} | {'' if auto is None else auto} | "
                     f"{'' if ratio is None else f'{ratio:.1f}x'} |")
    lines += ["", f"![truth, no guidance, CFG, autoguidance]({figure.name})", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": describe_machine(), "seed": args.seed,
                                                     "num": args.num, "guide": str(guide_path)}, indent=1))
    print("\n".join(lines))



DIGITS_SCALES = [1.25, 1.5, 2.0, 3.0]
DIGITS_GUIDE_CONFIG = "configs/autoguidance/digits_guide.yaml"
DIGITS_MAIN = "lit_fewstep/assets/edm_digits.pt"  # the shipped teacher, unless --main


def describe_net(module) -> str:
    net = module.init_config["init_args"]["net"]["init_args"]
    return f"UNet {net['model_channels']} channels, {int(module.iteration)} iterations"


def digits(args) -> None:
    """FID of no guidance, CFG and autoguidance over the scale sweep; each point is the median over the sampling
    seeds (--seeds), every seed drawing the same noise and labels for every kind and scale."""
    import statistics

    from lit_fewstep.evaluation import Evaluator
    from lit_fewstep.methods.sampling import draw

    start = time.time()
    out = Path(args.out or ROOT / "benchmarks" / "results" / "autoguidance_digits.md")
    config = args.guide_config or DIGITS_GUIDE_CONFIG
    seeds = args.seeds or [args.seed]
    guide_path = Path(args.guide) if args.guide else train_guide(ROOT / "runs" / "benchmark_autoguidance_digits", config)
    teacher = load_module(Path(args.main) if args.main else ROOT / DIGITS_MAIN).eval()
    guide = load_module(guide_path).eval()
    evaluator = Evaluator(teacher_data(teacher))
    rows = []
    sweep = args.scales or DIGITS_SCALES
    # autoguidance before CFG: a run stopped early (CPU time) has the method under test
    kinds = [("none", [1.0]), ("autoguidance", sweep), ("cfg", args.cfg_scales or sweep)]
    total = sum(len(scales) for _, scales in kinds)
    done = finished_rows(out, args, seeds, guide_path) if args.resume else {}
    for kind, scales in kinds:
        for scale in scales:
            if (kind, scale) in done:
                row = done[(kind, scale)]
            else:
                options = {"guidance_scale": scale, **({"guide": guide} if kind == "autoguidance" else {})}
                per_seed = {}
                for seed in seeds:
                    x, _, nfe, _ = draw(teacher, args.num, args.nfe, seed, None, True, 1000, **options)
                    per_seed[seed] = evaluator.score(x)["fid"]
                row = {"guidance": kind, "scale": scale, "nfe": nfe, "fid": statistics.median(per_seed.values()),
                       "fid_per_seed": per_seed}
            rows.append(row)
            print(row, flush=True)
            # the report is rewritten after every row: a run stopped early leaves the rows it finished
            write_digits(rows, total, args, seeds, config, guide_path, teacher, guide, time.time() - start, out)
    print(out.read_text())


def finished_rows(out: Path, args, seeds, guide_path) -> dict:
    """--resume: the rows of an earlier run of the same settings (its JSON at `out`), by (guidance, scale)."""
    path = out.with_suffix(".json")
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if (old.get("num"), old.get("seeds"), old.get("guide")) != (args.num, seeds, str(guide_path)):
        raise ValueError(f"--resume: {path} holds another run (num, seeds, guide = {old.get('num')}, "
                         f"{old.get('seeds')}, {old.get('guide')}); pass --out elsewhere or drop --resume.")
    rows = {}
    for row in old["rows"]:
        row["fid_per_seed"] = {int(k): v for k, v in row["fid_per_seed"].items()}
        rows[(row["guidance"], row["scale"])] = row
    return rows


def write_digits(rows, total, args, seeds, config, guide_path, teacher, guide, seconds, out: Path) -> None:
    kinds = list(dict.fromkeys(r["guidance"] for r in rows))
    best = {kind: min((r for r in rows if r["guidance"] == kind), key=lambda r: r["fid"]) for kind in kinds}
    command = (f"OMP_NUM_THREADS=1 python benchmarks/autoguidance.py --data digits"
               f"{' --guide ' + str(args.guide) if args.guide else ''}"
               f"{' --guide_config ' + config if args.guide_config else ''}{' --main ' + args.main if args.main else ''}"
               f" --num {args.num} --seeds "
               f"{' '.join(map(str, seeds))}{' --scales ' + ' '.join(map(str, args.scales)) if args.scales else ''}"
               f"{' --cfg_scales ' + ' '.join(map(str, args.cfg_scales)) if args.cfg_scales else ''}"
               f"{' --resume' if args.resume else ''}")
    guide_file = guide_path.relative_to(ROOT) if guide_path.is_relative_to(ROOT) else guide_path
    lines = ["# Autoguidance vs CFG on 8x8 digits", "",
             f"Command: `{command}`  ",
             f"Machine: {describe_machine()}; {seconds / 60:.1f} min"
             f"{' including training the guide' if not args.guide else ' (guide trained before)'}"
             f"{'' if len(rows) == total else f'; partial: {len(rows)} of the {total} rows'}.  ",
             f"Main model: `{args.main or DIGITS_MAIN}` ({describe_net(teacher)}). Guide: `{config}` "
             f"({describe_net(guide)}; `{guide_file}`). FID on the shipped digits classifier's features against the "
             f"training split, {args.num} samples per score, {args.nfe}-NFE Heun (guided: twice the evaluations); "
             f"median over sampling seeds {seeds} (each seed: the same noise and labels for every row).", "",
             "| guidance | w | NFE | FID (median) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    lines += [f"| {r['guidance']} | {r['scale']} | {r['nfe']} | {r['fid']:.3f} | "
              + " | ".join(f"{r['fid_per_seed'][s]:.3f}" for s in seeds) + " |" for r in rows]
    lines += ["", "Best of each (median): " + ", ".join(f"{k} {v['fid']:.3f} (w={v['scale']})" for k, v in best.items()),
              ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": describe_machine(), "seeds": seeds,
                                                     "num": args.num, "guide": str(guide_path), "guide_config": config,
                                                     "command": command, "complete": len(rows) == total}, indent=1))


def teacher_data(module):
    from lit_fewstep.utils.config import instantiate
    from lightning.pytorch import LightningDataModule

    return instantiate(module.data_config, base=LightningDataModule)

if __name__ == "__main__":
    main()
