"""Benchmark harness: train (or reuse) and evaluate a suite of configs with fixed seeds, write a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/run.py --suite teachers --reuse     # the shipped teachers, as committed
    OMP_NUM_THREADS=1 python benchmarks/run.py --suite teachers             # retrain them from their configs first
    python benchmarks/run.py --list

A suite is a plain list of entries in `SUITES` below; a method adds its own list (or several) there. Entry keys:
    name      method label in the table
    config    training config (configs/<method>/<data>.yaml); `fit` runs it unless --reuse finds `asset`
    asset     a shipped/exported file to evaluate instead of training (with --reuse)
    teacher   "self" (the entry is a teacher) or the teacher file whose 35-NFE Heun score fills the teacher column
    nfe       NFE values to evaluate (default [1, 2, 4, 8])
    num       generated samples per NFE (default 2000)
    seed      seed of training (`--seed_everything`) and sampling (default: --seed)
    steps     override of trainer.max_steps when training (default: the config's)
    fit_args  extra `fit` arguments, a list of strings
    options   extra `sample()` keyword arguments, e.g. {"solver": "heun"}
    timing    also run benchmarks/timing.py on it (default False)

Output: benchmarks/results/<suite>.md (tables, machine, exact command, seeds, git commit) and <suite>.json (raw rows).
Training runs go to benchmarks/runs/<suite>/ (not committed). Metrics come from `lit_fewstep.evaluation.Evaluator`,
the same code as `python -m lit_fewstep evaluate`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from lit_fewstep.utils.machine import describe_machine  # noqa: E402

TEACHER_NFE = [1, 2, 4, 8, 35]


def _teacher(method: str, short: str, data: str, solver: str = "heun") -> dict:
    asset = f"lit_fewstep/assets/{'fm' if short == 'flow_matching' else short}_{data}.pt"
    heun = solver == "heun"
    return {"name": method if heun else f"{method} ({solver})", "config": f"configs/{short}/{data}.yaml",
            "asset": asset, "teacher": "self" if heun else asset, "nfe": TEACHER_NFE, "num": 2000,
            "options": {"solver": solver}, "timing": heun}


SUITES: dict[str, list[dict]] = {
    # The four shipped teachers at NFE 1, 2, 4, 8, 35 with the deterministic Heun sampler (EDM's), then the same
    # teachers with Euler steps, which behave better than Heun at a handful of steps.
    "teachers": [_teacher(m, short, data, solver) for solver in ("heun", "euler") for data in ("tree", "digits")
                 for m, short in (("EDM", "edm"), ("FlowMatching", "flow_matching"))],
}

PRIMARY = {True: "fid", False: "sw2"}  # the metric of the teacher column: images / toys
TIMING_BATCH = {True: 250, False: 1000}  # samples per timed sample() call: images / toys
TIMING_REPEATS = 3


# ------------------------------------------------------------------------------------------------ environment
def write_atomically(path: Path, text: str) -> None:
    """Benchmark processes side by side share result and cache files: a reader sees the old file or the new one."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def machine() -> str:
    return describe_machine()


def git_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def exact_command() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    cmd = shlex.join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                      if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]])
    return f"{env} {cmd}".strip()


# ------------------------------------------------------------------------------------------------ train / load
def train(entry: dict, suite: str, seed: int) -> tuple[Path, float, str]:
    """`python -m lit_fewstep fit` on the entry's config; returns (exported model, wall seconds, command)."""
    config = yaml.safe_load((ROOT / entry["config"]).read_text())
    logger = (config.get("trainer", {}).get("logger") or {}).get("init_args", {})
    save_dir = ROOT / "benchmarks" / "runs" / suite
    cmd = [sys.executable, "-m", "lit_fewstep", "fit", "--config", entry["config"], "--seed_everything", str(seed),
           "--trainer.logger.init_args.save_dir", str(save_dir.relative_to(ROOT)), "--trainer.enable_progress_bar",
           "false"]
    if entry.get("steps"):
        cmd += ["--trainer.max_steps", str(entry["steps"])]
    cmd += list(entry.get("fit_args", []))
    shown = shlex.join(["python", *cmd[1:]])
    print(f"[train] {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"fit failed ({entry['config']}):\n{result.stderr[-4000:]}")
    # each fit writes a new version_N folder and points <name>/latest at it when it finishes
    from lit_fewstep.utils.runs import resolve_run_pointer

    model = save_dir / logger.get("name", "lightning_logs") / str(logger.get("version", "latest")) / "model.pt"
    model = Path(os.path.realpath(resolve_run_pointer(model)))
    if not model.exists():
        raise FileNotFoundError(f"fit did not export {model}; does the config log with a TensorBoardLogger?")
    return model, seconds, shown


def load(path: Path | str):
    from lit_fewstep.utils.checkpoint import load_module

    return load_module(str(path)).eval()


def datamodule_of(module, entry: dict):
    from lit_fewstep.evaluation import data_from_config
    from lit_fewstep.utils.config import instantiate

    return instantiate(module.data_config) if module.data_config else data_from_config(str(ROOT / entry["config"]))


# ------------------------------------------------------------------------------------------------ evaluate
def score(module, evaluator, nfe: int, num: int, seed: int, options: dict) -> dict:
    from lit_fewstep.methods.sampling import draw

    x, _, spent, seconds = draw(module, num, nfe, seed, None, True, 1000, **options)
    return {"nfe": nfe, "nfe_spent": spent, **evaluator.score(x), "samples_per_s": num / seconds}


def run_suite(suite: str, entries: list[dict], reuse: bool, seed: int, timing: bool, num_reference: int) -> dict:
    from lit_fewstep.evaluation import Evaluator

    rows, timings, commands, teacher_cache, notes = [], [], [], {}, []
    for entry in entries:
        entry_seed = entry.get("seed", seed)
        asset = ROOT / entry["asset"] if entry.get("asset") else None
        if reuse and asset is not None and asset.exists():
            path, wall, source = asset, None, "reused"
        else:
            if reuse and asset is not None:
                notes.append(f"{entry['name']} {entry['config']}: {entry['asset']} missing, trained instead")
            path, wall, shown = train(entry, suite, entry_seed)
            commands.append(shown)
            source = "trained"
        module = load(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        data = Path(entry["config"]).stem
        datamodule = datamodule_of(module, entry)
        evaluator = Evaluator(datamodule, num_reference=num_reference, seed=entry_seed)
        primary = PRIMARY[evaluator.is_image]
        num, options = entry.get("num", 2000), dict(entry.get("options", {}))
        print(f"[eval] {entry['name']} {data} ({source} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})",
              flush=True)
        entry_rows = [score(module, evaluator, k, num, entry_seed, options) for k in entry.get("nfe", [1, 2, 4, 8])]
        # the teacher's primary metric at 35 NFE (Heun), same samples count and seed
        if entry.get("teacher") == "self":
            own = next((r for r in entry_rows if r["nfe"] == 35), None)
            teacher_value = own[primary] if own else score(module, evaluator, 35, num, entry_seed, options)[primary]
            if options.get("solver", "heun") == "heun" and entry.get("asset"):
                teacher_cache[(entry["asset"], data, num, entry_seed)] = teacher_value
        elif entry.get("teacher"):
            key = (entry["teacher"], data, num, entry_seed)
            if key not in teacher_cache:
                teacher = load(ROOT / entry["teacher"])
                teacher_cache[key] = score(teacher, evaluator, 35, num, entry_seed, {"solver": "heun"})[primary]
            teacher_value = teacher_cache[key]
        else:
            teacher_value = float("nan")
        steps = int(module.iteration) if hasattr(module, "iteration") else None
        for r in entry_rows:
            rows.append({"method": entry["name"], "data": data, "source": source, **r,
                         f"teacher {primary}@35": teacher_value, "train_steps": steps, "train_wall_s": wall,
                         "config": entry["config"], "seed": entry_seed, "num": num,
                         "model": f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} sha256:{digest}"})
            print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        if timing and entry.get("timing"):
            from benchmarks.timing import sampling_throughput, training_step_ratio

            print(f"[timing] {entry['name']} {data}", flush=True)
            sampling = sampling_throughput(module, entry.get("nfe", [1, 2, 4, 8]), batch=TIMING_BATCH[evaluator.is_image],
                                           repeats=TIMING_REPEATS, seed=entry_seed, **options)
            training = training_step_ratio(load(path).train(), datamodule_of(module, entry), steps=20, warmup=5,
                                           repeats=TIMING_REPEATS)
            timings.append({"method": entry["name"], "data": data, "sampling": sampling, "training": training})
    return {"suite": suite, "rows": rows, "timings": timings, "train_commands": commands, "notes": notes}


# ------------------------------------------------------------------------------------------------ report
def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metric_tables(rows: list[dict]) -> str:
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        group = [r for r in rows if r["data"] == data]
        fixed = {"method", "data", "source", "nfe", "nfe_spent", "samples_per_s", "train_steps", "train_wall_s",
                 "config", "seed", "num", "model"}
        metrics = [k for k in group[0] if k not in fixed and not k.startswith("teacher ")]
        teacher_col = next(k for k in group[0] if k.startswith("teacher "))
        head = ["method", "NFE", *metrics, teacher_col, "samples/s", "train steps", "train wall (s)"]
        lines = [f"### {data}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in group:
            cells = [r["method"], f"{r['nfe']}" + ("" if r["nfe_spent"] == r["nfe"] else f" ({r['nfe_spent']} spent)")]
            cells += [_cell(r[m]) for m in metrics]
            cells += [_cell(r[teacher_col]), _cell(r["samples_per_s"]), _cell(r["train_steps"]),
                      _cell(r["train_wall_s"]) if r["source"] == "trained" else "reused"]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def write_report(result: dict, path: Path, args, started: str, seconds: float, load_before, load_after) -> None:
    from benchmarks.timing import format_timing

    rows = result["rows"]
    lines = [f"# Benchmark suite `{result['suite']}`", "",
             f"- command: `{exact_command()}`",
             f"- seed: {args.seed} (training `--seed_everything` and sampling; per-entry seeds in the JSON); "
             f"samples per NFE: {sorted({r['num'] for r in rows})}; toy reference samples: {args.num_reference}",
             f"- machine: {machine()}",
             f"- load average at start / end: {load_before} / {load_after} (a shared machine: timings are indicative)",
             f"- git: {git_state()}; started {started}; wall time {seconds:.0f} s",
             f"- models: {'shipped assets (`--reuse`)' if args.reuse else 'trained by this run'}"]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"- evaluated: `{model}`")
    for cmd in result["train_commands"]:
        lines.append(f"- trained with: `{cmd}`")
    for note in result["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "Metrics: toys against exact samples of the distribution (sw2 = sliced W2, mmd = MMD^2 with an RBF "
              "mixture, nll = exact negative log-likelihood of the samples, precision/recall = k-NN manifolds); digits "
              "on the shipped digits classifier's features against the training split (fid, precision/recall). Lower is "
              "better except precision/recall. Sampler: the teachers' deterministic EDM sampler, Heun steps with a final "
              "Euler step (rows `(euler)`: Euler steps only), NFE = network evaluations per sample. "
              "`samples/s` includes the Python loop of `sample()` in batches of 1000.", "", metric_tables(rows)]
    if result["timings"]:
        lines += ["", "## Timing", "",
                  f"Sampling: images/s of `sample(B, nfe)` with B = {TIMING_BATCH[False]} (toys) or {TIMING_BATCH[True]} "
                  f"(images), median of {TIMING_REPEATS}. Training: median wall time of one training step (20 steps "
                  f"after 5 warm-up), the sum of its network passes replayed alone (forward+backward for trained "
                  f"networks, forward for frozen ones; median of {TIMING_REPEATS} each), and the median of the per-step "
                  "ratios (`benchmarks/timing.py`). Other jobs share this machine's 2 cores (see the load average): "
                  "treat timings as indicative.", "", format_timing(result["timings"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({**result, "command": exact_command(), "machine": machine(),
                                                     "git": git_state(), "started": started}, indent=1,
                                                    default=lambda v: None))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="teachers", choices=sorted(SUITES))
    parser.add_argument("--reuse", action="store_true", help="evaluate existing assets instead of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None, help="entries whose config path contains one of these")
    parser.add_argument("--num", type=int, default=None, help="override every entry's sample count (quick checks)")
    parser.add_argument("--no_timing", action="store_true")
    parser.add_argument("--num_reference", type=int, default=10000, help="toy reference samples")
    parser.add_argument("--out", default=None, help="default benchmarks/results/<suite>.md")
    parser.add_argument("--list", action="store_true", help="print the suites and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, entries in SUITES.items():
            print(name, [f"{e['name']}:{e['config']}" for e in entries])
        return None
    entries = [e for e in SUITES[args.suite] if not args.only or any(o in e["config"] for o in args.only)]
    if args.num is not None:
        entries = [{**e, "num": args.num} for e in entries]
    if not entries:
        parser.error(f"--only {args.only} matches no entry of suite {args.suite!r}")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    start = time.perf_counter()
    result = run_suite(args.suite, entries, args.reuse, args.seed, not args.no_timing, args.num_reference)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{args.suite}.md"
    write_report(result, out, args, started, time.perf_counter() - start, load_before,
                 " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
