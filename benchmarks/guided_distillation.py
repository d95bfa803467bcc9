"""Guided distillation (Meng et al. 2023) against its classifier-free guided teacher, at every student of one fit.

One fit of `configs/guided_distillation/<data>.yaml` runs stage 1 (guidance distillation) and then the progressive
halvings 16 -> 8 -> 4 -> 2 -> 1 steps; the config keeps a checkpoint every 500 iterations, i.e. at the end of every
stage, so the 8-, 4-, 2- and 1-step students are each evaluated from the checkpoint that ends their stage (the
student's steps are read from the checkpoint: `current_steps(iteration - 1)`, the stage its last update belonged to).
Every student is sampled with its own number of DDIM steps at each guidance scale, and the guided teacher (the shipped
EDM asset the fit distilled) with 35-step Heun at the same scale (CFG: two evaluations per step).

Scales are the package's EDM2 scales s (1 = no guidance); Meng et al.'s w is s - 1, so their w in {0, 1, 2, 4} is
`--scales 1 2 3 5`. Metrics: toys against exact samples of the data (sw2 = sliced W2, nll = exact negative
log-likelihood of the samples) and, as a check that the guidance itself was distilled, `sw2_to_teacher` (sliced W2
between the student's samples and the guided teacher's at the same scale and seed; on the teacher's row, its samples
against another seed's: the floor at this sample count); digits: FID on the shipped digits
classifier's features. Medians over the sampling seeds; the claim checked is student / teacher <= 1.2 on the
primary metric (sw2 or FID).

    OMP_NUM_THREADS=1 python benchmarks/guided_distillation.py --data tree [--run DIR] [--num 5000] [--seeds 0 1 2]

`--stages` adds two rows per scale that bound every student from below: the stage-1 model and the conditional teacher
(the student reset to the teacher at iteration 0), each with the first halving's N DDIM steps.

Without --run the fit is run first (benchmarks/run.py `train`); --run reuses the log folder of a fit
(`.../guided_distillation_<data>/version_N`), and the results name that fit's options, read back from the
`config.yaml` LightningCLI saved there. Several folders after --run (training seeds, variants) are scored in one
process against the same teacher samples, which are most of the time at 35 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import PRIMARY, exact_command, git_state, load, train  # noqa: E402
from lit_fewstep.evaluation import LABEL_DRAWS  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

TEACHER_NFE = 35
CLAIM = 1.2


def yaml_value(value) -> str:
    """A config value as the CLI reads it back, with no spaces: a string as it is, anything else as JSON (true, null,
    [1.0,5.0])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def fit_command_of(run: Path, config: str) -> str:
    """The fit command of a finished run, read back from the configuration LightningCLI saved in its folder: the
    config file plus an option for the training seed, every model argument and every trainer or logger setting of the
    file that the run changed (a model argument the file leaves out counts when it differs from the class's default)."""
    import importlib
    import inspect

    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    base = yaml.safe_load((ROOT / config).read_text())
    options = []
    if saved.get("seed_everything") != base.get("seed_everything"):  # another training seed
        options.append(f"--seed_everything {yaml_value(saved.get('seed_everything'))}")
    for key, value in base.get("trainer", {}).items():
        ran_with = saved["trainer"].get(key)
        if not isinstance(value, (dict, list)) and ran_with != value:
            options.append(f"--trainer.{key} {yaml_value(ran_with)}")
    saved_logger, base_logger = saved["trainer"].get("logger") or {}, base.get("trainer", {}).get("logger") or {}
    for key, value in base_logger.get("init_args", {}).items():
        ran_with = saved_logger.get("init_args", {}).get(key)
        if ran_with != value:
            options.append(f"--trainer.logger.init_args.{key} {yaml_value(ran_with)}")
    module_name, _, class_name = saved["model"]["class_path"].rpartition(".")
    signature = inspect.signature(getattr(importlib.import_module(module_name), class_name))
    base_args = base["model"].get("init_args", {})
    for key, value in saved["model"].get("init_args", {}).items():
        parameter = signature.parameters.get(key)
        expected = base_args[key] if key in base_args else (parameter.default if parameter else value)
        if value != (list(expected) if isinstance(expected, tuple) else expected):  # YAML saves tuples as lists
            options.append(f"--model.init_args.{key} {yaml_value(value)}")
    return " ".join(["python -m lit_fewstep fit --config", config, *options])


def stage_checkpoints(run: Path, every: list | None = None) -> tuple[dict[int, Path], Path | None]:
    """One pass over the fit's checkpoints: {student steps: the checkpoint that ends that progressive stage (its last
    update in the stage)}, and the checkpoint that ends stage 1 (the guidance-conditioned model) if the fit kept it.
    `every` (a list) receives (iteration, steps, path) of every checkpoint of a progressive stage."""
    found: dict[int, tuple[int, Path]] = {}
    stage_one = None
    for ckpt in (run / "checkpoints").glob("*step=*.ckpt"):
        module = load(ckpt)
        iteration = int(module.iteration)
        steps = module.current_steps(iteration - 1)
        if steps is not None and every is not None:
            every.append((iteration, steps, ckpt))
        if steps is not None and (steps not in found or iteration > found[steps][0]):
            found[steps] = (iteration, ckpt)
        if iteration > 0 and steps is None and module.current_steps(iteration) is not None:
            stage_one = ckpt
    if not found:
        raise FileNotFoundError(f"--run: no checkpoint of a progressive stage under {run / 'checkpoints'}; the config "
                                f"must keep them (ModelCheckpoint save_top_k: -1, every_n_train_steps at stage ends).")
    return {steps: path for steps, (_, path) in sorted(found.items(), reverse=True)}, stage_one


def students(run: Path) -> dict[int, Path]:
    """{student steps: checkpoint} for the checkpoints that end each progressive stage (last update in that stage)."""
    return stage_checkpoints(run)[0]


def sliced_w2(x: torch.Tensor, y: torch.Tensor) -> float:
    from lit_fewstep.metrics.distribution import SlicedWasserstein2

    metric = SlicedWasserstein2()
    metric.update(fake=x, real=y)
    return float(metric.compute())


def score(evaluator, x: torch.Tensor) -> dict:
    """Digits: `Evaluator.score` (FID, precision / recall). Toys: only sliced W2 and the exact NLL, the two metrics
    of the claim; the Evaluator's MMD and k-NN precision / recall cost about 40 s each per 5,000 samples here."""
    if evaluator.is_image:
        return evaluator.score(x)
    return {"sw2": sliced_w2(x, evaluator.real), "nll": float(-evaluator.log_prob(x.double()).mean())}


def evaluate(module, evaluator, nfe: int, scale: float, seeds, num: int, teacher_samples=None,
             class_labels: str = "reference", **options) -> tuple[dict, dict]:
    """Per-seed scores and samples of `module` at `nfe` and guidance `scale`. Toys: with `teacher_samples`, also the
    sliced W2 to the teacher's samples of the same seed; without, the teacher's own seed-to-seed value (its samples
    against the next seed's), the floor of that column at this sample count."""
    scores, samples = {}, {}
    for seed in seeds:
        x, _, spent, _ = evaluator.sample(module, num, nfe, seed, class_labels=class_labels, guidance_scale=scale,
                                          **options)
        scores[seed], samples[seed] = {"nfe_spent": spent, **score(evaluator, x)}, x
        if teacher_samples is not None and not evaluator.is_image:
            scores[seed]["sw2_to_teacher"] = sliced_w2(x, teacher_samples[seed])
    if teacher_samples is None and not evaluator.is_image and len(seeds) > 1:
        for seed, other in zip(seeds, seeds[1:] + seeds[:1]):
            scores[seed]["sw2_to_teacher"] = sliced_w2(samples[seed], samples[other])
    return scores, samples


def stage_bounds(stage_one: Path | None, student_path: Path) -> list[tuple[str, object, int]]:
    """(name, model, DDIM steps) of what bounds every progressive student: the N-step DDIM of the stage-1 model (what
    the first halving distils) and of the guided teacher itself on that grid (every step asks the CFG teacher, as
    stage 1's target does; at s = 1 the conditional teacher), the floor of any student distilled through the grid."""
    on_grid = load(student_path)
    n = 2 * on_grid.student_steps[0]  # the first halving distils the stage-1 model at twice its steps
    on_grid.model_x0 = lambda net, z_t, t, y, scale: on_grid.guidance_target(z_t, t, y, scale)
    bounds = [("guided teacher (2 evaluations per step), DDIM", on_grid, n)]
    if stage_one is not None:
        model = load(stage_one)
        bounds.insert(0, (f"stage-1 model ({int(model.iteration)} it), DDIM", model, n))
    return bounds


def median_row(per_seed: dict) -> dict:
    keys = [k for k in next(iter(per_seed.values())) if k != "nfe_spent"]
    return {k: statistics.median(r[k] for r in per_seed.values()) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["tree", "digits"], default="tree")
    parser.add_argument("--run", nargs="+", default=None, help="log folder of a finished fit (default: fit now); "
                        "several (e.g. training seeds) are scored against the same teacher samples, each row named "
                        "by its run")
    parser.add_argument("--students", default=None, help="instead of --run: a leaderboard cache folder "
                        "(benchmarks/runs/leaderboard/<data>/guided_distillation-<hash>) with its stage students")
    parser.add_argument("--class_labels", choices=LABEL_DRAWS, default="reference",
                        help="classes of the samples: the reference's proportions (default since 2026-12-05) or "
                             "uniform draws (the tables before)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], help="EDM2 scales (w + 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="students to evaluate (default: all)")
    parser.add_argument("--num", type=int, default=5000, help="samples per score")
    parser.add_argument("--num_reference", type=int, default=10000, help="toy reference samples")
    parser.add_argument("--out", default=None, help="default benchmarks/results/guided_distillation_<data>.md")
    parser.add_argument("--along", type=int, default=None, metavar="STEPS",
                        help="score every kept checkpoint of the STEPS-step student's stage instead of its last one "
                        "(how that stage's student improves with its iterations)")
    parser.add_argument("--stages", action="store_true", help="also score where the students' error comes from: the "
                        "guided teacher and the stage-1 model, each with the first halving's N DDIM steps")
    parser.add_argument("--clip_x0", default=None, metavar="BOUND|none",
                        help="the students' (and --stages rows') clipping of the data prediction at sampling, instead "
                             "of each checkpoint's own `clip_x0`: a bound (1 for images in [-1, 1]) or none")
    parser.add_argument("--stochastic", action="store_true",
                        help="also score each student with Meng et al.'s stochastic N-step sampler (a row of its own)")
    args = parser.parse_args()
    try:
        clip_x0 = None if args.clip_x0 in (None, "none") else float(args.clip_x0)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError
    except ValueError:
        parser.error(f"--clip_x0: a positive bound or none, got {args.clip_x0!r}")
    torch.set_num_threads(1)
    from lit_fewstep.evaluation import Evaluator
    from lit_fewstep.utils.config import instantiate

    start = time.time()
    config = f"configs/guided_distillation/{args.data}.yaml"
    fitted = args.run is None and args.students is None
    if fitted:
        model, _, fit_command = train({"config": config}, "guided_distillation", 0)
        runs, fit_commands = [model.parent], [fit_command]
    elif args.students:  # the leaderboard's cache keeps the checkpoint that ends each stage, not the fit's folder
        runs, fit_commands = [Path(args.students)], [None]
    else:  # a fit made by hand with options: name them
        runs = [Path(run) for run in args.run]
        fit_commands = [fit_command_of(run, config) if (run / "config.yaml").exists() else None for run in runs]
    if (args.stages or args.along is not None) and (args.students or len(runs) > 1):
        raise SystemExit("--stages and --along need the checkpoints of one fit's own folder (one --run).")
    # (run label, steps, checkpoint) to score: each stage's last checkpoint, or with --along all of one stage's
    to_score, bounds = [], []
    for run in runs:
        every = []
        if args.students:
            record = json.loads((run / "train.json").read_text())
            found, stage_one = {int(n): run / name for n, name in record["students"].items()}, None
        else:
            found, stage_one = stage_checkpoints(run, every)
        if args.stages:
            bounds = stage_bounds(stage_one, next(iter(found.values())))
        if args.steps:
            found = {k: v for k, v in found.items() if k in args.steps}
        label = f"{run}, " if len(runs) > 1 else ""
        to_score += ([(label, steps, path) for _, steps, path in sorted(every, key=lambda e: e[0])
                      if steps == args.along] if args.along is not None else
                     [(label, steps, path) for steps, path in found.items()])
    if not to_score:
        raise SystemExit(f"--along {args.along}: no kept checkpoint of a {args.along}-step stage under {runs[0]}")
    first = load(to_score[0][2])
    teacher = load(ROOT / first.teacher_ckpt)
    evaluator = Evaluator(instantiate(first.data_config), num_reference=args.num_reference, seed=0)
    primary = PRIMARY[evaluator.is_image]

    rows = []

    def distilled(module) -> tuple[object, str]:
        """A student or bound as scored (with --clip_x0, that clipping at sampling instead of its own) and the
        suffix that names its clipping in the table."""
        if args.clip_x0 is not None:
            module.clip_x0 = clip_x0
        return module, (f", x0 clipped to ±{module.clip_x0:g}" if module.clip_x0 is not None else "")

    def add_row(name: str, module, steps: int, scale: float, teacher_x=None, reference=None, options=None,
                **extra) -> tuple:
        """Score `module` at `steps` and `scale`; with `reference` (the teacher's row), its primary-metric ratio."""
        per_seed, samples = evaluate(module, evaluator, steps, scale, args.seeds, args.num, teacher_x,
                                     args.class_labels, **(options or {}))
        row = {"model": name, "steps": steps, "scale": scale, "nfe_spent": per_seed[args.seeds[0]]["nfe_spent"],
               "per_seed": per_seed, **median_row(per_seed), **extra}
        if reference is not None:
            row["ratio"] = row[primary] / reference[primary]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "per_seed"}, flush=True)
        return row, samples

    for scale in args.scales:
        teacher_row, teacher_x = add_row("teacher (Heun)", teacher, TEACHER_NFE, scale)
        for name, module, steps in bounds:
            module, clipped = distilled(module)
            add_row(name + clipped, module, steps, scale, teacher_x, teacher_row, diagnostic=True)
        for label, steps, path in to_score:
            student, clipped = distilled(load(path))
            ckpt = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
            name = f"{label}student ({int(student.iteration)} it){clipped}"
            add_row(name, student, steps, scale, teacher_x, teacher_row, ckpt=ckpt, clip_x0=student.clip_x0)
            if args.stochastic:
                add_row(f"{name}, stochastic sampler", student, steps, scale, teacher_x, teacher_row,
                        options={"stochastic": True}, ckpt=ckpt, clip_x0=student.clip_x0)
    write(rows, args, primary, runs, config, fit_commands, time.time() - start, fitted=fitted)


def write(rows, args, primary, runs, config, fit_commands, seconds, fitted: bool = False) -> None:
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"guided_distillation_{args.data}.md")
    extra = ["nll", "sw2_to_teacher"] if primary == "sw2" else []
    head = ["model", "steps", "NFE", "scale s (Meng w)", primary, *extra, f"{primary} / teacher's"]
    lines = [f"# Guided distillation on {args.data}: students vs the guided teacher", "",
             f"- command: `{exact_command()}`",
             *(f"- fit: `{fit_command or 'python -m lit_fewstep fit --config ' + config}` (run folder `{run}`)"
               for run, fit_command in zip(runs, fit_commands)),
             f"- machine: {describe_machine()}; git {git_state()}; {seconds / 60:.1f} min"
             f"{' including the fit' if fitted else ' (evaluation only)'}",
             f"- sampling seeds {args.seeds} (medians below; per-seed values in the JSON), {args.num} samples per score"
             + (f", {args.num_reference} exact reference samples (seed 0)" if primary == "sw2" else
                ", FID against the training split on the shipped digits classifier's features"),
             f"- teacher: the shipped EDM asset the fit distilled, {TEACHER_NFE}-step Heun with CFG at the same scale "
             "(two evaluations per step); students: DDIM with their own number of steps, one evaluation per step",
             "- scales are EDM2 scales s (1 = no guidance); Meng et al.'s w = s - 1", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["steps"]), str(r["nfe_spent"]), f"{r['scale']:g} ({r['scale'] - 1:g})",
                 f"{r[primary]:.4f}", *(f"{r[k]:.4f}" if k in r else "–" for k in extra),
                 f"{r['ratio']:.2f}" if "ratio" in r else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    student_rows = [r for r in rows if "ratio" in r and not r.get("diagnostic")]
    met = [r for r in student_rows if r["ratio"] <= CLAIM]
    lines += ["", f"Within {CLAIM}x of the teacher's {primary} at the same scale: {len(met)} of {len(student_rows)} "
              f"(student steps, scale): " + ", ".join(f"({r['steps']}, {r['scale']:g}) {r['ratio']:.2f}"
                                                     for r in student_rows), ""]
    out.write_text("\n".join(lines))
    one = len(runs) == 1  # a single run keeps the scalar fields of the tables written before several were allowed
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "command": exact_command(),
                                                     "fit": fit_commands[0] if one else fit_commands,
                                                     "run": str(runs[0]) if one else [str(r) for r in runs],
                                                     "machine": describe_machine(),
                                                     "git": git_state(), "seeds": args.seeds, "num": args.num},
                                                    indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
