"""Distribution-matching benchmark (issue #4): DMD, DMD2, MSD against their EDM teacher on CPU.

    OMP_NUM_THREADS=1 python benchmarks/dmd.py                      # everything, writes benchmarks/results/dmd.md
    OMP_NUM_THREADS=1 python benchmarks/dmd.py --data tree --runs dmd2_gan --iters 300 --out /tmp/x.md   # a subset

Every run: a student built from the shipped teacher (lit_fewstep/assets/edm_{tree,digits}.pt), trained with
Lightning on CPU for a fixed number of iterations with a fixed seed, then sampled with `sample()` and scored
with `lit_fewstep.evaluation.Evaluator` (tree: SW2/MMD/NLL/precision/recall against exact samples; digits: FID and
precision/recall on the shipped digits classifier's features against the training split). Runs go to a pool of
`--workers` single-threaded processes. Also measured: images/s of each sampler and the DMD2 training-step
timing ratio (step time / sum of its network passes timed alone).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lit_fewstep.utils.machine import describe_machine  # noqa: E402

SEED = 0
TEACHERS = {"tree": "lit_fewstep/assets/edm_tree.pt", "digits": "lit_fewstep/assets/edm_digits.pt"}
FOUR_STEPS = [80.0, 2.5, 0.6, 0.15]  # fixed generator noise levels of the multi-step students (EDM sigma)

# Per data set: data module, shared student settings, iterations, eval sample count.
# Digits: lr / GAN weight from a short sweep (lr 3e-4..2e-3, lambda_G 0..0.3, TTUR 2 vs 5) at this 300-iteration
# budget, where lr 1e-3 is ahead; configs/dmd2/digits.yaml uses 3e-4, ahead from ~500 iterations on (see
# benchmarks/dmd2_long.py). DMD (1:1 updates) uses a lower lr because at 1e-3 both DMD variants diverged.
SETTINGS = {
    "tree": dict(data=dict(class_path="lit_fewstep.data.Toy2DDataModule", init_args=dict(name="tree", batch_size=256)),
                 common=dict(lr=3e-4, weight_decay=0.0, ema_decay=0.95, grad_clip=10.0),
                 dmd_lr=3e-4, gan=dict(gan_generator_weight=0.01, gan_critic_weight=0.01),
                 iters=600, num_eval=5000, num_pairs=4096),
    "digits": dict(data=dict(class_path="lit_fewstep.data.DigitsDataModule", init_args=dict(image_size=8, batch_size=64)),
                   common=dict(lr=1e-3, weight_decay=0.0, ema_decay=0.95, grad_clip=10.0),
                   dmd_lr=1e-4, gan=dict(gan_generator_weight=0.03, gan_critic_weight=0.01),
                   iters=300, num_eval=2000, num_pairs=1024),
}


def runs_for(data: str) -> list[dict]:
    """The comparisons of issue #4. `eval_nfe`: the NFE each student is scored at (a k-step student samples with
    the first k of its fixed sigmas)."""
    s = SETTINGS[data]
    common, gan, nogan = s["common"], s["gan"], dict(gan_generator_weight=0.0)
    dmd = dict(common, lr=s["dmd_lr"])
    k = 2 if data == "tree" else 4  # students: the tree has only 2 classes
    half = ({"class_path": "lit_fewstep.nets.MLP", "init_args": dict(dim=2, hidden=64, depth=3, emb_dim=64, num_classes=2)}
            if data == "tree" else
            {"class_path": "lit_fewstep.nets.UNet", "init_args": dict(img_resolution=8, in_channels=1, model_channels=16,
                                                                        channel_mult=[1, 2], num_blocks=1,
                                                                        attn_resolutions=[4], num_classes=10)})
    return [
        dict(name="dmd_reg", cls="DMD", kw=dict(dmd, pairs_path="PAIRS", reg_weight=0.25), eval_nfe=[1]),
        dict(name="dmd_noreg", cls="DMD", kw=dict(dmd), eval_nfe=[1]),
        dict(name="dmd2_gan", cls="DMD2", kw=dict(common, **gan, generator_every=5), eval_nfe=[1], export=True),
        dict(name="dmd2_nogan", cls="DMD2", kw=dict(common, **nogan, generator_every=5), eval_nfe=[1]),
        dict(name="dmd2_4step_bs", cls="DMD2", kw=dict(common, **gan, generator_every=5, generator_sigmas=FOUR_STEPS,
                                                       backward_simulation=True), eval_nfe=[2, 4]),
        dict(name="dmd2_4step_nobs", cls="DMD2", kw=dict(common, **gan, generator_every=5, generator_sigmas=FOUR_STEPS,
                                                         backward_simulation=False), eval_nfe=[2, 4]),
        dict(name=f"msd_{k}students", cls="MSD", kw=dict(common, **gan, generator_every=5, num_students=k), eval_nfe=[1]),
        dict(name=f"msd_{k}half_tsm", cls="MSD", kw=dict(common, **gan, generator_every=5, num_students=k,
                                                         student_net=half, tsm_iterations=0.25), eval_nfe=[1]),
    ]


def build(run: dict, data: str, pairs_path: str | None):
    from lit_fewstep import methods
    from lit_fewstep.utils.config import instantiate

    kw = {k: (pairs_path if v == "PAIRS" else v) for k, v in run["kw"].items()}
    if "student_net" in kw:
        kw["student_net"] = instantiate(kw["student_net"])
    if isinstance(kw.get("tsm_iterations"), float):
        kw["tsm_iterations"] = int(kw["tsm_iterations"] * run["iters"])
    return getattr(methods, run["cls"])(TEACHERS[data], **kw)


def images_per_s(model, nfe: int) -> float:
    n = 2000 if nfe <= 4 else 200
    g = torch.Generator().manual_seed(SEED + 1)
    model.sample(64, nfe, generator=g)  # warm-up
    start = time.perf_counter()
    model.sample(n, nfe, generator=g)
    return n / (time.perf_counter() - start)


def score(model, data: str, nfes: list[int], num: int, evaluator=None) -> list[dict]:
    from lit_fewstep.evaluation import Evaluator
    from lit_fewstep.utils.config import instantiate

    evaluator = evaluator or Evaluator(instantiate(SETTINGS[data]["data"]), num_reference=10000, seed=SEED)
    rows = []
    for nfe in nfes:
        out = model.sample(num, nfe, generator=torch.Generator().manual_seed(SEED))
        rows.append({"nfe": out.nfe, **evaluator.score(out.x), "images_per_s": images_per_s(model, nfe)})
    return rows


def train_and_score(job: tuple) -> dict:
    """One run in a worker process (single-threaded)."""
    run, data, pairs_path, out_dir = job
    torch.set_num_threads(1)
    import lightning as L

    from lit_fewstep.utils.config import instantiate

    L.seed_everything(SEED, verbose=False)
    start = time.perf_counter()
    model = build(run, data, pairs_path)
    datamodule = instantiate(SETTINGS[data]["data"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=model.optimizer_steps_for(run["iters"]), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out_dir)
    trainer.fit(model, datamodule)
    train_s = time.perf_counter() - start
    model.eval()
    rows = score(model, data, run["eval_nfe"], SETTINGS[data]["num_eval"])
    result = {"data": data, "name": run["name"], "method": run["cls"], "iterations": int(model.iteration),
              "optimizer_steps": int(trainer.global_step), "train_s": train_s, "rows": rows,
              "wall_s": time.perf_counter() - start}
    if run.get("export"):
        path = Path(out_dir) / f"{data}_{run['name']}.pt"
        model.export(str(path))
        result["export"] = str(path)
    print(f"[{data}] {run['name']}: {json.dumps(rows)} ({result['wall_s']:.0f} s)", flush=True)
    return result


def teacher_job(job: tuple) -> dict:
    data, nfe = job
    torch.set_num_threads(1)
    from lit_fewstep.utils.checkpoint import load_module

    start = time.perf_counter()
    teacher = load_module(ROOT / TEACHERS[data]).eval()
    rows = score(teacher, data, [nfe], SETTINGS[data]["num_eval"])
    print(f"[{data}] teacher: {json.dumps(rows)}", flush=True)
    return {"data": data, "name": f"teacher_{nfe}nfe", "method": "EDMDiffusion (Heun)", "iterations": 0,
            "optimizer_steps": 0, "train_s": 0.0, "rows": rows, "wall_s": time.perf_counter() - start}


def pairs_job(job: tuple) -> str:
    data, out_dir = job
    torch.set_num_threads(1)
    from lit_fewstep.data.pairs import make_pairs, save_pairs
    from lit_fewstep.methods.base import load_teacher

    path = Path(out_dir) / f"pairs_{data}.pt"
    start = time.perf_counter()
    pairs = make_pairs(load_teacher(str(ROOT / TEACHERS[data])), SETTINGS[data]["num_pairs"], nfe=35, seed=SEED + 2)
    save_pairs(pairs, path, TEACHERS[data])
    print(f"[{data}] {SETTINGS[data]['num_pairs']} pairs at 35 NFE in {time.perf_counter() - start:.0f} s", flush=True)
    return str(path)


# ----------------------------------------------------------------------------------------------- timing ratio
def timing_ratio(data: str = "digits", cycles: int = 20) -> dict:
    """DMD2 (1 step, GAN, TTUR 5) through Lightning's training loop, measured by `benchmarks/timing.py` (the one
    clock every benchmark uses): per training step, its wall time against its own network passes replayed alone,
    and in place against the time inside the networks' forwards and every autograd backward/grad of the step.
    `cycles` TTUR cycles of 5 steps (5 critic updates, 1 generator update) after 5 warm-up steps."""
    from benchmarks.timing import training_step_ratio
    from lit_fewstep.methods import DMD2
    from lit_fewstep.utils.config import instantiate
    import lightning as L

    torch.set_num_threads(1)
    L.seed_everything(SEED, verbose=False)
    s = SETTINGS[data]
    model = DMD2(TEACHERS[data], **s["common"], **s["gan"], generator_every=5)
    datamodule = instantiate(s["data"])
    measured = training_step_ratio(model, datamodule, steps=5 * cycles, warmup=5, repeats=5, accelerator="cpu")
    return {"data": data, "batch": s["data"]["init_args"]["batch_size"], **measured}


# ----------------------------------------------------------------------------------------------- report
def machine() -> str:
    return describe_machine("CPU shared with other users, 1 thread per worker")


def metric_cells(row: dict, data: str) -> list[str]:
    keys = ["sw2", "mmd", "nll", "precision", "recall"] if data == "tree" else ["fid", "precision", "recall"]
    return [f"{row[k]:.4g}" for k in keys] + [f"{row['images_per_s']:.0f}"]


TIMING_HEADING = "## DMD2 training-step timing ratio"


def timing_section(ratio: dict) -> list[str]:
    return [TIMING_HEADING, "",
            f"`{' '.join(['OMP_NUM_THREADS=1 python benchmarks/dmd.py', *sys.argv[1:]])}`: "
            f"{ratio['data']}, batch {ratio['batch']}, {ratio['steps']} training steps through Lightning after "
            f"{ratio['warmup']} warm-up steps (TTUR 5: every step updates the critic, every fifth also the generator), "
            "measured by `benchmarks/timing.py::training_step_ratio`: median step "
            f"{ratio['step_s'] * 1000:.1f} ms; its network passes replayed alone: {ratio['floor_s'] * 1000:.1f} ms; "
            f"**ratio {ratio['ratio']:.3f}** (median of per-step ratios; target <= 1.15). In place (same steps: their "
            "time / the time inside the networks' outermost forwards and every autograd backward and grad call, so "
            f"load changes cancel): **{ratio['ratio_in_place']:.3f}**. Passes seen: {', '.join(ratio['passes'])}; "
            f"median {ratio['calls_per_step']:.0f} per step.", ""]


def replace_timing_section(path: Path, ratio: dict) -> None:
    """Rewrite only the timing section of an existing report (`--ratio_only`), keeping every other line."""
    lines = path.read_text().splitlines()
    start = lines.index(TIMING_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    path.write_text("\n".join(lines[:start] + timing_section(ratio) + lines[end:]) + "\n")


def write_report(results: list[dict], ratio: dict | None, args, wall: float, path: Path) -> None:
    lines = ["# Distribution matching: DMD, DMD2, MSD (issue #4)", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/dmd.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Seed {SEED} everywhere (Lightning `seed_everything`, sampling generators); machine: {machine()}; "
             f"{args.workers} worker processes; total wall time {wall / 60:.1f} min; load average (1 min) at the start "
             f"{args.load_start:.1f}, at the end {os.getloadavg()[0]:.1f} (every time below, images/s included, was "
             "measured while the other worker and other users' jobs shared the cores).", "",
             "Teachers: the shipped EDM teachers (`lit_fewstep/assets/edm_tree.pt`, `edm_digits.pt`) sampled with Heun at "
             "35 NFE. Students start from the teacher's weights (generator and fake score); MSD half-width students start "
             "from scratch with a teacher-score-matching warm-up. Metrics from `lit_fewstep.evaluation.Evaluator` "
             "(tree: against 10,000 exact samples; digits: FID/precision/recall on the shipped digits classifier's "
             "features against the training split). images/s: `sample()` of 2,000 images (200 for the teacher), 1 thread.", ""]
    for data in ("tree", "digits"):
        rows = [r for r in results if r["data"] == data]
        if not rows:
            continue
        s = SETTINGS[data]
        head = (["sw2 ↓", "mmd ↓", "nll ↓", "precision ↑", "recall ↑"] if data == "tree" else
                ["FID ↓", "precision ↑", "recall ↑"])
        lines += [f"## {data}", "",
                  f"Data `{s['data']['class_path']}` {s['data']['init_args']}; student settings {s['common']} "
                  f"(DMD runs: lr {s['dmd_lr']}); "
                  f"GAN weights {s['gan']}; {s['iters']} iterations per run; {s['num_eval']} samples scored.", "",
                  "| run | method | iterations | optimizer steps | NFE | " + " | ".join(head) + " | images/s | train s |",
                  "|---|---|---|---|---|" + "---|" * len(head) + "---|---|"]
        for r in rows:
            for row in r["rows"]:
                lines.append(f"| {r['name']} | {r['method']} | {r['iterations']} | {r['optimizer_steps']} | {row['nfe']} | "
                             + " | ".join(metric_cells(row, data)) + f" | {r['train_s']:.0f} |")
        lines.append("")
    if ratio is not None:
        lines += timing_section(ratio)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["tree", "digits"], choices=["tree", "digits"])
    parser.add_argument("--runs", nargs="+", default=None, help="subset of run names (default: all)")
    parser.add_argument("--iters", type=int, default=None, help="override iterations per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no_teacher", action="store_true")
    parser.add_argument("--no_ratio", action="store_true")
    parser.add_argument("--ratio_only", action="store_true", help="measure the timing ratio and rewrite only its "
                        "section of --out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dmd.md"))
    parser.add_argument("--work_dir", default="/tmp/lit_fewstep_dmd_bench")
    parser.add_argument("--asset", default=None, help="copy the exported DMD2 digits student here")
    args = parser.parse_args()
    if args.ratio_only:
        ratio = timing_ratio("digits")
        replace_timing_section(Path(args.out), ratio)
        print("\n".join(timing_section(ratio)))
        return
    start = time.perf_counter()
    args.load_start = os.getloadavg()[0]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        jobs = []
        for data in args.data:
            for run in runs_for(data):
                run["iters"] = args.iters or SETTINGS[data]["iters"]
                if args.runs is None or run["name"] in args.runs:
                    jobs.append((run, data))
        need_pairs = sorted({data for run, data in jobs if run["kw"].get("pairs_path") == "PAIRS"})
        pairs = dict(zip(need_pairs, pool.map(pairs_job, [(d, args.work_dir) for d in need_pairs])))
        teacher_results = ([] if args.no_teacher else
                           [pool.apply_async(teacher_job, ((d, 35),)) for d in args.data])
        results = pool.map(train_and_score, [(run, data, pairs.get(data), args.work_dir) for run, data in jobs],
                           chunksize=1)
        results = [r.get() for r in teacher_results] + results
    order = {d: i for i, d in enumerate(("tree", "digits"))}
    results.sort(key=lambda r: order[r["data"]])
    (Path(args.work_dir) / "results.json").write_text(json.dumps({"results": results}, indent=1))
    ratio = None if args.no_ratio else timing_ratio("digits")
    (Path(args.work_dir) / "results.json").write_text(json.dumps({"results": results, "ratio": ratio}, indent=1))
    for r in results:
        if r.get("export") and args.asset and r["data"] == "digits":
            import shutil

            shutil.copy(r["export"], args.asset)
    write_report(results, ratio, args, time.perf_counter() - start, Path(args.out))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
