"""Multi-Student Distillation (issue 20): K one-step students against one, at equal compute, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/msd.py --data tree --iters 5000 --every 250 --tsm_iters 3000 --tsm_lr 1e-3
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs one   # two subsets
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs k2    # side by side
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs half_tsm \
        --half_students 2 --tsm_iters 3000 --tsm_lr 1e-3                   # and --runs half_none, the same flags
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 3000 --every 500 --runs k4   # then k4_kmeans
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs k4 --ema_decay 0.99 \
        --name_iters --train_seed 0        # row k4_ema0.99_it5000 beside the 3,000-iteration k4_ema0.99
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 250 --runs k2 --ema_decay 0.99 \
        --student_batch                    # row k2_sb_ema0.99: batch 128 for 2,500 iterations, 64 per student step
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 3000 --every 500 --runs one_half_tsm \
        --half_students 2 --tsm_iters 3000 --tsm_lr 1e-3 --ema_decay 0.99 --name_iters   # then --runs half_tsm:
                                           # K = 2 half-width students against one of their size
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 7000 --every 500 --runs half_tsm \
        --half_students 2 --tsm_iters 3000 --tsm_lr 1e-3 --ema_decay 0.99 --name_iters --extra_ema 0.999 g16.97
                                           # rows half_tsm_ema0.999_it10000, half_tsm_emag16.97_it10000: the same run
                                           # sampled with a slower constant EMA and EDM2's sigma_rel 0.05 profile
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs k4 --ema_decay 0.99 \
        --num 5000 --tag reference_classes_reg --reg_pairs 2048 --reg_weight 0.5
                                           # row k4_reg0.5_ema0.99: every run adds DMD's regression loss
                                           # (--runs k4_shared: row k4_shared_reg0.5_ema0.99, one shared critic)
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs k4 --ema_decay 0.99 \
        --num 5000 --tag reference_classes_reg --reg_pairs 2048 --reg_weight 0.5 --lr 1.5e-4
                                           # row k4_reg0.5_lr0.00015_ema0.99: students and critics at another lr
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 5000 --every 500 --runs half_tsm \
        --half_students 4 --tsm_iters 3000 --tsm_lr 1e-3 --ema_decay 0.99 --name_iters --num 5000 \
        --reg_pairs 2048 --reg_weight 0.5 --small_width 8   # row half_tsm_w8_reg0.5_ema0.99_it8000: quarter width
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --iters 700 --every 100 --tsm 0.3 --tsm_lr 1e-3 \
        --runs one k4 k2 k4_kmeans          # --runs: a subset, in this order, added to earlier results
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --speed   # images/s of all runs in one process
    OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --speed --tag A --speed_with B   # tables A and B together
    python benchmarks/msd.py --report        # benchmarks/results/msd.md from the JSONs the runs wrote

Every run distills the shipped EDM teacher with DMD2's losses and settings (`benchmarks/dmd.py`'s SETTINGS, with
`--lr`), for the same number of iterations at the same batch size. A K-student run routes each sample of the batch
to the student owning its class, so every student sees only its classes and the K students together do the work
of one student: equal total training compute per student-class pair, and one student forward per sample at
sampling (equal one-step cost for same-width students).

Runs (tree has 2 classes, so K <= 2 there):
    one       DMD2, one student (MSD with K = 1 is DMD2; DMD2 keeps the baseline's sampling free of routing)
    k2, k4    MSD, K same-width students initialised from the teacher, contiguous class groups
    k2_shared, k4_shared  the same students with one class-conditional critic (fake score + head) for all of
              them (`shared_critic`, outside the paper): it steps on the whole batch instead of a 1/K share
    k4_kmeans MSD, K = 4, classes grouped by k-means of the teacher's class means (`partition: kmeans`)
    half_tsm  MSD, K half-width students from scratch: teacher-score-matching warm-up (`--tsm` of the
              iterations), then DMD2 for the rest
    half_none the same students and iterations without the warm-up (DMD2 from scratch)
    one_half_tsm  one half-width student with the warm-up: the single student of the half_* students' size

Protocol: every `--every` iterations each run is scored with the module's EMA on `--num_progress` samples
(sampling seed 0), the curve used to decide whether the single student has stopped improving. At the end each run
is scored on `--num` samples with sampling seeds 0, 1, 2 (medians reported; the classes in the reference set's
proportions, `--class_labels`, as every score of the package draws them since 2026-12-05: the runs before drew them
uniformly), and its EMA weights exported to benchmarks/runs/msd/<data>/<run>.pt (for later re-scoring with
`python -m lit_fewstep evaluate`); then images/s of all the runs of the
invocation are measured in the same process, interleaved over 3 rounds (median), so that load changes from other
users hit every run alike. One process, one thread, runs one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.dmd import SEED, SETTINGS, TEACHERS, build, images_per_s, machine  # noqa: E402
from benchmarks.run import write_atomically  # noqa: E402
from lit_fewstep.evaluation import LABEL_DRAWS, Evaluator  # noqa: E402
from lit_fewstep.metrics import ExactNLL, SlicedWasserstein2  # noqa: E402
from lit_fewstep.utils.config import instantiate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAMPLING_SEEDS = (0, 1, 2)
DEFAULT_LR = 3e-4
METRICS = {"tree": ("sw2", "nll", "mmd", "precision", "recall"), "digits": ("fid", "precision", "recall")}
HEADLINE = {"tree": "sw2", "digits": "fid"}
HALF = {"tree": {"class_path": "lit_fewstep.nets.MLP", "init_args": dict(dim=2, hidden=64, depth=3, emb_dim=64, num_classes=2)},
        "digits": {"class_path": "lit_fewstep.nets.UNet", "init_args": dict(img_resolution=8, in_channels=1, model_channels=16,
                                                                            channel_mult=[1, 2], num_blocks=1,
                                                                            attn_resolutions=[4], num_classes=10)}}


def small_net(data: str, width: int | None = None) -> dict:
    """The smaller students' network: HALF[data], or the same with `width` channels (digits) / hidden units (tree)."""
    net = HALF[data]
    if width is None:
        return net
    return dict(net, init_args=dict(net["init_args"], **{("hidden" if data == "tree" else "model_channels"): width}))


def runs_for(data: str, lr: float, tsm: float, tsm_lr: float | None, half_students: int | None = None,
             small_width: int | None = None) -> list[dict]:
    s = SETTINGS[data]
    dmd2 = dict(s["common"], **s["gan"], generator_every=5, lr=lr)
    k_max = 2 if data == "tree" else 4
    k_half = half_students or k_max
    runs = [dict(name="one", cls="DMD2", kw=dict(dmd2), students=1)]
    runs += [dict(name=f"k{k}", cls="MSD", kw=dict(dmd2, num_students=k), students=k) for k in (2, 4) if k <= k_max]
    runs += [dict(name=f"k{k}_shared", cls="MSD", kw=dict(dmd2, num_students=k, shared_critic=True), students=k)
             for k in (2, 4) if k <= k_max]
    if data == "digits":
        runs.append(dict(name="k4_kmeans", cls="MSD", kw=dict(dmd2, num_students=4, partition="kmeans"), students=4))
    half = dict(dmd2, student_net=small_net(data, small_width))
    runs += [dict(name="half_tsm", cls="MSD", kw=dict(half, num_students=k_half, tsm_iterations=tsm, tsm_lr=tsm_lr),
                  students=k_half),
             dict(name="half_none", cls="MSD", kw=dict(half, num_students=k_half, tsm_iterations=0), students=k_half),
             # the single student of the same half width: K half-width students against one of their own size
             dict(name="one_half_tsm", cls="MSD", kw=dict(half, num_students=1, tsm_iterations=tsm, tsm_lr=tsm_lr),
                  students=1)]
    return runs


class Progress(L.Callback):
    """Headline metric of the module's EMA every `every` iterations (one sampling seed)."""

    def __init__(self, evaluator: Evaluator, data: str, every: int, num: int, class_labels: str = "reference"):
        self.evaluator, self.data, self.every, self.num = evaluator, data, every, num
        self.class_labels = class_labels
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        iteration = int(pl_module.iteration)
        if iteration % self.every == 0:
            metrics = scored(pl_module, self.evaluator, self.num, SEED, quick=True, class_labels=self.class_labels)
            row = {"iteration": iteration, "train_s": round(time.perf_counter() - self.start, 1), **metrics}
            self.rows.append(row)
            print(json.dumps(row), flush=True)


@torch.no_grad()
def scored(model, evaluator: Evaluator, num: int, seed: int, quick: bool = False, class_labels: str = "reference",
           use_ema: bool | str = True) -> dict:
    """Metrics of `num` one-step samples drawn with sampling seed `seed`, their classes drawn as `class_labels`
    says (`Evaluator.class_labels`). quick (progress curves): the tree's SW2 and NLL only (its MMD and
    precision/recall against 10,000 references take seconds per call)."""
    was_training = model.training
    model.eval()
    x = evaluator.sample(model, num, 1, seed, use_ema=use_ema, class_labels=class_labels)[0]
    model.train(was_training)
    if quick and getattr(evaluator, "log_prob", None) is not None:
        sw2 = SlicedWasserstein2(sync_on_compute=False)
        sw2.update(fake=x, real=evaluator.real)
        nll = ExactNLL(evaluator.log_prob, sync_on_compute=False)
        nll.update(x)
        return {"sw2": float(sw2.compute()), "nll": float(nll.compute())}
    return evaluator.score(x)


def medians(per_seed: list[dict], data: str) -> dict:
    """Each metric's median over the sampling seeds' scores."""
    return {k: statistics.median(s[k] for s in per_seed) for k in METRICS[data]}


def plateau(curve: list[dict], key: str, window: int = 3, tol: float = 0.05) -> int | None:
    """First checkpoint after which the metric stopped improving: the best of the next `window` checkpoints is not
    `tol` (relative) below the best up to it. None when the curve never flattened."""
    values = [row[key] for row in curve]
    for i in range(len(values) - window):
        if min(values[i + 1:i + 1 + window]) > (1 - tol) * min(values[:i + 1]):
            return curve[i]["iteration"]
    return None


def train(run: dict, data: str, iters: int, evaluator: Evaluator, every: int, num_progress: int, seed: int = SEED,
          batch_size: int | None = None, class_labels: str = "reference", extra_emas: tuple[str, ...] = ()):
    L.seed_everything(seed, verbose=False)  # the module's training noise is keyed by this seed (PL_GLOBAL_SEED)
    run = dict(run, iters=iters)
    start = time.perf_counter()
    model = build(run, data, None)
    for spec in extra_emas:  # averages only: they draw no random numbers and feed nothing back into training
        model.add_ema(ema_label(spec), **ema_profile(spec))
    progress = Progress(evaluator, data, every, num_progress, class_labels)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=model.optimizer_steps_for(iters), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[progress],
                        default_root_dir=f"/tmp/lit_fewstep_msd_bench/{data}_{run['name']}")
    datamodule = SETTINGS[data]["data"]
    if batch_size is not None:
        datamodule = dict(datamodule, init_args=dict(datamodule["init_args"], batch_size=batch_size))
    trainer.fit(model, instantiate(datamodule))
    return model.eval(), {"iterations": int(model.iteration), "optimizer_steps": int(trainer.global_step),
                          "batch_size": datamodule["init_args"]["batch_size"],
                          "train_s": round(time.perf_counter() - start, 1), "curve": progress.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["tree", "digits"])
    parser.add_argument("--runs", nargs="+", default=None, help="subset of run names (default: all)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="learning rate of the students and critics (other than the default, each run's name gets "
                             "the suffix _lr<lr>)")
    parser.add_argument("--tsm", type=float, default=0.5, help="fraction of the iterations spent in the TSM warm-up")
    parser.add_argument("--tsm_lr", type=float, default=None, help="learning rate of the warm-up (default: --lr)")
    parser.add_argument("--tsm_iters", type=int, default=None,
                        help="TSM warm-up iterations added before the half-width students' DMD2 phase, which then "
                             "runs as many iterations as the others (--iters); half_none runs the same total. "
                             "Replaces --tsm")
    parser.add_argument("--small_width", type=int, default=None,
                        help="width of the half_*/one_half_* students instead of half the teacher's (digits: channels, "
                             "16 by default; tree: hidden units, 64); each such run's name gets the suffix _w<width>")
    parser.add_argument("--half_students", type=int, default=None,
                        help="number of half-width students (default: 2 on the tree, 4 on digits)")
    parser.add_argument("--num", type=int, default=None, help="samples per final score (default: 2000 digits, 5000 tree)")
    parser.add_argument("--num_progress", type=int, default=1000)
    parser.add_argument("--ema_decay", type=float, default=None,
                        help="the sampling EMA of every run (default: the settings' 0.95); other than the default, "
                             "each run's name gets the suffix _ema<decay>")
    parser.add_argument("--train_seed", type=int, default=SEED,
                        help="training seed; other than the default, each run's name gets the suffix _seed<N>")
    parser.add_argument("--name_iters", action="store_true",
                        help="each run's name gets the suffix _it<iterations>, to keep a run at a longer or shorter "
                             "budget beside the same kind's row")
    parser.add_argument("--student_batch", action="store_true",
                        help="a K-student run trains on K times the batch for 1/K of the iterations, so that each "
                             "student's steps see as many samples as the single student's (the same compute per "
                             "student-class pair, the same total of optimizer steps over the students); the run's "
                             "name gets the suffix _sb")
    parser.add_argument("--reg_pairs", type=int, default=0,
                        help="every run adds DMD's regression loss on this many teacher pairs (35-NFE Heun, made when "
                             "the fit starts), as the leaderboard's DMD2 digits config does; the name gets _reg<weight>")
    parser.add_argument("--reg_weight", type=float, default=0.5, help="lambda_reg with --reg_pairs")
    parser.add_argument("--class_labels", choices=LABEL_DRAWS, default="reference",
                        help="how the scores draw the classes (docs/evaluation.md)")
    parser.add_argument("--tag", default=None,
                        help="a table of its own: msd_<data>_<tag>.json (default: the current table, msd_<data>.json)")
    parser.add_argument("--extra_ema", nargs="+", default=[], metavar="DECAY|gGAMMA",
                        help="further EMAs tracked in the same runs (`add_ema`), each scored and exported as a row of its "
                             "own, named _ema<spec>: a constant decay (0.999) or EDM2's power-function profile with "
                             "exponent GAMMA (g16.97: sigma_rel 0.05; g6.94: 0.10)")
    parser.add_argument("--report", action="store_true", help="only write msd.md from the JSONs")
    parser.add_argument("--speed", action="store_true",
                        help="only re-measure images/s of the runs in msd_{data}.json (msd_{data}_<tag>.json with --tag), all in this process")
    parser.add_argument("--speed_with", nargs="+", default=[], metavar="TAG",
                        help="with --speed: the runs of these tables too, interleaved in the same process, so that "
                             "images/s ratios across tables come from one measurement")
    args = parser.parse_args()
    if args.report:
        write_report()
        return
    if args.data is None:
        parser.error("--data: give tree or digits (or --report)")
    for spec in args.extra_ema:
        try:
            ema_profile(spec)
        except ValueError:
            parser.error(f"--extra_ema: {spec!r} is neither a decay in (0, 1) nor gGAMMA with GAMMA > 0")
    if args.speed_with and not args.speed:
        parser.error("--speed_with: only with --speed (it names further tables whose images/s to measure)")
    torch.set_num_threads(1)
    if args.speed:
        measure_speed(args.data, [args.tag, *args.speed_with])
        return
    data = args.data
    iters = args.iters or SETTINGS[data]["iters"]
    num = args.num or (2000 if data == "digits" else 5000)
    out = table_path(data, args.tag)
    evaluator = Evaluator(instantiate(SETTINGS[data]["data"]), num_reference=10000, seed=SEED)
    command = "OMP_NUM_THREADS=1 python benchmarks/msd.py " + " ".join(sys.argv[1:])
    header = {"data": data, "command": command,
              "machine": machine(), "iters": iters, "lr": args.lr, "tsm_fraction": args.tsm, "tsm_lr": args.tsm_lr,
              "tsm_iters": args.tsm_iters, "half_students": args.half_students, "small_width": args.small_width,
              "num": num, "class_labels": args.class_labels,
              "num_progress": args.num_progress, "every": args.every, "settings": {
                  k: SETTINGS[data][k] for k in ("data", "common", "gan")}, "load_start": os.getloadavg()[0]}
    results, models = [], {}

    def save() -> None:
        """This invocation's runs merged into the file as it is now (a --runs subset adds to earlier results, and
        two subsets may run side by side), written whole and renamed into place."""
        before = json.loads(out.read_text()) if out.exists() and args.runs is not None else {}
        commands = before.get("commands", [before["command"]] if before else [])
        # a --runs subset keeps the earlier header (machine, load, speed pass) of the table it adds to
        kept = {k: v for k, v in before.items() if k not in ("commands", "results")}
        write_atomically(out, json.dumps({**header, **kept, "commands": commands + [c for c in [command] if c not in commands],
                                          "results": merged(before.get("results", []), results)}, indent=1))

    runs = {run["name"]: run for run in runs_for(data, args.lr, args.tsm, args.tsm_lr, args.half_students,
                                                 args.small_width)}
    reg_weight = args.reg_weight if args.reg_pairs > 0 else None  # named in every run's name when the loss is on
    for name in args.runs or runs:  # in the order given
        if name not in runs:
            parser.error(f"--runs: no run {name!r} for {data}; choose from {', '.join(runs)}")
        run, run_iters = runs[name], iters
        if args.ema_decay is not None:
            run["kw"]["ema_decay"] = args.ema_decay
        if args.tsm_iters is not None and "student_net" in run["kw"]:
            # the warm-up comes on top of the full DMD2 budget; the run without it gets the same total
            run_iters = iters + args.tsm_iters
            run["kw"]["tsm_iterations"] = 0 if name == "half_none" else args.tsm_iters
        elif isinstance(run["kw"].get("tsm_iterations"), float):
            run["kw"]["tsm_iterations"] = int(run["kw"]["tsm_iterations"] * iters)
        if args.reg_pairs > 0:
            run["kw"].update(reg_pairs=args.reg_pairs, reg_pairs_nfe=35, reg_weight=args.reg_weight)
        batch_size = None
        if args.student_batch and run["students"] > 1:
            batch_size = SETTINGS[data]["data"]["init_args"]["batch_size"] * run["students"]
            run_iters //= run["students"]
        suffixes = dict(student_batch=batch_size is not None, reg_weight=reg_weight, lr=args.lr,
                        width=args.small_width if "student_net" in run["kw"] else None)
        model, info = train(run, data, run_iters, evaluator, args.every, args.num_progress, args.train_seed, batch_size,
                            args.class_labels, tuple(args.extra_ema))
        per_seed = [scored(model, evaluator, num, seed, class_labels=args.class_labels) for seed in SAMPLING_SEEDS]
        info.update(name=run_name(run["name"], args.ema_decay, args.train_seed, run_iters if args.name_iters else None,
                                  **suffixes),
                    train_seed=args.train_seed, method=run["cls"], students=run["students"], command=command,
                    kw={k: v for k, v in run["kw"].items() if k != "student_net"},
                    width=(run["kw"]["student_net"]["init_args"] if "student_net" in run["kw"] else "teacher's"),
                    partition=[sorted(int(c) for c in (model.G.route == k).nonzero().flatten()) for k in
                               range(run["students"])] if run["cls"] == "MSD" else None,
                    per_seed=per_seed, median=medians(per_seed, data),
                    # measured now in case the invocation is stopped; replaced by the interleaved rounds at the end
                    images_per_s=statistics.median(images_per_s(model, 1) for _ in range(3)), speed="alone")
        print(f"[{data}] {run['name']}: {json.dumps(info['median'])} ({info['train_s']:.0f} s)", flush=True)
        results.append(info)
        models[info["name"]] = model
        export = ROOT / "benchmarks" / "runs" / "msd" / data / f"{info['name']}.pt"
        export.parent.mkdir(parents=True, exist_ok=True)
        model.export(str(export))
        for spec in args.extra_ema:  # the same run sampled with another average: a row without a progress curve
            per_seed = [scored(model, evaluator, num, seed, class_labels=args.class_labels, use_ema=ema_label(spec))
                        for seed in SAMPLING_SEEDS]
            row = dict(info, name=run_name(run["name"], spec, args.train_seed, run_iters if args.name_iters else None,
                                           **suffixes),
                       kw=dict(info["kw"], ema_decay=None, extra_ema=spec), ema_of=info["name"], curve=[],
                       per_seed=per_seed, median=medians(per_seed, data))
            print(f"[{data}] {row['name']}: {json.dumps(row['median'])}", flush=True)
            results.append(row)
            model.export(str(export.with_name(f"{row['name']}.pt")), ema=ema_label(spec))
        save()
    # images/s, all runs interleaved over 3 rounds (a further EMA's row: its run's network, its run's speed)
    speeds = {name: [] for name in models}
    for _ in range(3):
        for name, model in models.items():
            speeds[name].append(images_per_s(model, 1))
    for info in results:
        rounds = speeds[info.get("ema_of", info["name"])]
        info["images_per_s"] = statistics.median(rounds)
        info["images_per_s_rounds"], info["speed"] = rounds, "interleaved"
    header["load_end"] = os.getloadavg()[0]
    save()
    write_report()


def table_path(data: str, tag: str | None) -> Path:
    """msd_<data>.json, the current table, or msd_<data>_<tag>.json, a table of its own (`--tag`)."""
    return RESULTS / (f"msd_{data}_{tag}.json" if tag else f"msd_{data}.json")


def measure_speed(data: str, tags: Sequence[str | None] = (None,), rounds: int = 5) -> None:
    """images/s of every run's architecture and routing in the tables of `tags` (msd_<data>.json for None,
    msd_<data>_<tag>.json otherwise), all in one process, interleaved over `rounds` rounds (median), so that load
    from other users hits every run alike and ratios across the tables are measured in one run. The models are
    rebuilt untrained: the time of a one-step forward does not depend on the weights."""
    tables = {tag: json.loads(table_path(data, tag).read_text()) for tag in tags}
    runs = {run["name"]: run for run in runs_for(data, tables[tags[0]]["lr"], 0.0, None)}
    def rebuilt(x: dict):  # with the number of students it was trained with (--half_students may differ)
        run = runs[base_run(x["name"])]
        kw = dict(run["kw"], num_students=x["students"]) if run["cls"] == "MSD" else run["kw"]
        if isinstance(x.get("width"), dict):  # a smaller student: the width it was trained at (--small_width)
            kw = dict(kw, student_net=dict(kw["student_net"], init_args=x["width"]))
        return build(dict(run, iters=1, students=x["students"], kw=kw), data, None).eval()

    models = {(tag, x["name"]): rebuilt(x) for tag, r in tables.items() for x in r["results"]}
    speeds = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            speeds[key].append(images_per_s(model, 1))
    command = f"OMP_NUM_THREADS=1 python benchmarks/msd.py --data {data} --speed"
    command += (f" --tag {tags[0]}" if tags[0] else "") + (" --speed_with " + " ".join(tags[1:]) if tags[1:] else "")
    load = os.getloadavg()[0]
    for tag, r in tables.items():
        for x in r["results"]:
            key = (tag, x["name"])
            x["images_per_s"], x["images_per_s_rounds"] = statistics.median(speeds[key]), speeds[key]
            x["speed"] = "speed pass"
        r["speed_command"], r["speed_load"] = command, load
        table_path(data, tag).write_text(json.dumps(r, indent=1))
    write_report()


def run_name(base: str, ema: float | str | None, train_seed: int, iterations: int | None = None,
             student_batch: bool = False, reg_weight: float | None = None, lr: float | None = None,
             width: int | None = None) -> str:
    """A run's name in the table: its kind (`runs_for`), then _w<width> (`--small_width`), _sb (`--student_batch`),
    _reg<weight> (`--reg_pairs`), _lr<lr> (an `--lr` other than the default), _ema<decay> (or _ema<--extra_ema
    spec>) and _seed<N> where they differ from the settings, and _it<N> when asked (`base_run` reads the kind back)."""
    ema_text = "" if ema is None else f"_ema{ema:g}" if isinstance(ema, float) else f"_ema{ema}"
    reg_text = "" if reg_weight is None else f"_reg{reg_weight:g}"
    lr_text = "" if lr is None or lr == DEFAULT_LR else f"_lr{lr:g}"
    width_text = "" if width is None else f"_w{width}"
    return base + width_text + ("_sb" if student_batch else "") + reg_text + lr_text + ema_text + (
        f"_seed{train_seed}" if train_seed != SEED else "") + (f"_it{iterations}" if iterations is not None else "")


def base_run(name: str) -> str:
    return re.split(r"_w\d|_sb|_reg\d|_lr\d|_seed\d|_ema[\dg]|_it\d", name)[0]


def ema_profile(spec: str) -> dict:
    """`--extra_ema` spec -> `add_ema` arguments: "0.999" a constant decay, "g16.97" a power-function exponent."""
    value = float(spec[1:] if spec.startswith("g") else spec)
    if spec.startswith("g"):
        if not value > 0:
            raise ValueError(spec)
        return {"gamma": value}
    if not 0 < value < 1:
        raise ValueError(spec)
    return {"decay": value}


def ema_label(spec: str) -> str:
    """The module attribute name of a further EMA (``ema_<label>``): no dots."""
    return spec.replace(".", "p")


def merged(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Runs of an earlier invocation (--runs subset) kept unless re-done now; their images/s were measured then."""
    names = {x["name"] for x in new}
    return [x for x in earlier if x["name"] not in names] + new


def write_report() -> None:
    lines = ["# Multi-Student Distillation: K students vs one (issue 20)", ""]
    # msd_{data}.json is the current table; msd_{data}_<tag>.json are earlier ones kept beside it (renamed by hand)
    paths = [p for data in ("tree", "digits") for p in [RESULTS / f"msd_{data}.json",
                                                         *sorted(RESULTS.glob(f"msd_{data}_*.json"))] if p.exists()]
    for path in paths:
        r = json.loads(path.read_text())
        if "results" not in r or "data" not in r:  # another script's table (msd_digits_ema.json: variants.py)
            continue
        data = r["data"]
        keys, head = METRICS[data], HEADLINE[data]
        commands = r.get("commands") or [r["command"]]
        tag = path.stem.removeprefix(f"msd_{data}_")
        # tables scored before the reference proportions (uniform classes) are the earlier ones
        title = data if path.stem == f"msd_{data}" else f"{data}, {'' if 'class_labels' in r else 'earlier: '}{tag}"
        classes = "in the reference set's proportions" if r.get("class_labels") == "reference" else "uniformly"
        lines += [f"## {title}", "", "Commands (one after another; a later `--runs` subset adds its runs to the table):", "",
                  *[f"    {c}" for c in commands], ""]
        if "speed_command" in r:
            lines += [f"images/s: `{r['speed_command']}` (load {r['speed_load']:.1f}): every run's architecture and routing "
                      "rebuilt in one process (a one-step forward's time does not depend on the weights), 2,000 "
                      "one-step samples per measure, 1 thread, 5 interleaved rounds, median.", ""]
        lines += [
                  f"Machine: {r['machine']}; load average (1 min) {r['load_start']:.1f} at the start, "
                  f"{r.get('load_end', float('nan')):.1f} at the end. Training seed {SEED} (a run named *_seed<N>: "
                  f"N; *_ema<d>: sampling EMA d instead of the settings'; *_emag<γ>: EDM2's power-function EMA with "
                  f"exponent γ; a row whose name ends like another's but for the EMA and that has no progress "
                  f"curve is that run sampled with a further EMA tracked in it, `--extra_ema`; *_sb: K times the batch for 1/K of the iterations, "
                  f"`--student_batch`; *_reg<w>: DMD's regression loss added at weight w on `--reg_pairs` teacher "
                  f"pairs, `--reg_pairs`; *_lr<x>: students and critics at lr x instead of the table's, `--lr`; "
                  f"*_w<n>: the smaller students at width n, `--small_width`); "
                  f"sampling seeds "
                  f"{', '.join(map(str, SAMPLING_SEEDS))}; {r['num']} samples per score, medians over the 3 seeds; "
                  f"classes drawn {classes}. "
                  f"Iterations per run in the table, batch {r['settings']['data']['init_args']['batch_size']}, "
                  f"lr {r['lr']}, settings {r['settings']['common']} (lr overridden), GAN {r['settings']['gan']}, "
                  "TTUR 5.", "",
                  "| run | students | partition | width | iterations | batch | optimizer steps | "
                  + " | ".join(f"{k} (median)" for k in keys) + f" | {head} per seed | images/s | train s |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(keys) + "---|---|---|"]
        for x in r["results"]:
            width = x["width"] if isinstance(x["width"], str) else (
                f"hidden {x['width']['hidden']}" if "hidden" in x["width"] else f"channels {x['width']['model_channels']}")
            tsm = x["kw"].get("tsm_iterations", 0)
            width += f", TSM {tsm} it at lr {x['kw'].get('tsm_lr') or x['kw']['lr']}" if tsm else (", from scratch" if x["name"].startswith("half") else "")
            partition = "-" if x["partition"] is None else " ".join("{" + ",".join(map(str, g)) + "}" for g in x["partition"])
            ips = f"{x['images_per_s']:.0f}" if "images_per_s" in x else "n/a"
            batch = x.get("batch_size", r["settings"]["data"]["init_args"]["batch_size"])
            lines.append(f"| {x['name']} | {x['students']} | {partition} | {width} | {x['iterations']} | {batch} | "
                         f"{x['optimizer_steps']} | " + " | ".join(f"{x['median'][k]:.4g}" for k in keys) + " | "
                         + ", ".join(f"{s[head]:.4g}" for s in x["per_seed"]) + f" | {ips} | {x['train_s']:.0f} |")
        curves = [x for x in r["results"] if x["curve"]]
        lines += ["", f"Progress ({head}, module EMA, sampling seed 0, {r['num_progress']} samples):", "",
                  "| iteration | " + " | ".join(x["name"] for x in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        iterations = sorted({row["iteration"] for x in curves for row in x["curve"]})
        for it in iterations:
            cells = []
            for x in curves:
                v = [row[head] for row in x["curve"] if row["iteration"] == it]
                cells.append(f"{v[0]:.4g}" if v else "")
            lines.append(f"| {it} | " + " | ".join(cells) + " |")
        singles = [x for x in curves if base_run(x["name"]) in ("one", "one_half_tsm")]
        if singles:
            # a warm-up's one-step scores are not a DMD2 student's: its plateau is looked for after the warm-up
            stops = [(x["name"], plateau([row for row in x["curve"]
                                          if row["iteration"] > (x["kw"].get("tsm_iterations") or 0)], head))
                     for x in singles]
            lines += ["", f"Single student stopped improving (rule: the best {head} of the next 3 checkpoints is not "
                          "5% below the best so far): " + "; ".join(
                              f"{name} at iteration {stop}" if stop else f"{name} never within the run"
                              for name, stop in stops) + "."]
        lines.append("")
    # the hand-written reading below the tables survives regeneration
    path = RESULTS / "msd.md"
    old = path.read_text() if path.exists() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""
    path.write_text("\n".join(lines) + "\n" + reading)


if __name__ == "__main__":
    main()
