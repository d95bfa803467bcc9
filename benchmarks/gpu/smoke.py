"""GPU smoke benchmark: every method's digits config, a few hundred iterations in mixed precision on one GPU, then DDP.

    python benchmarks/gpu/smoke.py                      # a GPU machine: writes benchmarks/results/gpu_smoke.md (+ .json)
    python benchmarks/gpu/smoke.py --accelerator cpu --methods cd dmd2 --iterations 3 --out /tmp/smoke.md  # dry run

Per method (configs/<method>/digits.yaml, its batch size and learning rates, untrained student as the config builds
it, seed 0), in `--precision` (bf16-mixed by default; see docs/precision.md):
- fit `--iterations` iterations with Lightning on one device: iterations/s (median batch time after the first 10%),
  peak GPU memory (torch.cuda.max_memory_allocated over the fit);
- `benchmarks/timing.py::training_step_ratio` on the trained module: median step time against the sum of its network
  passes replayed alone (the floor), under the same autocast;
- images/s of `sample()` at the model's own step count (`default_nfe`) at `--batch`, under the same autocast, and the
  shipped EDM digits teacher's images/s at 35 NFE (Heun), so "vs teacher" is the speed-up of the model's sampler.
Targets checked in the table (issue "GPU readiness"): DMD2 step <= 1.15x its network passes; sCD step <= 3x a CD step;
one-step sampling >= 30x the teacher's 35-NFE throughput at batch 1,000.
DDP: every method's config again under `python -m lit_fewstep fit --trainer.strategy ddp_find_unused_parameters_true`
on all GPUs (a subprocess each; iterations/s from the same batch clock), when the machine has more than one.
`--time_limit` seconds (default 480) stops starting new methods; rows not run say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.run import exact_command, git_state, machine  # noqa: E402
from benchmarks.timing import sampling_throughput, training_step_ratio  # noqa: E402
from lit_fewstep.utils.runs import working_directory  # noqa: E402

METHODS = ["edm", "flow_matching", "cd", "ct", "ict", "scd", "sct", "dmd", "dmd2", "msd", "ctm", "guided_distillation",
           "caf", "flow_map", "analog_bits", "lowdiff"]
TEACHER = "lit_fewstep/assets/edm_digits.pt"
# configs that read teacher ODE pairs: (init arg, teacher, path of `python -m lit_fewstep pairs`)
PAIRS = {"dmd": ("pairs_path", "lit_fewstep/assets/edm_digits.pt", "edm"),
         "caf": ("pairs_path", "lit_fewstep/assets/fm_digits.pt", "linear")}
TARGETS = {"dmd2_ratio": 1.15, "scd_over_cd": 3.0, "one_step_over_teacher": 30.0}


class BatchClock(L.Callback):
    """Times every training batch (device synchronised) and stops the fit after `iterations` batches; with `out`,
    writes {"seconds": [...]} there at the end (rank 0), for DDP runs in a subprocess."""

    def __init__(self, iterations: int, out: str | None = None):
        self.iterations, self.out, self.seconds, self._start = iterations, out, [], 0.0

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)
        if len(self.seconds) >= self.iterations:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.out and trainer.is_global_zero:
            Path(self.out).write_text(json.dumps({"seconds": self.seconds}))

    def iterations_per_s(self) -> float:
        measured = self.seconds[len(self.seconds) // 10:] or self.seconds
        return 1.0 / statistics.median(measured)


def _autocast(device: torch.device, precision: str):
    if precision.endswith("-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()


def pairs_override(method: str, workdir: Path, num: int, device: torch.device) -> dict:
    if method not in PAIRS:
        return {}
    from lit_fewstep.data.pairs import make_pairs, save_pairs
    from lit_fewstep.methods.base import load_teacher

    field, teacher_path, path = PAIRS[method]
    out = workdir / f"{method}_pairs.pt"
    if not out.exists():
        teacher = load_teacher(teacher_path).to(device)
        save_pairs(make_pairs(teacher, num, 35, path=path, batch_size=1024), out, teacher_path)
    return {field: str(out)}


def build(method: str, overrides: dict):
    from lit_fewstep.utils.config import instantiate

    config = yaml.safe_load((ROOT / "configs" / method / "digits.yaml").read_text())
    config["model"].setdefault("init_args", {}).update(overrides)
    return instantiate(config["model"]), instantiate(config["data"])


def measure(method: str, args, device: torch.device, workdir: Path) -> dict:
    L.seed_everything(0, verbose=False)
    with working_directory(ROOT):
        module, datamodule = build(method, pairs_override(method, workdir, args.pairs_num, device))
    clock = BatchClock(args.iterations)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=-1, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock],
                        default_root_dir=str(workdir))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    fit_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    timing = training_step_ratio(module, datamodule, steps=args.steps, warmup=3, repeats=3, accelerator=args.accelerator,
                                 precision=args.precision)
    module.eval()
    with _autocast(device, args.precision):
        sampling = sampling_throughput(module, [module.default_nfe], batch=args.batch, repeats=3)[0]
    return {"method": method, "model": type(module).__name__, "iterations": len(clock.seconds), "fit_s": fit_s,
            "iterations_per_s": clock.iterations_per_s(), "peak_gib": peak, "step_s": timing["step_s"],
            "floor_s": timing["floor_s"], "ratio": timing["ratio"], "nfe": sampling["nfe_spent"],
            "images_per_s": sampling["images_per_s"]}


def teacher_throughput(args, device: torch.device) -> float:
    from lit_fewstep.utils.checkpoint import load_module

    teacher = load_module(str(ROOT / TEACHER)).to(device).eval()
    with _autocast(device, args.precision):
        return sampling_throughput(teacher, [35], batch=args.batch, repeats=3)[0]["images_per_s"]


def ddp_row(method: str, args, workdir: Path, devices: int) -> dict:
    """The method's config under DDP on `devices` devices, through the CLI (Lightning relaunches the command per rank)."""
    out = workdir / f"{method}_ddp.json"
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    overrides = [f"--model.init_args.{k}={v}" for k, v in pairs_override(method, workdir, args.pairs_num, device).items()]
    clock = json.dumps({"class_path": "benchmarks.gpu.smoke.BatchClock",
                        "init_args": {"iterations": args.iterations, "out": str(out)}})
    cmd = [sys.executable, "-m", "lit_fewstep", "fit", "--config", f"configs/{method}/digits.yaml", *overrides,
           "--trainer.accelerator", args.accelerator, "--trainer.devices", str(devices), "--trainer.strategy",
           "ddp_find_unused_parameters_true", "--trainer.precision", args.precision, "--trainer.max_steps", "-1",
           "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", f"[{clock}]",
           "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(workdir / f"{method}_ddp")]  # its config.yaml and picture go there
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if result.returncode != 0 or not out.exists():
        return {"method": method, "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    seconds = json.loads(out.read_text())["seconds"]
    measured = seconds[len(seconds) // 10:] or seconds
    return {"method": method, "devices": devices, "iterations_per_s": 1.0 / statistics.median(measured)}


def targets(rows: dict, teacher_images_per_s: float) -> list[str]:
    lines = []
    if "dmd2" in rows:
        ratio = rows["dmd2"]["ratio"]
        lines.append(f"- DMD2 step / its network passes: {ratio:.2f} (target <= {TARGETS['dmd2_ratio']}): "
                     f"{'met' if ratio <= TARGETS['dmd2_ratio'] else 'missed'}")
    if "scd" in rows and "cd" in rows:
        ratio = rows["scd"]["step_s"] / rows["cd"]["step_s"]
        lines.append(f"- sCD step / CD step: {ratio:.2f} (target <= {TARGETS['scd_over_cd']}): "
                     f"{'met' if ratio <= TARGETS['scd_over_cd'] else 'missed'}")
    one_step = {m: r["images_per_s"] / teacher_images_per_s for m, r in rows.items() if r.get("nfe") == 1}
    if one_step:
        worst = min(one_step, key=one_step.get)
        lines.append(f"- one-step images/s over the teacher's at 35 NFE: {min(one_step.values()):.1f}x ({worst}) to "
                     f"{max(one_step.values()):.1f}x (target >= {TARGETS['one_step_over_teacher']}x): "
                     f"{'met' if min(one_step.values()) >= TARGETS['one_step_over_teacher'] else 'missed'}")
    return lines


def report(args, rows: dict, skipped: dict, teacher_images_per_s: float, ddp: list[dict], started: str,
           seconds: float, device_name: str) -> str:
    def fmt(v, spec=".3g"):
        return "" if v is None else format(v, spec)

    lines = ["# GPU smoke: every method's digits config in mixed precision", "",
             f"Command: `{exact_command()}`", f"Machine: {device_name}; {machine()}",
             f"Commit: {git_state()}; started {started}, {seconds:.0f} s in all; seed 0.",
             f"Precision {args.precision}; {args.iterations} training iterations per method at the config's batch; "
             f"sampling at batch {args.batch}; teacher ({TEACHER}, Heun 35 NFE): {teacher_images_per_s:.4g} images/s.",
             "", "| method | model | it/s | peak GiB | step ms | passes alone ms | step / passes | NFE | images/s | "
                 "vs teacher 35 NFE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        if method in skipped:
            lines.append(f"| {method} | not run: {skipped[method]} |||||||||")
            continue
        r = rows[method]
        lines.append(f"| {method} | {r['model']} | {fmt(r['iterations_per_s'])} | {fmt(r['peak_gib'])} | "
                     f"{fmt(1e3 * r['step_s'])} | {fmt(1e3 * r['floor_s'])} | {r['ratio']:.2f} | {r['nfe']} | "
                     f"{fmt(r['images_per_s'], '.4g')} | {r['images_per_s'] / teacher_images_per_s:.1f}x |")
    lines += ["", "Targets:", *targets(rows, teacher_images_per_s), ""]
    if ddp:
        lines += ["## DDP", "", "| method | devices | it/s (global batch = devices x config batch) |", "|---|---|---|"]
        lines += [f"| {d['method']} | {d.get('devices', '')} | "
                  f"{fmt(d['iterations_per_s']) if 'iterations_per_s' in d else 'failed: ' + d['error']} |" for d in ddp]
    else:
        lines += ["DDP: not run (" + ("one GPU on this machine" if args.accelerator == "gpu" else "CPU dry run; "
                                                                                                  "--ddp_devices 2 runs it") + ")."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--accelerator", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "16-mixed", "32-true"))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the step/passes ratio")
    parser.add_argument("--batch", type=int, default=1000, help="samples per timed sample() call")
    parser.add_argument("--pairs_num", type=int, default=2048, help="teacher pairs for DMD and CAF")
    parser.add_argument("--time_limit", type=float, default=480.0, help="seconds; no method starts after it")
    parser.add_argument("--ddp_devices", type=int, default=None,
                        help="devices of the DDP rows (default: every GPU, none on one GPU or the CPU; 2 on the CPU "
                             "runs them with gloo as a dry run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_smoke.md"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: no CUDA device here; use --accelerator cpu for a dry run")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    rows, skipped, ddp = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        workdir = Path(tmp)
        teacher_images_per_s = teacher_throughput(args, device)
        for method in args.methods:
            if time.perf_counter() - t0 > args.time_limit:
                skipped[method] = f"time limit ({args.time_limit:.0f} s)"
                continue
            try:
                rows[method] = measure(method, args, device, workdir)
                print(json.dumps(rows[method]), flush=True)
            except Exception as err:  # one method's failure is its row, the others still run
                skipped[method] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                print(f"{method}: {skipped[method]}", flush=True)
        devices = args.ddp_devices or (torch.cuda.device_count() if device.type == "cuda" else 0)
        if devices > 1:
            for method in [m for m in args.methods if m in rows]:
                if time.perf_counter() - t0 > args.time_limit:
                    break
                ddp.append(ddp_row(method, args, workdir, devices))
    seconds = time.perf_counter() - t0
    text = report(args, rows, skipped, teacher_images_per_s, ddp, started, seconds, device_name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": exact_command(), "rows": rows, "skipped": skipped,
                                                    "ddp": ddp, "teacher_images_per_s": teacher_images_per_s},
                                                   indent=1))
    print(text)
    return {"rows": rows, "skipped": skipped, "ddp": ddp, "teacher_images_per_s": teacher_images_per_s}


if __name__ == "__main__":
    main()
