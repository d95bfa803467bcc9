"""One leaderboard: every method of the zoo on the same data, from the same shipped teacher, scored by one evaluator
at equal network evaluations (NFE 1, 2, 4, 8), beside the teacher itself with training-free solvers.

    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --data tree            # train what is not cached, score, report
    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --data tree digits --jobs 2   # two methods at a time
    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --data digits --only cd dmd2   # these rows replaced, others kept
    python benchmarks/leaderboard.py --collect                                # the report from cached scores only
    python -m lit_fewstep benchmark --data tree                               # the same, from a checkout

Budget: every method trains with its own CPU config, `configs/<method>/<data>.yaml` (2-rectified flow, row caf_2rf:
`configs/caf/<data>_2rf.yaml`; DMD2 on digits: `configs/dmd2/digits_long.yaml`), as shipped (the iterations and
the training wall time are in each row; `--steps N` sets one optimizer-step budget for all). Each trained model is
cached under `benchmarks/runs/leaderboard/<data>/<method>-<hash>/` where the hash covers the config file, the
overrides and the seed; scores are cached beside it, so a rerun (or a run stopped and started again) trains and
scores only what changed. Scores are medians over `--seeds` sampling seeds (2,000 samples each; a class-conditional
model samples its classes in the reference set's proportions, `Evaluator.class_labels`); a method that
cannot sample at an NFE (a fixed-step generator) shows "–" there; a method without a config for the data is
listed as "not yet". With `--jobs N` the methods train in a pool of N worker processes, longest recorded fit first,
and the teachers' rows are one more job of the pool; the suite's wall time: `benchmarks/suite_time.py`.

Output: `benchmarks/results/leaderboard.md` and `.json` (command, seeds, machine, git commit, per-row train time
and images/s; both data sets, whichever were run last), and figures `leaderboard_<data>_nfe.svg` (quality vs NFE,
teachers' solvers dashed) and `leaderboard_<data>_time.svg` (quality at 1 NFE vs training time); the README's results
section (between its leaderboard markers) is rewritten from the same tables. SLURM: one method per array task, then
`--collect` (`benchmarks/slurm/leaderboard.sbatch`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import exact_command, git_state, load, machine, write_atomically  # noqa: E402

# Every method of the zoo, in the order of the table. Teachers are rows of their own (TEACHER_SOLVERS).
METHODS = ["cd", "ct", "ict", "scd", "sct", "dmd", "dmd2", "msd", "ctm", "guided_distillation", "flow_map", "caf",
           "caf_2rf", "analog_bits", "lowdiff"]
# Conformance-registry entries that are ablations of a method above, reported with it rather than as rows of their own
# (MSD's shared critic is compared with the paper's critic per student in benchmarks/results/msd.md).
VARIANTS: dict[str, str] = {"msd_shared_critic": "msd"}
# Rows whose config is not configs/<method>/<data>.yaml (a path pattern, or one per data set): 2-rectified flow is
# CAF's class without the acceleration net, on the same couplings (configs/caf/<data>_2rf.yaml); DMD2's digits config
# is the README's first job (1,000 iterations, minutes), so its row trains the 9,000-iteration settings of the shipped
# student instead (configs/dmd2/digits_long.yaml).
CONFIG_OF: dict[str, str | dict[str, str]] = {"caf_2rf": "caf/{data}_2rf", "dmd2": {"digits": "dmd2/digits_long"}}
TEACHER = {"tree": "lit_fewstep/assets/edm_tree.pt", "digits": "lit_fewstep/assets/edm_digits.pt"}
# (solver, grid): EDM's Heun on EDM's Karras grid is the 35-NFE reference; the few-step rows are what a user gets for
# free, on the Karras grid and on the cosine grid (even in VP cosine time, `cosine_sigmas`), which at 4 NFE is
# several times better (the Karras grid spends its last step on sigma 0.002 -> 0).
TEACHER_SOLVERS = [("heun", "karras"), ("euler", "karras"), ("dpmpp_2m", "karras"), ("unipc", "karras"),
                   ("euler", "cosine"), ("dpmpp_2m", "cosine"), ("unipc", "cosine")]
# CAF and flow maps live on the linear path: their rows are distilled from the shipped flow-matching teacher of the
# same data, scored here at 35 NFE (Heun) as their own reference beside the EDM teacher's.
FM_TEACHER = {"tree": "lit_fewstep/assets/fm_tree.pt", "digits": "lit_fewstep/assets/fm_digits.pt"}
FROM_FM_TEACHER = {"caf", "caf_2rf", "flow_map"}
NFES = [1, 2, 4, 8]
PRIMARY = {"tree": "sw2", "digits": "fid"}
SECONDARY = {"tree": "nll"}  # a second metric at 1 NFE (the toy's exact NLL of samples: precision, where sw2 is blind)
# Methods whose config reads teacher ODE pairs (`python -m lit_fewstep pairs`), made once into the cache as their
# configs' headers say: DMD's regression pairs from the EDM teacher; CAF's couplings from the shipped flow-matching
# teacher of the same data (CAF lives on the linear path, so its row is distilled from that teacher, not the EDM one).
PAIRS = {"dmd": {"teacher": TEACHER, "num": {"tree": 4096, "digits": 2048}, "nfe": {"tree": 35, "digits": 35},
                 "path": "edm"},
         "caf": {"teacher": FM_TEACHER,
                 "num": {"tree": 20000, "digits": 20000}, "nfe": {"tree": 63, "digits": 35}, "path": "linear"}}
PAIRS["caf_2rf"] = PAIRS["caf"]  # the same file: both rows train on the same couplings
# Progressive distillation leaves one student per step count (16 -> 8 -> 4 -> 2 -> 1, a stage each): a row's score at
# n NFE is that of the n-step student, kept by the config's checkpoint at the end of its stage.
STAGED = {"guided_distillation"}
# Sampling options that make a row comparable with the teachers' rows (unguided): guided distillation's default
# sampling scale is its config's guidance_scale; the leaderboard scores it at 1 (no guidance), like the teacher.
SAMPLING = {"guided_distillation": {"guidance_scale": 1.0}}
# Methods trained from data alone (no teacher): they are rows of the table but not held to the distillation targets.
FROM_SCRATCH = {"ct", "ict", "sct", "analog_bits", "lowdiff"}
# The leaderboard issue's quality targets for distillation methods: (metric, NFE, most allowed ratio to the teacher's
# 35-NFE Heun score, methods it applies to (None: all)); and every distilled method at 1 NFE below the best
# training-free solver at 4 NFE (checked separately).
TARGETS = {"tree": [("sw2", 1, 1.5, None), ("nll", 1, 1.5, None)],
           "digits": [("fid", 4, 1.5, None), ("fid", 1, 2.0, None), ("fid", 1, 1.10, {"dmd2"})]}
CACHE = ROOT / "benchmarks" / "runs" / "leaderboard"
# The scoring protocol, part of every score's cache key: a change here re-scores every model (not re-trains).
# "class labels: reference" (2026-12-05): a class-conditional model's classes in the reference set's proportions,
# where they were uniform random draws before (docs/evaluation.md).
SCORING = "class labels: reference"
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------ entries
def config_file(method: str, data: str) -> Path:
    """Where the config of `method` on `data` lives (configs/<method>/<data>.yaml unless CONFIG_OF says otherwise)."""
    pattern = CONFIG_OF.get(method)
    if isinstance(pattern, dict):
        pattern = pattern.get(data)
    return ROOT / "configs" / f"{(pattern or method + '/{data}').format(data=data)}.yaml"


def config_path(method: str, data: str) -> Path | None:
    path = config_file(method, data)
    return path if path.is_file() else None


def model_args(method: str, data: str) -> dict:
    """The `model.init_args` of a method's config on `data` ({} when it has none)."""
    import yaml

    path = config_path(method, data)
    return ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {} if path else {}


def autoguided_rows(data: str) -> list[str]:
    """Rows whose config distills with autoguidance (a `guide_ckpt`), each as 'name (lambda ~ U[lo, hi], sampled
    at x)': their samples are guided, the teachers' rows are not."""
    rows = []
    for method in METHODS:
        args = model_args(method, data)
        if args.get("guide_ckpt"):
            lo, hi = args.get("guidance_range", (1.0, 1.0))
            at = args.get("sampling_guidance") or 0.5 * (lo + hi)
            rows.append(f"{method} (lambda ~ U[{lo:g}, {hi:g}] against {Path(args['guide_ckpt']).name}, sampled at "
                        f"{at:g})")
    return rows


def regression_rows(data: str) -> list[str]:
    """DMD2-family rows whose config adds DMD's regression loss on teacher pairs, which the DMD2 paper drops: named
    in the report, so the row is not read as the paper's DMD2."""
    import inspect

    from lit_fewstep.methods.dmd import DMD2, regression_enabled

    default_weight = inspect.signature(DMD2).parameters["reg_weight"].default
    rows = []
    for method in ("dmd2", "msd"):
        args = model_args(method, data)
        weight, pairs_path = args.get("reg_weight", default_weight), args.get("pairs_path")
        if regression_enabled(pairs_path, args.get("reg_pairs", 0), weight):
            pairs = f"{args['reg_pairs']} teacher pairs" if pairs_path is None else f"the teacher pairs of {pairs_path}"
            rows.append(f"{method} (DMD's regression loss on {pairs}, weight {weight:g})")
    return rows


def entry_key(method: str, data: str, seed: int, overrides: list[str]) -> str:
    """The cache key of a trained model: its config's content (parsed, so that editing a comment or the layout
    does not retrain), the overrides and the seed."""
    import yaml

    content = json.dumps(yaml.safe_load(config_path(method, data).read_text()), sort_keys=True)
    return f"{method}-{hashlib.sha256((content + json.dumps([overrides, seed])).encode()).hexdigest()[:10]}"


def _byte_key(method: str, data: str, seed: int, overrides: list[str]) -> str:
    """The key caches made before keys were content-based (the config file's bytes): found, such a folder is
    renamed to its content key, so that a cache survives the change without retraining."""
    text = config_path(method, data).read_bytes() + json.dumps([overrides, seed]).encode()
    return f"{method}-{hashlib.sha256(text).hexdigest()[:10]}"


def ensure_pairs(method: str, data: str) -> list[str]:
    """The teacher pairs a method's config reads (PAIRS), made once into the cache; returns the fit override."""
    if method not in PAIRS:
        return []
    spec = PAIRS[method]
    out = CACHE / data / f"pairs_{spec['path']}_{spec['num'][data]}_nfe{spec['nfe'][data]}.pt"
    if not out.exists():
        from lit_fewstep.cli import pairs_main

        out.parent.mkdir(parents=True, exist_ok=True)
        pairs_main(["--teacher", spec["teacher"][data], "--num", str(spec["num"][data]), "--nfe",
                    str(spec["nfe"][data]), "--path", spec["path"], "--out", str(out)])  # written atomically
    return ["--model.init_args.pairs_path", str(out.relative_to(ROOT))]


def train_cached(method: str, data: str, seed: int, steps: int | None, hardware: list[str]) -> tuple[Path, dict]:
    """The exported model of `method` on `data` (trained now unless cached) and its training record."""
    from benchmarks.run import train

    overrides = (["--trainer.max_steps", str(steps)] if steps else []) + hardware
    overrides += ensure_pairs(method, data)
    key = entry_key(method, data, seed, overrides)
    folder = CACHE / data / key
    legacy = CACHE / data / _byte_key(method, data, seed, overrides)
    if not folder.exists() and (legacy / "train.json").exists():
        record = json.loads((legacy / "train.json").read_text())
        write_atomically(legacy / "train.json", json.dumps({**record, "key": key}))
        legacy.rename(folder)
    model, record_file = folder / "model.pt", folder / "train.json"
    if model.exists() and record_file.exists():
        record = json.loads(record_file.read_text())
        if method not in STAGED or "students" in record:
            return model, record
    entry = {"config": str(config_path(method, data).relative_to(ROOT)), "fit_args": overrides}
    exported, seconds, command = train(entry, f"leaderboard/{data}/fits", seed)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exported, model)
    record = {"train_wall_s": seconds, "command": command, "key": key, "fitted_at": utc_now(seconds=True)}
    if method in STAGED:
        record["students"] = keep_stage_students(exported.parent, folder)
    write_atomically(record_file, json.dumps(record))
    return model, record


def keep_stage_students(run: Path, folder: Path) -> dict[str, str]:
    """Copy the checkpoint that ends each progressive stage of the fit in `run` into the cache `folder`;
    {steps: file name}."""
    from benchmarks.guided_distillation import students

    kept = {}
    for steps, ckpt in students(run).items():
        name = f"student_{steps}_steps.ckpt"
        shutil.copyfile(ckpt, folder / name)
        kept[str(steps)] = name
    return kept


# ------------------------------------------------------------------------------------------------ scoring
def score_model(module, evaluator, nfes: list[int], seeds: list[int], num: int, options: dict) -> dict[int, dict]:
    """{nfe: metrics} with every metric the median over sampling seeds; NFEs the model cannot take are skipped."""
    rows = {}
    for nfe in nfes:
        if (module.max_nfe is not None and nfe > module.max_nfe) or nfe < module.min_nfe:
            continue
        per_seed, rates, spent = [], [], None
        for seed in seeds:
            x, _, spent, seconds = evaluator.sample(module, num, nfe, seed, **options)  # docs/evaluation.md
            per_seed.append(evaluator.score(x))
            rates.append(num / seconds)
        metrics = {k: statistics.median(s[k] for s in per_seed) for k in per_seed[0]}
        primary = "fid" if evaluator.is_image else "sw2"
        metrics[f"{primary}_per_seed"] = [s[primary] for s in per_seed]
        rows[nfe] = {**metrics, "nfe_spent": spent, "samples_per_s": statistics.median(rates)}
    return rows


def is_reference(teacher: dict) -> bool:
    """Whether a teacher row is the reference of every ratio: EDM's Heun on EDM's grid (rows recorded before grids
    were rows had no "grid": Karras)."""
    return teacher["solver"] == "heun" and teacher.get("grid", "karras") == "karras"


def teacher_label(teacher: dict) -> str:
    """'unipc' on the Karras grid, 'unipc, cosine grid' on another."""
    grid = teacher.get("grid", "karras")
    return teacher["solver"] + ("" if grid == "karras" else f", {grid} grid")


def best_free_solver(table: dict, primary: str) -> tuple[float, str]:
    """The teacher's best score at 4 NFE over its training-free solvers and grids, and which one it was."""
    best = min(table["teachers"], key=lambda t: t["rows"]["4"][primary])
    return best["rows"]["4"][primary], teacher_label(best)


def scored(name: str, data: str, path: Path, evaluator, seeds: list[int], num: int, nfes: list[int],
           options: dict, cache_file: Path) -> dict:
    """Scores of one model, cached in `cache_file` (keyed by the model's hash, seeds, num and options)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    key = json.dumps([digest, seeds, num, nfes, options, SCORING], sort_keys=True)
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached
    module = load(path)
    rows = score_model(module, evaluator, nfes, seeds, num, options)
    result = {"key": key, "name": name, "data": data, "model": f"{path.relative_to(ROOT)} sha256:{digest}",
              "iterations": int(module.iteration) if hasattr(module, "iteration") else None,
              "rows": {str(k): v for k, v in rows.items()}}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cache_file, json.dumps(result, indent=1))
    return result


def evaluator_for(data: str, seed: int):
    """The one evaluator of a data set: the teacher's recorded data module (else configs/edm/<data>.yaml's)."""
    from benchmarks.run import datamodule_of
    from lit_fewstep.evaluation import Evaluator
    from lit_fewstep.utils.checkpoint import load_module

    datamodule = datamodule_of(load_module(TEACHER[data]), {"config": f"configs/edm/{data}.yaml"})
    return Evaluator(datamodule, num_reference=10000, seed=seed)


def run(data: str, methods: list[str], seeds: list[int], num: int, steps: int | None, train_seed: int,
        hardware: list[str] = (), teachers: bool = True) -> dict:
    """Train (or reuse) and score `methods` on `data`, and the teachers' rows unless `teachers` is false (a
    method's worker: the pool's teachers job, or the report pass after it, scores those)."""
    evaluator = evaluator_for(data, train_seed)
    table = {"teachers": [], "methods": []}
    jobs = ([("teacher", s) for s in TEACHER_SOLVERS] + [("fm_teacher", "heun")] if teachers else []) + \
        [("method", m) for m in methods]
    for k, (kind, name) in enumerate(jobs, 1):
        print(f"[{k}/{len(jobs)}] {data}: {kind} {name}", flush=True)
        if kind == "fm_teacher":
            table["fm_teacher"] = scored("flow-matching teacher (heun)", data, ROOT / FM_TEACHER[data], evaluator,
                                         seeds, num, [35], {"solver": "heun"}, CACHE / data / "fm-teacher-heun.scores.json")
            continue
        if kind == "teacher":
            solver, grid = name
            nfes = NFES + ([35] if is_reference({"solver": solver, "grid": grid}) else [])
            options = {"solver": solver, **({} if grid == "karras" else {"grid": grid})}
            cache = CACHE / data / f"teacher-{solver}{'' if grid == 'karras' else '-' + grid}.scores.json"
            result = scored(f"teacher ({teacher_label(options)})", data, ROOT / TEACHER[data], evaluator, seeds, num,
                            nfes, options, cache)
            table["teachers"].append({**result, "solver": solver, "grid": grid})
            continue
        if config_path(name, data) is None:
            missing = f"no {config_file(name, data).relative_to(ROOT)} yet"
            table["methods"].append({"name": name, "data": data, "missing": missing})
            continue
        try:
            path, record = train_cached(name, data, train_seed, steps, list(hardware))
            options = SAMPLING.get(name, {})
            if "students" in record:  # the n-step student at n NFE
                parts = [scored(name, data, path.parent / file, evaluator, seeds, num, [int(n)], options,
                                path.parent / f"scores_{n}_steps.json") for n, file in record["students"].items()
                         if int(n) in NFES]
                result = {**parts[0], "rows": {k: v for part in parts for k, v in part["rows"].items()},
                          "model": ", ".join(part["model"] for part in parts),
                          "iterations": max(part["iterations"] or 0 for part in parts)}
            else:
                result = scored(name, data, path, evaluator, seeds, num, NFES, options, path.parent / "scores.json")
        except Exception as err:  # noqa: BLE001 -- one method failing must not stop the suite; its row says why
            table["methods"].append({"name": name, "data": data, "missing": f"failed: {str(err).splitlines()[0][:200]}"})
            continue
        table["methods"].append({**result, **record})
    return table


def longest_first(methods: list[str], data: str) -> list[str]:
    """`methods` by the training time recorded for each in the committed leaderboard, longest first (unknown ones
    last, in their given order): with a pool of workers, starting the longest fit first keeps it from running alone
    at the end (on digits CAF's fit alone is a quarter of the suite's training time)."""
    path = RESULTS / "leaderboard.json"
    recorded = {}
    if path.exists():
        table = json.loads(path.read_text()).get("tables", {}).get(data, {})
        recorded = {m["name"]: m["train_wall_s"] for m in table.get("methods", []) if m.get("train_wall_s")}
    return sorted(methods, key=lambda m: -recorded.get(m, 0.0))  # sorted is stable: unknown keep their order


def collectable(methods: list[str], data: str) -> list[str]:
    """What `--collect` reports for `data`: the methods scored in the cache, and those with no config for it (their
    row says "not yet"); a method with a config but nothing cached is left out rather than trained."""
    return [m for m in methods if config_path(m, data) is None or any((CACHE / data).glob(f"{m}-*/scores*.json"))]


TEACHERS_JOB = "teachers"  # the worker job that scores the teacher's solver rows (`--teachers_only`)


def run_in_workers(methods: list[str], jobs: int, logs: Path, command) -> dict[str, int]:
    """Run `command(method)` for every method, `jobs` processes at a time, the next starting as soon as one ends
    (output in logs/<method>.log); returns each method's exit code. A method a process failed to finish is left to
    the caller's serial pass, whose row then says why."""
    import subprocess

    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    waiting, running, codes = list(methods), {}, {}
    while waiting or running:
        while waiting and len(running) < jobs:
            method = waiting.pop(0)
            log = open(logs / f"{method}.log", "w")
            process = subprocess.Popen(command(method), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[method] = (process, log, time.perf_counter())
            print(f"{method} started ({len(running)} running, {len(waiting)} waiting; log {log.name})", flush=True)
        time.sleep(0.2)
        for method, (process, log, begun) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[method]
                codes[method] = process.returncode
                print(f"{method} ended with exit code {process.returncode} after {time.perf_counter() - begun:.0f} s",
                      flush=True)
    return codes


# ------------------------------------------------------------------------------------------------ report
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(data: str, table: dict, seeds: list[int], num: int) -> list[str]:
    primary, secondary = PRIMARY[data], SECONDARY.get(data)
    reference = next(t for t in table["teachers"] if is_reference(t))["rows"]["35"][primary]
    reference_2 = next(t for t in table["teachers"] if is_reference(t))["rows"]["35"].get(secondary)
    best_free_4, best_solver = best_free_solver(table, primary)
    lines = [f"## {data}", "",
             f"Primary metric: {primary} (lower is better), median over sampling seeds {seeds}, {num} samples each "
             "(classes in the reference set's proportions). "
             f"Teacher reference: Heun at 35 NFE, {primary} {reference:.4g}; best training-free solver at 4 NFE: "
             f"{best_free_4:.4g} ({best_solver}). Ratios are to the 35-NFE reference"
             + (f" ({secondary}: {reference_2:.4g})" if secondary and reference_2 else "") + ". CAF's and flow map's "
             "rows are distilled from the shipped flow-matching teacher of the same data (they live on the linear path)"
             + fm_reference(data, table, reference, reference_2) + "; guided "
             "distillation's row is, at n NFE, its n-step student, unguided. "
             + ("Distilled with autoguidance from a weak network of their teacher, as their papers distill, and "
                "sampled guided: " + ", ".join(guided) + ". " if (guided := autoguided_rows(data)) else "")
             + ("With DMD's regression loss added, which the DMD2 paper drops: " + ", ".join(reg) + ". "
                if (reg := regression_rows(data)) else "")
             + "'train s' is the fit's wall time as it "
             "ran (one thread, other fits beside it), comparable within one run only.", "",
             f"| model | {primary} @1 | @2 | @4 | @8 | ratio @1 | ratio @4 | beats best free solver @4 at 1 NFE | "
             + (f"{secondary} @1 | {secondary} ratio @1 | " if secondary else "") + "iterations | train s | images/s @1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if secondary else "")]

    def row(name, result, train_s="–", iterations="–"):
        values = [result["rows"].get(str(n), {}).get(primary) for n in NFES]
        one = values[0]
        ratio1 = one / reference if one is not None else None
        ratio4 = values[2] / reference if values[2] is not None else None
        beats = "–" if one is None else ("yes" if one < best_free_4 else "no")
        rate = result["rows"].get("1", {}).get("samples_per_s")
        extra = ""
        if secondary:
            second = result["rows"].get("1", {}).get(secondary)
            extra = f"| {_fmt(second)} | {_fmt(None if second is None or not reference_2 else second / reference_2)} "
        return (f"| {name} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(ratio1)} | {_fmt(ratio4)} | {beats} "
                f"{extra}| {iterations} | {train_s} | {_fmt(rate)} |")

    for t in table["teachers"]:
        lines.append(row(f"teacher, {teacher_label(t)} (no training)", t))
    for m in table["methods"]:
        if "missing" in m:
            lines.append(f"| {m['name']} | not yet ({m['missing']}) |" + " |" * (12 if secondary else 10))
        else:
            lines.append(row(m["name"], m, _fmt(m.get("train_wall_s")), _fmt(m.get("iterations"))))
    lines += ["", *targets(data, table), ""]
    commands = [m["command"] for m in table["methods"] if m.get("command")]
    if commands:
        lines += ["Trained with:", "```", *commands, "```", ""]
    return lines


def fm_teacher_scores(table: dict) -> dict:
    """The flow-matching teacher's metrics at 35 NFE ({} in tables made before it was scored)."""
    return table.get("fm_teacher", {}).get("rows", {}).get("35", {})


def fm_reference(data: str, table: dict, reference: float, reference_2: float | None) -> str:
    """The flow-matching teacher's own 35-NFE scores, as ratios to the EDM teacher's (the best its unguided students
    can do)."""
    fm = fm_teacher_scores(table)
    if not fm:
        return ""
    primary, secondary = PRIMARY[data], SECONDARY.get(data)
    second = (f", {secondary} {fm[secondary]:.4g} ({fm[secondary] / reference_2:.2f}x)"
              if secondary and reference_2 and secondary in fm else "")
    return (f", whose own score at 35 NFE (Heun) is {primary} {fm[primary]:.4g} ({fm[primary] / reference:.2f}x the "
            f"EDM teacher's){second}")


def targets(data: str, table: dict) -> list[str]:
    """Which distillation rows meet the leaderboard's targets (TARGETS), each with its ratio; from-scratch methods
    and rows not scored at the NFE (a one-step generator at 4 NFE) are said, not counted."""
    heun = next(t for t in table["teachers"] if is_reference(t))["rows"]
    primary = PRIMARY[data]
    best_free_4, best_solver = best_free_solver(table, primary)
    rows = [m for m in table["methods"] if "missing" not in m and m["name"] not in FROM_SCRATCH]
    lines = [f"Targets for the distillation rows (from-scratch rows, not held to them: "
             f"{', '.join(sorted(FROM_SCRATCH))}):", ""]
    # (title, nfe, ok, shown, metric, only, ratio to the teacher: a flow-matching teacher's score can miss it too)
    checks = [(f"{metric} @{nfe} within {limit}x of the teacher's 35-NFE {heun['35'][metric]:.4g}", nfe,
               lambda v, metric=metric, limit=limit: v / heun["35"][metric] <= limit,
               lambda v, metric=metric: f"{v / heun['35'][metric]:.2f}x", metric, only, True)
              for metric, nfe, limit, only in TARGETS[data]]
    checks.append((f"{primary} @1 below the best training-free solver @4 ({best_solver}: {best_free_4:.4g})", 1,
                   lambda v: v < best_free_4, lambda v: f"{v:.4g}", primary, None, False))
    fm = fm_teacher_scores(table)
    for title, nfe, ok, shown, metric, only, vs_teacher in checks:
        met, missed, absent = [], [], []
        # a row distilled from the flow-matching teacher, missing a target its own teacher misses too, says so
        own = (f" (its flow-matching teacher at 35 NFE: {shown(fm[metric])})"
               if vs_teacher and metric in fm and not ok(fm[metric]) else "")
        for m in rows:
            if only is not None and m["name"] not in only:
                continue
            value = m["rows"].get(str(nfe), {}).get(metric)
            if value is None:
                absent.append(m["name"])
            else:
                (met if ok(value) else missed).append(
                    f"{m['name']} {shown(value)}" + (own if m["name"] in FROM_FM_TEACHER and not ok(value) else ""))
        lines.append(f"- {title}: met by {len(met)} of {len(met) + len(missed)}"
                     + (f" ({', '.join(met)})" if met else "") + (f"; missed: {', '.join(missed)}" if missed else "")
                     + (f"; not scored at {nfe} NFE: {', '.join(absent)}" if absent else ""))
    return lines


def svg_lines(series: dict[str, list[tuple[float, float]]], dashed: set[str], title: str, xlabel: str, ylabel: str,
              log_x: bool = True, log_y: bool = True) -> str:
    """A small self-contained SVG line chart (no plotting library is a dependency of this package)."""
    W, H, L, R, T, B = 760, 460, 70, 210, 40, 50
    points = [p for pts in series.values() for p in pts if p[1] is not None and p[1] > 0 and p[0] > 0]
    if not points:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(fx(p[0]) for p in points), max(fx(p[0]) for p in points)
    y0, y1 = min(fy(p[1]) for p in points), max(fy(p[1]) for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def X(v):
        return L + (fx(v) - x0) / (x1 - x0) * (W - L - R)

    def Y(v):
        return H - B - (fy(v) - y0) / (y1 - y0) * (H - T - B)

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='11'>",
           "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{W / 2}' y='20' text-anchor='middle' font-size='14'>{title}</text>",
           f"<line x1='{L}' y1='{H - B}' x2='{W - R}' y2='{H - B}' stroke='black'/>",
           f"<line x1='{L}' y1='{T}' x2='{L}' y2='{H - B}' stroke='black'/>",
           f"<text x='{(L + W - R) / 2}' y='{H - 12}' text-anchor='middle'>{xlabel}</text>",
           f"<text x='16' y='{(T + H - B) / 2}' transform='rotate(-90 16 {(T + H - B) / 2})' text-anchor='middle'>"
           f"{ylabel}</text>"]
    for v in sorted({p[0] for p in points}):
        out.append(f"<text x='{X(v):.1f}' y='{H - B + 15}' text-anchor='middle'>{v:g}</text>")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = y0 + frac * (y1 - y0)
        shown = 10 ** value if log_y else value
        ypix = H - B - frac * (H - T - B)
        out.append(f"<text x='{L - 6}' y='{ypix + 4:.1f}' text-anchor='end'>{shown:.3g}</text>")
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if p[1] is not None and p[1] > 0 and p[0] > 0]
        if not pts:
            continue
        color = colors[i % len(colors)]
        dash = " stroke-dasharray='5,4'" if name in dashed else ""
        path = " ".join(f"{X(px):.1f},{Y(py):.1f}" for px, py in pts)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='2'{dash}/>")
        out += [f"<circle cx='{X(px):.1f}' cy='{Y(py):.1f}' r='3' fill='{color}'/>" for px, py in pts]
        ly = T + 14 * i
        out.append(f"<line x1='{W - R + 10}' y1='{ly}' x2='{W - R + 30}' y2='{ly}' stroke='{color}' stroke-width='2'"
                   f"{dash}/><text x='{W - R + 35}' y='{ly + 4}'>{name}</text>")
    out.append("</svg>")
    return "\n".join(out)


def figures(data: str, table: dict) -> list[str]:
    primary = PRIMARY[data]
    nfe_series, dashed = {}, set()
    for t in table["teachers"]:
        name = f"teacher {teacher_label(t)}"
        nfe_series[name] = [(n, t["rows"].get(str(n), {}).get(primary)) for n in NFES]
        dashed.add(name)
    time_series = {}
    for m in table["methods"]:
        if "missing" in m:
            continue
        nfe_series[m["name"]] = [(n, m["rows"][str(n)][primary]) for n in NFES if str(n) in m["rows"]]
        if m.get("train_wall_s") and "1" in m["rows"]:
            time_series[m["name"]] = [(m["train_wall_s"], m["rows"]["1"][primary])]
    names = []
    for suffix, series, xlabel, log_x in (("nfe", nfe_series, "NFE", True), ("time", time_series, "training wall time (s)", True)):
        path = RESULTS / f"leaderboard_{data}_{suffix}.svg"
        title = f"{data}: {primary} vs {'NFE' if suffix == 'nfe' else 'training time (1 NFE)'}"
        path.write_text(svg_lines(series, dashed if suffix == "nfe" else set(), title, xlabel, primary, log_x))
        names.append(path.name)
    return names


README = ROOT / "README.md"
README_START = "<!-- leaderboard:start: generated by benchmarks/leaderboard.py from benchmarks/results/leaderboard.json -->"
README_END = "<!-- leaderboard:end -->"


def readme_section(tables: dict[str, dict], runs: dict) -> list[str]:
    """The README's results: one table (every row of every data set at NFE 1, 2, 4, 8, its ratio to the teacher's
    35-NFE Heun score at 1 NFE) and one figure (quality vs NFE on the first data set)."""
    lines = ["| data | model | metric | @1 | @2 | @4 | @8 | @1 / teacher at 35 NFE |", "|---|---|---|---|---|---|---|---|"]
    for data, table in tables.items():
        primary = PRIMARY[data]
        reference = next(t for t in table["teachers"] if is_reference(t))["rows"]["35"][primary]
        rows = [(f"teacher, {teacher_label(t)} (no training)", t) for t in table["teachers"]]
        rows += [(m["name"], m) for m in table["methods"] if "missing" not in m]
        for name, result in rows:
            values = [result["rows"].get(str(n), {}).get(primary) for n in NFES]
            ratio = None if values[0] is None else values[0] / reference
            lines.append(f"| {data} | {name} | {primary} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(ratio)} |")
        listed = {m["name"] for m in table["methods"]}
        missing = [m["name"] for m in table["methods"] if "missing" in m] + [m for m in METHODS if m not in listed]
        if missing:
            lines.append(f"| {data} | not yet: {', '.join(missing)} ||||||| ")
    info = "; ".join(f"{data}: medians over sampling seeds {runs[data]['seeds']}, {runs[data]['num']} samples, "
                     f"{runs[data]['machine'].split(';')[0]}, git {runs[data]['git']}" for data in tables)
    first = next(iter(tables))
    return [README_START, "", f"From [`benchmarks/results/leaderboard.md`](benchmarks/results/leaderboard.md) ({info}); "
            "sliced W2 (tree) and FID (digits): lower is better; the teacher's 35-NFE Heun score is the reference. "
            "Commands, budgets, training times and images/s are in that file.", "", *lines, "",
            f"![quality vs NFE on {first}](benchmarks/results/leaderboard_{first}_nfe.svg)", "", README_END]


def update_readme(tables: dict[str, dict], runs: dict) -> bool:
    """Rewrite the README's generated results between its markers; False (README untouched) if it has none."""
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    README.write_text(head + "\n".join(readme_section(tables, runs)) + tail)
    return True


def merge_rows(previous: dict, table: dict) -> dict:
    """`previous` with the rows that `table` has (teachers by solver, methods by name) replaced by its rows, in the
    table's order: how a run of a few methods (`--only`) updates a table without dropping the rows it did not run."""
    new = {m["name"]: m for m in table["methods"]}
    methods = [new.pop(m["name"], m) for m in previous.get("methods", [])] + list(new.values())
    order = {name: k for k, name in enumerate(METHODS)}
    methods.sort(key=lambda m: order.get(m["name"], len(order)))
    return {**previous, **{k: v for k, v in table.items() if k != "methods"}, "methods": methods}


def partial(args, data: str, runs: dict) -> bool:
    """Whether this run's rows of `data` go into the recorded table (`--only`) rather than replace it; a table
    scored with other seeds or sample counts cannot take them."""
    if not (args.only or args.teachers_only) or args.collect or data not in runs:
        return False
    if (runs[data]["seeds"], runs[data]["num"]) != (args.seeds, args.num):
        raise SystemExit(f"--only: the recorded {data} table was scored over seeds {runs[data]['seeds']} with "
                         f"{runs[data]['num']} samples each; re-run these rows with the same --seeds / --num, or the "
                         f"whole table without --only.")
    return True


def utc_now(seconds: bool = False) -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(f"%Y-%m-%d %H:%M{':%S' if seconds else ''} UTC")


def reused_fits(table: dict, started: str) -> list[str]:
    """Rows of `table` whose model was trained before the run that started at `started` (a cached fit; records from
    before fits were dated count as cached)."""
    def when(stamp: str) -> datetime.datetime:  # runs started before 2026-12-05 are dated to the minute
        return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M" + (":%S" if stamp.count(":") == 2 else "") + " UTC")

    return [m["name"] for m in table["methods"] if "missing" not in m
            and ("fitted_at" not in m or when(m["fitted_at"]) < when(started))]


def write_report(tables: dict[str, dict], args, started: str, seconds: float) -> Path:
    json_path = RESULTS / "leaderboard.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged, runs = dict(previous.get("tables", {})), dict(previous.get("runs", {}))
    for data, table in tables.items():
        this_run = {"command": exact_command(), "machine": machine(), "git": git_state(), "started": started,
                    "wall_s": seconds, "seeds": args.seeds, "num": args.num}
        is_partial = partial(args, data, runs)
        reused = [] if args.collect or is_partial else reused_fits(table, started)
        if is_partial:
            # a partial run: its rows (and the teachers, re-scored) replace the old ones; the rest keep their run
            merged[data] = merge_rows(merged[data], table)
            runs[data] = {**runs[data], "updates": [*runs[data].get("updates", []),
                                                    {**this_run, "rows": args.only or []}]}
        elif args.collect and data in runs:
            # a report from cached scores trains nothing: the suite's wall time stays the recorded run's
            merged[data] = table
            runs[data] = {**runs[data], "updates": [*runs[data].get("updates", []),
                                                    {**this_run, "rows": [], "collected": True}]}
        elif reused and data in runs:
            # every row, but some from fits cached before the run: its wall time is not the suite's, so the last
            # end-to-end run stays the table's run (benchmarks/suite_time.py measures from it), this one an update
            merged[data] = table
            trained = [m["name"] for m in table["methods"] if "missing" not in m and m["name"] not in reused]
            runs[data] = {**runs[data], "updates": [*runs[data].get("updates", []),
                                                    {**this_run, "rows": trained, "reused_fits": reused}]}
        else:  # a first `--collect` becomes the table's run, marked so that nobody reads its wall time as the suite's
            merged[data], runs[data] = table, {**this_run, **({"collected": True} if args.collect else {})}
    return render(merged, runs)


def updated_rows(rows: list[str], reused: list[str] = (), collected: bool = False) -> str:
    """What a partial run re-ran: some methods' rows (and, always, the teachers'), or the teachers' alone; for
    a run of every row that reused cached fits, which rows it trained; for `--collect`, that it trained nothing."""
    if collected:
        return "the table collected from the cached scores (`--collect`: nothing trained or scored)"
    if reused:
        return (f"every row re-scored and rows {', '.join(rows) or 'none'} re-trained (the cached fits of "
                f"{', '.join(reused)} reused)")
    return (f"rows {', '.join(rows)} (and the teachers' rows)" if rows else "the teachers' rows") + " re-run"


def render(merged: dict[str, dict], runs: dict) -> Path:
    """leaderboard.md, .json, the figures and the README's section from recorded tables and runs."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "leaderboard.json"
    lines = ["# Leaderboard", "",
             "Every method from the same shipped EDM teacher, one evaluator (`lit_fewstep.evaluation.Evaluator`), at equal "
             "NFE; the teacher itself with training-free solvers as the no-training baseline. Written by "
             "`benchmarks/leaderboard.py` (budgets and caching: its docstring).", ""]
    for data, table in merged.items():
        info = runs.get(data, {})
        lines += [f"- {data}: `{info.get('command')}`; machine: {info.get('machine')}; git {info.get('git')}; "
                  f"started {info.get('started')}, {info.get('wall_s', 0):.0f} s"
                  + (" (a `--collect` report: nothing trained or scored)" if info.get("collected") else "")]
        lines += [f"  - then {updated_rows(u['rows'], u.get('reused_fits', []), u.get('collected', False))}: "
                  f"`{u['command']}`; machine: "
                  f"{u['machine']}; git {u['git']}; started {u['started']}, {u['wall_s']:.0f} s"
                  for u in info.get("updates", [])]
    lines.append("")
    for data, table in merged.items():
        lines += markdown(data, table, runs[data]["seeds"], runs[data]["num"])
        lines += [f"![{name}]({name})" for name in figures(data, table)] + [""]
    out = RESULTS / "leaderboard.md"
    out.write_text("\n".join(lines) + "\n")
    json_path.write_text(json.dumps({"tables": merged, "runs": runs}, indent=1, default=lambda v: None))
    update_readme(merged, runs)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/leaderboard.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["tree"], choices=sorted(TEACHER))
    parser.add_argument("--only", nargs="+", default=None, choices=METHODS, help="these methods only")
    parser.add_argument("--teachers_only", action="store_true",
                        help="re-score the teachers' rows alone (e.g. after a solver or grid was added); the methods' "
                             "rows of the recorded table stay")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds (medians over them)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--num", type=int, default=2000, help="samples per score")
    parser.add_argument("--steps", type=int, default=None, help="one trainer.max_steps for every method")
    parser.add_argument("--collect", action="store_true", help="no training: the report from what is cached")
    parser.add_argument("--accelerator", default=None, help="passed to fit as --trainer.accelerator (e.g. gpu)")
    parser.add_argument("--devices", default=None, help="passed to fit as --trainer.devices")
    parser.add_argument("--no_report", action="store_true", help="train and score only (SLURM array tasks)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods trained and scored side by side, one process each (e.g. 2 on a 2-core machine)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number of processes, got {args.jobs}")
    def hardware_flags(prefix: str) -> list[str]:  # "trainer." for fit, "" for this script's own workers
        return [*([f"--{prefix}accelerator", args.accelerator] if args.accelerator else []),
                *([f"--{prefix}devices", str(args.devices)] if args.devices else [])]

    hardware = hardware_flags("trainer.")
    started = utc_now(seconds=True)
    start = time.perf_counter()
    tables = {}
    recorded = RESULTS / "leaderboard.json"
    if not args.no_report and recorded.exists():
        recorded_runs = json.loads(recorded.read_text()).get("runs", {})
        for data in args.data:  # before any training: a partial run must fit the recorded table
            partial(args, data, recorded_runs)
    for data in args.data:
        methods = [] if args.teachers_only else args.only or METHODS
        if args.collect:  # per data set: what is cached for it
            methods = collectable(methods, data)
        elif args.jobs > 1 and methods:
            shared = ["--data", data, "--seeds", *map(str, args.seeds), "--seed", str(args.seed), "--num",
                      str(args.num), "--no_report", *(["--steps", str(args.steps)] if args.steps else []),
                      *hardware_flags("")]
            trainable = [m for m in methods if config_path(m, data) is not None]
            order = trainable if args.only else longest_first(trainable, data)
            # the teachers' rows are one job of the pool, started beside the longest fit, rather than a serial step
            # before it that leaves every other core idle (on the tree their scores take minutes)
            order = order[:1] + [TEACHERS_JOB] + order[1:]
            run_in_workers(order, args.jobs, CACHE / data / "logs",
                           lambda job: [sys.executable, __file__, *shared,
                                        *(["--teachers_only"] if job == TEACHERS_JOB else ["--only", job])])
        in_table_order = [m for m in METHODS if m in methods]  # --only's order is the order workers start in
        # a method's worker (or SLURM array task) leaves the teachers' rows to the teachers job or the report pass
        tables[data] = run(data, in_table_order, args.seeds, args.num, args.steps, args.seed, hardware,
                           teachers=not (args.no_report and args.only))
    if args.no_report:
        return tables
    out = write_report(tables, args, started, time.perf_counter() - start)
    print(f"wrote {out}")
    return tables


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
