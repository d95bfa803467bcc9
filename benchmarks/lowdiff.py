"""LowDiff vs a single-resolution model on 16x16 digits: FID against images/s, side by side in one run.

Two models of the same UNet (same widths, the cascade's net has one more input channel and a 2-row resolution
embedding) are trained for the same iterations and batch size on class-conditional 16x16 digits:

- the baseline, `EDMDiffusion` at 16x16, sampled with Heun, Euler, DPM-Solver++(2M) and UniPC at several NFE;
- `LowDiff` over 8x8 -> 16x16, sampled with (K_8, K_16) evaluations per level (Heun, DPM-Solver++(2M) or UniPC at
  8x8, Euler at 16x16).

The baseline also gets DPM-Solver++(2M) and UniPC, the best training-free solvers of the leaderboard at a few steps,
so that the cascade is compared with the fastest way to sample the single-resolution model. Every setting draws the
same class-conditional samples per sampling seed (class labels in the train split's proportions, as every score of
the package; batches of 250, one thread) and is timed batch by batch (images/s: the median over all batches); FID
(the median over the sampling seeds) uses the shipped digits classifier's features against the digits' train split at
16x16. The claim is read at matched FID from both sides: for each cascade setting, the fastest baseline setting
with an FID no worse than it (`match`), and for each setting of the baseline's FID / images/s frontier, the fastest
cascade setting with an FID no worse (`frontier`, the verdict's reading); each with the ratio of their images/s.

    OMP_NUM_THREADS=1 python benchmarks/lowdiff.py [--iterations 2000] [--num 2000] [--sample_seeds 0 1 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.cli import FewStepTrainer  # noqa: E402
from lit_fewstep.data.cascade import CascadeDataModule  # noqa: E402
from lit_fewstep.evaluation import proportional_labels  # noqa: E402
from lit_fewstep.methods import EDMDiffusion, LowDiff  # noqa: E402
from lit_fewstep.metrics.features import load_digits_features  # noqa: E402
from lit_fewstep.metrics.fid import frechet_distance, gaussian_stats  # noqa: E402
from lit_fewstep.nets import UNet  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402
from benchmarks.run import load  # noqa: E402

# the baseline with Heun (EDM's sampler), Euler (better than Heun at a handful of steps) and the multistep solvers
BASELINE = [("heun", 7), ("heun", 9), ("heun", 13), ("heun", 19), ("heun", 27), ("heun", 35),
            ("euler", 3), ("euler", 5), ("euler", 7), ("euler", 9), ("euler", 13), ("euler", 17),
            ("dpmpp_2m", 2), ("dpmpp_2m", 3), ("dpmpp_2m", 4), ("dpmpp_2m", 5), ("dpmpp_2m", 7), ("dpmpp_2m", 9),
            ("dpmpp_2m", 13),
            ("unipc", 3), ("unipc", 4), ("unipc", 5), ("unipc", 7), ("unipc", 9)]
# (8x8 solver, evaluations at 8x8, at 16x16); Euler at 16x16. UniPC at 8x8 fills the gap between 3 + 1 and 4 + 1
CASCADE = [("heun", 5, 1), ("heun", 7, 2), ("heun", 9, 2), ("heun", 11, 2), ("heun", 11, 3), ("heun", 13, 2),
           ("heun", 13, 3), ("heun", 15, 3), ("heun", 19, 3), ("heun", 25, 3), ("heun", 25, 5), ("heun", 35, 5),
           ("dpmpp_2m", 2, 1), ("dpmpp_2m", 3, 1), ("dpmpp_2m", 4, 1), ("dpmpp_2m", 3, 2), ("dpmpp_2m", 4, 2),
           ("dpmpp_2m", 5, 2), ("dpmpp_2m", 7, 2), ("dpmpp_2m", 7, 3), ("dpmpp_2m", 9, 3),
           ("dpmpp_2m", 13, 3), ("unipc", 3, 1), ("unipc", 4, 1), ("unipc", 3, 2)]
BATCH = 250
MODELS_REL = "benchmarks/runs/lowdiff"
MODELS = ROOT / MODELS_REL


def unet(cascade: bool, channels: int) -> UNet:
    return UNet(img_resolution=16, resolutions=[8, 16] if cascade else None, in_channels=1,
                extra_channels=1 if cascade else 0, model_channels=channels, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[], num_classes=10)


def train(module, args, root: Path) -> float:
    L.seed_everything(args.seed, verbose=False)
    data = CascadeDataModule("digits", resolutions=[8, 16], batch_size=args.batch_size, seed=args.seed)
    trainer = FewStepTrainer(accelerator="cpu", devices=1, max_steps=args.iterations, max_epochs=-1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root), num_sanity_val_steps=0, limit_val_batches=0)
    start = time.time()
    trainer.fit(module, data)
    return time.time() - start


def draw(module, nfe: int, labels: torch.Tensor, seed: int, **options) -> tuple[torch.Tensor, list[float], int]:
    """One sample per class label, in batches of BATCH; images/s of each batch."""
    g = torch.Generator().manual_seed(seed)
    xs, rates, spent = [], [], 0
    for begin in range(0, len(labels), BATCH):
        n = min(BATCH, len(labels) - begin)
        start = time.perf_counter()
        out = module.sample(n, nfe, class_labels=labels[begin:begin + n], generator=g, **options)
        rates.append(n / (time.perf_counter() - start))
        xs.append(out.x.clamp(-1, 1))
        spent = out.nfe
    return torch.cat(xs), rates, spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--num", type=int, default=2000, help="samples per setting and sampling seed")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--sample_seeds", type=int, nargs="+", default=[0, 1, 2], help="FID: the median over these")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lowdiff"))
    p.add_argument("--rewrite", action="store_true", help="rewrite the .md/.png from the .json of an earlier run")
    p.add_argument("--reuse", action="store_true",
                   help=f"sample the models an earlier run with the same training arguments exported to {MODELS_REL}")
    args = p.parse_args()
    if args.rewrite:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        run_args = argparse.Namespace(**saved["args"])
        write(saved["rows"], match(saved["rows"]), saved["train_seconds"], run_args, saved["seconds"], Path(args.out),
              saved["machine"])
        return
    torch.set_num_threads(1)
    begin = time.time()
    features = load_digits_features()
    real, real_labels = CascadeDataModule("digits", resolutions=[8, 16]).reference_samples(10_000, split="train")
    mu_r, sigma_r = gaussian_stats(features(real).double())

    def fid(x):
        mu, sigma = gaussian_stats(torch.cat([features(x[i:i + 500]) for i in range(0, len(x), 500)]).double())
        return float(frechet_distance(mu, sigma, mu_r, sigma_r))

    models, train_s = {}, {}
    saved = json.loads(Path(args.out).with_suffix(".json").read_text()) if args.reuse else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "lowdiff"):
            export = MODELS / f"{name}_{args.iterations}it_b{args.batch_size}_c{args.channels}_seed{args.seed}.pt"
            if args.reuse and export.exists():  # its fit time as the run that trained it measured
                models[name], train_s[name] = load(export), saved["train_seconds"][name]
                print(f"{name}: reused {export.relative_to(ROOT)}", flush=True)
                continue
            torch.manual_seed(args.seed)
            net = unet(name == "lowdiff", args.channels)
            module = (LowDiff(net, resolutions=[8, 16], ema_decay=0.998, lr=2e-3) if name == "lowdiff"
                      else EDMDiffusion(net, ema_decay=0.998, lr=2e-3))
            train_s[name] = train(module, args, Path(tmp) / name)
            models[name] = module.eval()
            export.parent.mkdir(parents=True, exist_ok=True)
            module.export(str(export))
            print(f"{name}: trained {args.iterations} iterations in {train_s[name]:.0f} s", flush=True)
    rows = []
    baseline = [("baseline", nfe, None, solver) for solver, nfe in BASELINE]
    cascade = [("lowdiff", low + top, (low, top), solver) for solver, low, top in CASCADE]
    # interleaved (baseline, cascade, baseline, ...) so slow drifts of a shared machine hit both sides alike
    order = [s for pair in zip(baseline, cascade) for s in pair]
    order += [s for s in baseline + cascade if s not in order]
    labels = {seed: proportional_labels(real_labels, args.num, seed) for seed in args.sample_seeds}
    for name, nfe, steps, solver in order:
        options = {"solver": solver} if steps is None else {"solver": solver, "steps": list(steps)}
        fids, rates = [], []
        for seed in args.sample_seeds:
            x, batch_rates, spent = draw(models[name], nfe, labels[seed], seed, **options)
            fids.append(fid(x))
            rates += batch_rates
        row = {"model": name, "nfe": spent, "steps": None if steps is None else list(steps),
               "solver": solver if steps is None else f"{solver} + {models[name].upper_solver}",
               "images_per_s": statistics.median(rates), "fid": statistics.median(fids), "fid_per_seed": fids}
        rows.append(row)
        print(json.dumps(row), flush=True)
    matched = match(rows)
    seconds = time.time() - begin
    write(rows, matched, train_s, args, seconds, Path(args.out))


def fastest_as_good(candidates: list[dict], fid: float) -> dict | None:
    """The fastest of `candidates` with an FID no worse than `fid` (None if none is that good)."""
    ok = [c for c in candidates if c["fid"] <= fid]
    return max(ok, key=lambda c: c["images_per_s"]) if ok else None


def match(rows) -> list[dict]:
    """For each cascade setting, the fastest baseline setting with an FID no worse (`speedup`); where the baseline
    never gets that good, the baseline's best-FID setting instead (`dominates`: the cascade is better and this many
    times faster, a lower bound on the speed-up at matched FID)."""
    base = [b for b in rows if b["model"] == "baseline"]
    best_fid = min(base, key=lambda b: b["fid"])
    matched = []
    for row in (r for r in rows if r["model"] == "lowdiff"):
        found = fastest_as_good(base, row["fid"])
        ref = found or best_fid
        matched.append({"steps": row["steps"], "solver": row["solver"], "fid": row["fid"],
                        "images_per_s": row["images_per_s"],
                        "baseline": f"{ref['nfe']} ({ref['solver']})", "baseline_fid": ref["fid"],
                        "baseline_images_per_s": ref["images_per_s"], "kind": "speedup" if found else "dominates",
                        "ratio": row["images_per_s"] / ref["images_per_s"]})
    return matched


def frontier(rows) -> list[dict]:
    """The claim read from the baseline's side: for each baseline setting on its own FID / images/s frontier (no
    other baseline setting is both as fast and as good), the fastest cascade setting with an FID no worse, and the
    ratio of their images/s (None where no cascade setting is that good)."""
    base = [b for b in rows if b["model"] == "baseline"]
    cascade = [r for r in rows if r["model"] == "lowdiff"]
    front = [b for b in base if not any(o is not b and o["fid"] <= b["fid"] and o["images_per_s"] >= b["images_per_s"]
                                        for o in base)]
    out = []
    for b in sorted(front, key=lambda b: -b["images_per_s"]):
        best = fastest_as_good(cascade, b["fid"])
        out.append({"baseline": f"{b['nfe']} ({b['solver']})", "baseline_fid": b["fid"],
                    "baseline_images_per_s": b["images_per_s"],
                    "cascade": None if best is None else f"{best['steps']} ({best['solver']})",
                    "fid": None if best is None else best["fid"],
                    "images_per_s": None if best is None else best["images_per_s"],
                    "ratio": None if best is None else best["images_per_s"] / b["images_per_s"]})
    return out


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    curves = sorted({(r["model"], r["solver"]) for r in rows})
    for name, solver in curves:
        label = (f"single resolution 16x16, {solver}" if name == "baseline" else f"LowDiff 8 -> 16, {solver}")
        marker = "o" if name == "baseline" else "s"
        pts = sorted(((r["images_per_s"], r["fid"], r) for r in rows if r["model"] == name and r["solver"] == solver),
                     key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for ips, f, r in pts:
            tag = f"{r['nfe']}" if r["steps"] is None else "+".join(map(str, r["steps"]))
            ax.annotate(tag, (ips, f), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images/s (one CPU thread, batch 250)")
    ax.set_title("points: NFE, or 8x8 + 16x16 evaluations", fontsize=8)
    ax.set_ylabel("FID (digits classifier features)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(rows, matched, train_s, args, seconds, out: Path, machine: str | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"))
    def flag(k, v) -> str:
        return f"--{k}" if v is True else f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))

    command = "OMP_NUM_THREADS=1 python benchmarks/lowdiff.py " + " ".join(
        flag(k, v) for k, v in vars(args).items() if k not in ("out", "rewrite") and v is not False)
    lines = ["# LowDiff vs a single-resolution model (16x16 digits, CPU)", "",
             f"Command: `{command}`  ",
             f"Seeds: training {args.seed}; sampling {args.sample_seeds} (FID: median over them).  ",
             f"Machine: {machine or describe_machine()}; {seconds / 60:.1f} min in all; training "
             f"{train_s['baseline']:.0f} s (baseline) and {train_s['lowdiff']:.0f} s (LowDiff) for "
             f"{args.iterations} iterations of batch {args.batch_size} each.", "",
             f"Both: UNet model_channels={args.channels}, channel_mult [1, 2], one block per level, class-conditional; "
             f"{args.num} samples per setting and sampling seed, class labels in the train split's proportions, "
             f"FID against the {1618} training digits at 16x16 (shipped digits classifier features), the median over "
             "the sampling seeds. images/s: median over all batches of 250 on one thread, settings interleaved. "
             "Solvers on the EDM Karras grid; the cascade's solver column is '8x8 + 16x16'.", "",
             "| model | solver | evaluations (8x8 + 16x16) | NFE | images/s | FID | FID per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["solver"], r["nfe"])):
        per = "-" if r["steps"] is None else f"{r['steps'][0]} + {r['steps'][1]}"
        lines.append(f"| {r['model']} | {r['solver']} | {per} | {r['nfe']} | {r['images_per_s']:.0f} | "
                     f"{r['fid']:.2f} | {', '.join(f'{v:.2f}' for v in r.get('fid_per_seed', [r['fid']]))} |")
    lines += ["", "At matched FID: the fastest baseline setting with an FID no worse than the cascade's (speed-up); where "
              "no baseline setting is that good, the baseline's best-FID setting (the cascade is better and the ratio "
              "is a lower bound on the speed-up at matched FID: 'better and Nx').", "",
              "| cascade | FID | images/s | baseline (NFE, solver) | baseline FID | baseline images/s | ratio |",
              "|---|---|---|---|---|---|---|"]
    for m in matched:
        ratio = f"{m['ratio']:.2f}x" if m["kind"] == "speedup" else f"better and {m['ratio']:.2f}x"
        lines.append(f"| {m['steps']} ({m.get('solver', 'heun + euler')}) | {m['fid']:.2f} | {m['images_per_s']:.0f} | {m['baseline']} | "
                     f"{m['baseline_fid']:.2f} | {m['baseline_images_per_s']:.0f} | {ratio} |")
    fronts = frontier(rows)
    lines += ["", "From the baseline's side: each baseline setting on its own frontier (no other baseline setting both "
              "as fast and as good), the fastest cascade setting with an FID no worse.", "",
              "| baseline (NFE, solver) | baseline FID | baseline images/s | cascade | cascade FID | cascade images/s | "
              "ratio |", "|---|---|---|---|---|---|---|"]
    for f in fronts:
        if f["cascade"] is None:
            lines.append(f"| {f['baseline']} | {f['baseline_fid']:.2f} | {f['baseline_images_per_s']:.0f} | "
                         "none as good | | | |")
        else:
            lines.append(f"| {f['baseline']} | {f['baseline_fid']:.2f} | {f['baseline_images_per_s']:.0f} | "
                         f"{f['cascade']} | {f['fid']:.2f} | {f['images_per_s']:.0f} | {f['ratio']:.2f}x |")
    lines += ["", f"![FID vs images/s]({out.with_suffix('.png').name})", ""]
    base = [r for r in rows if r["model"] == "baseline"]
    best = min(base, key=lambda b: b["fid"])
    as_good = [r for r in rows if r["model"] == "lowdiff" and r["fid"] <= best["fid"]]
    lines += ["## Verdict", ""]
    reached = [f for f in fronts if f["ratio"] is not None]
    if reached:
        low = min(reached, key=lambda f: f["ratio"])
        lines.append(f"- At every quality level of the baseline's frontier ({len(reached)} of {len(fronts)} settings "
                     f"matched by a cascade setting), the cascade is at least {low['ratio']:.2f}x as fast (the least: "
                     f"against {low['baseline']}, FID {low['baseline_fid']:.2f}: {low['cascade']}, FID "
                     f"{low['fid']:.2f}); target >= 1.5x {'met' if low['ratio'] >= 1.5 else 'not met'} there.")
    if as_good:
        fast = max(as_good, key=lambda r: r["images_per_s"])
        ratio = fast["images_per_s"] / best["images_per_s"]
        lines.append(f"- At the baseline's best quality (FID {best['fid']:.2f}, {best['nfe']} NFE {best['solver']}, "
                     f"{best['images_per_s']:.0f} images/s) the cascade {fast['steps']} ({fast['solver']}) reaches FID {fast['fid']:.2f} at "
                     f"{fast['images_per_s']:.0f} images/s: {ratio:.2f}x the throughput at a better FID (target >= 1.5x: "
                     f"{'met' if ratio >= 1.5 else 'not met'}).")
    lines += [
        "",
        "## Notes",
        "",
        "- One training seed; the FID per sampling seed is in the first table (its spread is what a difference "
        "between two settings has to beat).",
        "- Same iterations and batch for both models; a LowDiff iteration also trains the 8x8 level (1.25x the "
        "pixels of a baseline iteration). Training wall-clock in this run is in the header (a shared machine: noisy).",
        "- NFE counts evaluations of either size; an 8x8 evaluation costs about a quarter of a 16x16 one, which is "
        "where the cascade's throughput comes from (compare images/s, not NFE).",
        "- Heun at a handful of steps is worse than Euler for the baseline as well (its last corrector is evaluated "
        "at sigma_min right after a long step); the table gives the baseline Heun, Euler and the multistep solvers, "
        "and LowDiff uses Euler at 16x16.",
    ]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "matched": matched, "train_seconds": train_s,
                                                    "args": vars(args), "machine": machine or describe_machine(),
                                                    "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
