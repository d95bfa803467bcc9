"""Align Your Flow on the 8-Gaussian ring with an exact teacher: energy distance vs steps, beside sCD; step time.

    OMP_NUM_THREADS=1 python benchmarks/flow_map.py --iters 3000 --batch 1024

Data: 8 Gaussians on a circle of radius 1, std 0.08 (`eight_gaussians(1.0, 0.08)`), unconditional. Teacher: the
mixture's closed-form denoiser (`GaussianMixture2D.denoiser`) read on any path through `paths.convert`, so the
distillation has no teacher error. Students: MLP 3x256 (`lit_fewstep.nets.MLP`), Adam lr 1e-3 -> 3e-4 (linear),
EMA 0.999, batch `--batch`, `--iters` iterations, trained by calling each method's loss in a plain loop:

- AYF (`lit_fewstep.methods.AYF`): EMD (the main run), LMD alone and EMD + LMD (`--ablation_iters`), and EMD
  distilled from an autoguided exact teacher (good: the ring; weak: the same ring with std 0.12) at lambda ~ U[1, 2],
  sampled at lambda = 1 and 1.5.
- sCD (`lit_fewstep.methods.SCD`) with the same network width, budget and teacher, multistep consistency sampling.

Metric: energy distance (`lit_fewstep.metrics.distribution.energy_distance`) of 4,096 samples to 4,096 held-out
data samples at 1 / 2 / 4 / 8 / 16 steps, median over 3 sampling seeds; floor: the exact teacher's ODE with 64 Heun
steps. Step time: one EMD / LMD training step against one plain flow-matching step (||F(x_t, t, t) - (z - x)||^2) of
the same network and batch, interleaved in one run, medians. Writes benchmarks/results/flow_map.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.data.toy import eight_gaussians  # noqa: E402
from lit_fewstep.diffusion.paths import EDMPath, convert, make_path  # noqa: E402
from lit_fewstep.diffusion.solvers import solve_ode, uniform_times  # noqa: E402
from lit_fewstep.methods import AYF, SCD  # noqa: E402
from lit_fewstep.metrics.distribution import energy_distance  # noqa: E402
from lit_fewstep.nets import MLP  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

STEPS = [1, 2, 4, 8, 16]
QUOTED = {1: 0.00125, 2: 0.00114, 4: 0.00110, 8: 0.00110, 16: 0.00108}  # MLP 3x256, 12k iterations, batch 1024
QUOTED_FLOOR = 0.00104
N_EVAL = 4096
WARMUP = [250]  # tangent warm-up iterations (set from --warmup)
EDM = EDMPath()


class ExactTeacher(nn.Module):
    """The closed-form denoiser of a 2-D Gaussian mixture as a frozen teacher: x0_from(x_t, t, path) converts the
    state to the EDM path (x_t / a = x + sigma z) and returns E[x | x_t]."""

    num_classes = 0

    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def x0_from(self, x_t, t, path, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(x_t.shape[0])
        x_edm, sigma = convert(x_t, t, path, EDM)
        return self.gmm.denoiser(x_edm, sigma)


def mlp(second_time: bool, guidance: bool = False, seed: int = 0) -> MLP:
    """The students' network, its initial weights drawn from `seed` (the same at every invocation of one command)."""
    torch.manual_seed(seed)
    return MLP(dim=2, hidden=256, depth=3, emb_dim=64, second_time=second_time, guidance_embed=guidance)


def make_ayf(teacher, guide=None, ema_decay: float = 0.999, seed: int = 0, **kw) -> AYF:
    guided = guide is not None
    module = AYF(mlp(True, guided, seed), "exact", guide_ckpt="exact" if guided else None,
                 init_from_teacher=False, t_max=0.999, warmup_steps=WARMUP[0], ema_decay=ema_decay, **kw)
    module.register_frozen("teacher", module=teacher)
    if guided:
        module.register_frozen("guide", module=guide)
    return module


def make_scd(teacher, sigma_data: float, ema_decay: float = 0.999, seed: int = 0) -> SCD:
    module = SCD(mlp(False, seed=seed), "exact", sigma_data=sigma_data, warmup_steps=WARMUP[0], ema_decay=ema_decay)
    module.register_frozen("teacher", module=teacher)
    return module


def train(module, loss_name: str, params, gmm, iters: int, batch: int, seed: int) -> float:
    """Plain loop: Adam 1e-3 -> 3e-4 linearly, EMA after each step. Returns seconds."""
    torch.manual_seed(seed)
    module.rng_seed.fill_(seed)
    opt = torch.optim.Adam(params, lr=1e-3)
    data_gen = torch.Generator().manual_seed(1000 + seed)
    loss_fn = getattr(module, loss_name)
    start = time.perf_counter()
    for k in range(iters):
        for group in opt.param_groups:
            group["lr"] = 1e-3 + (3e-4 - 1e-3) * k / max(1, iters - 1)
        x = gmm.sample(batch, generator=data_gen)[0].float()
        loss = loss_fn((x,))
        if not torch.isfinite(loss):
            raise RuntimeError(f"{loss_name}: non-finite loss at iteration {k}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.update_ema()
        module.iteration += 1
        if (k + 1) % 1000 == 0:
            print(f"{loss_name} {k + 1}/{iters} {time.perf_counter() - start:.0f} s", flush=True)
    return time.perf_counter() - start


def energies(sample_fn, reference, seeds=(0, 1, 2)) -> dict[int, float]:
    out = {}
    for n in STEPS:
        vals = [float(energy_distance(sample_fn(n, seed), reference)) for seed in seeds]
        out[n] = statistics.median(vals)
    return out


def module_sampler(module, **options):
    def draw(n, seed):
        return module.sample(N_EVAL, n, generator=torch.Generator().manual_seed(seed), **options).x
    return draw


def step_times(teacher, gmm, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one training step: EMD, LMD, plain flow matching, same net and batch, interleaved."""
    module = make_ayf(teacher)
    module.iteration.fill_(2000)  # past the warm-up: the full tangent
    opt = torch.optim.Adam(module.student.parameters(), lr=1e-4)
    path = make_path("linear")
    gen = torch.Generator().manual_seed(7)

    def fm_loss(batch_):
        x = batch_[0]
        t = module.rand((x.shape[0],), x)
        z = module.randn(x.shape, x)
        x_t = path.noise(x, z, t)
        return (module.F(module.student, x_t, t, t, None, None) - (z - x)).pow(2).mean()

    def emd_loss(batch_):
        module.objective = "emd"
        return module.flow_map_loss(batch_)

    def lmd_loss(batch_):
        module.objective = "lmd"
        return module.flow_map_loss(batch_)

    kinds = {"flow_matching": fm_loss, "emd": emd_loss, "lmd": lmd_loss}
    times = {k: [] for k in kinds}
    for r in range(repeats + 3):
        for name, fn in kinds.items():
            x = gmm.sample(batch, generator=gen)[0].float()
            start = time.perf_counter()
            loss = fn((x,))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r >= 3:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--ablation_iters", type=int, default=1000, help="EMD vs LMD vs both, autoguided vs not (0: skip)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the main runs (AYF-EMD, sCD)")
    ap.add_argument("--ablation_ema", type=float, default=0.99, help="EMA decay of the (shorter) ablation runs")
    ap.add_argument("--only_ablations", action="store_true",
                    help="rerun only the ablations, keeping the rest of an existing results .json")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=250, help="tangent warm-up iterations (AYF and sCD)")
    ap.add_argument("--step_repeats", type=int, default=20)
    ap.add_argument("--skip_scd", action="store_true")
    ap.add_argument("--skip_ayf", action="store_true", help="only the sCD student (e.g. in a second process)")
    ap.add_argument("--merge", default=None, help="a results .json of another process whose runs join this one's")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flow_map"))
    ap.add_argument("--render_only", action="store_true",
                    help="no training: rewrite --out's .md from its .json (with --merge: adding that file's runs)")
    args = ap.parse_args()
    WARMUP[0] = args.warmup
    if args.render_only:
        results = json.loads(Path(args.out + ".json").read_text())
        if args.merge:
            merge_runs(results, json.loads(Path(args.merge).read_text()))
        write(results, args.out)
        return
    command = "OMP_NUM_THREADS=1 python benchmarks/flow_map.py " + " ".join(sys.argv[1:])
    gmm = eight_gaussians(radius=1.0, std=0.08)
    teacher = ExactTeacher(gmm)
    reference = gmm.sample(N_EVAL, generator=torch.Generator().manual_seed(12345))[0].double()
    sigma_data = float(gmm.sigma_data)
    results: dict = {"command": command, "machine": describe_machine(), "iters": args.iters, "batch": args.batch,
                     "seed": args.seed, "warmup": args.warmup, "ema": args.ema, "ablation_ema": args.ablation_ema,
                     "quoted": QUOTED,
                     "quoted_floor": QUOTED_FLOOR}

    previous = json.loads(Path(args.out + ".json").read_text()) if args.only_ablations else None
    if previous is not None:
        for key in ("floor", "data_vs_data", "step_time_s", "iters", "batch", "warmup"):
            results[key] = previous[key]
        results["command"] = previous["command"] + "`, then `" + command
        runs = {k: v for k, v in previous["runs"].items() if not k.startswith("ablation_")}
    else:
        # floor: the exact teacher's ODE, 64 Heun steps on the linear path
        lin = make_path("linear")

        def teacher_draw(n_steps, seed):
            noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            times = uniform_times(64, t_max=0.999, t_min=0.0)
            return solve_ode(lambda x, t: teacher.x0_from(x, t, lin), 0.999 * noise, times, lin)

        results["floor"] = statistics.median(float(energy_distance(teacher_draw(64, s), reference)) for s in (0, 1, 2))
        data_gen = torch.Generator().manual_seed(999)
        results["data_vs_data"] = statistics.median(
            float(energy_distance(gmm.sample(N_EVAL, generator=data_gen)[0].double(), reference)) for _ in range(3))
        print("floor", results["floor"], "data vs data", results["data_vs_data"], flush=True)

        results["step_time_s"] = step_times(teacher, gmm, args.batch, args.step_repeats)
        print("step times", results["step_time_s"], flush=True)

        runs = {}
        if not args.skip_ayf:
            ayf = make_ayf(teacher, ema_decay=args.ema, seed=args.seed)
            secs = train(ayf, "flow_map_loss", ayf.student.parameters(), gmm, args.iters, args.batch, args.seed)
            runs["ayf_emd"] = {"iters": args.iters, "train_s": secs,
                               "energy": energies(module_sampler(ayf), reference)}
            print("ayf_emd", runs["ayf_emd"], flush=True)
        if not args.skip_scd:
            scd = make_scd(teacher, sigma_data, args.ema, seed=args.seed)
            params = list(scd.student.parameters()) + list(scd.weighting.parameters())
            secs = train(scd, "scm_loss", params, gmm, args.iters, args.batch, args.seed)
            runs["scd"] = {"iters": args.iters, "train_s": secs, "energy": energies(module_sampler(scd), reference)}
            print("scd", runs["scd"], flush=True)
    if args.ablation_iters > 0:
        n = args.ablation_iters
        for objective in ("emd", "lmd", "emd+lmd"):
            m = make_ayf(teacher, objective=objective, ema_decay=args.ablation_ema, seed=args.seed)
            secs = train(m, "flow_map_loss", m.student.parameters(), gmm, n, args.batch, args.seed)
            runs[f"ablation_{objective}"] = {"iters": n, "train_s": secs,
                                             "energy": energies(module_sampler(m), reference)}
            print(objective, runs[f"ablation_{objective}"], flush=True)
        weak = ExactTeacher(eight_gaussians(radius=1.0, std=0.12))
        m = make_ayf(teacher, guide=weak, guidance_range=(1.0, 2.0), ema_decay=args.ablation_ema,
                     seed=args.seed)
        secs = train(m, "flow_map_loss", m.student.parameters(), gmm, n, args.batch, args.seed)
        runs["ablation_autoguided"] = {"iters": n, "train_s": secs, "energy_lambda1": energies(
            module_sampler(m, guidance_scale=1.0), reference), "energy_lambda1.5": energies(
            module_sampler(m, guidance_scale=1.5), reference)}
        print("autoguided", runs["ablation_autoguided"], flush=True)
    results["runs"] = runs
    if args.merge:
        merge_runs(results, json.loads(Path(args.merge).read_text()))
    write(results, args.out)


def write(results: dict, out: str) -> None:
    Path(out + ".json").write_text(json.dumps(results, indent=2))
    Path(out + ".md").write_text(render(results))
    print(f"wrote {out}.md")


def merge_runs(results: dict, other: dict) -> None:
    """Adds the runs of another process's results (e.g. `--skip_ayf` beside `--skip_scd`) and its command."""
    results["runs"].update(other["runs"])
    if other["command"] not in results["command"]:
        results["command"] += "`, beside `" + other["command"]


def _row(name: str, energy: dict) -> str:
    return f"| {name} | " + " | ".join(f"{energy[n] if n in energy else energy[str(n)]:.5f}" for n in STEPS) + " |"


def render(r: dict) -> str:
    """The results page (numbers only; the verdicts are written by hand below the generated part)."""
    runs = r["runs"]
    lines = [
        "# Align Your Flow on the 8-Gaussian ring (exact teacher)", "",
        f"Command: `{r['command']}`  ",
        f"Seed: {r['seed']} (training noise and data), sampling seeds 0, 1, 2 (median)  ",
        f"Machine: {r['machine']}", "",
        f"Ring: radius 1, std 0.08; MLP 3x256; batch {r['batch']}; {r['iters']} iterations (Adam 1e-3 -> 3e-4, EMA "
        f"{r.get('ema', 0.999)}, tangent warm-up {r['warmup']} iterations). Energy distance of 4,096 samples to "
        "4,096 held-out data samples (V-statistic; its positive bias, about 2 E|X - X'| / 4096 = 0.0006, is most of the floor).", "",
        f"Floor (exact teacher, 64 Heun steps): {r['floor']:.5f} (quoted {r['quoted_floor']}); fresh data vs the "
        f"reference: {r['data_vs_data']:.5f}.", "",
        "| model | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in STEPS) + " |",
        "|---|" + "---|" * len(STEPS),
        _row("quoted flow map (12k iterations)", {n: v for n, v in r["quoted"].items()}),
    ]
    if "ayf_emd" in runs:
        lines.append(_row(f"AYF-EMD ({runs['ayf_emd']['iters']} it, {runs['ayf_emd']['train_s']:.0f} s)",
                          runs["ayf_emd"]["energy"]))
    if "scd" in runs:
        lines.append(_row(f"sCD ({runs['scd']['iters']} it, {runs['scd']['train_s']:.0f} s)", runs["scd"]["energy"]))
    abl = [k for k in runs if k.startswith("ablation_")]
    if abl:
        lines += ["", f"Ablations ({runs[abl[0]]['iters']} iterations each, EMA {r.get('ablation_ema', 0.999)}, "
                  "otherwise the same setup):", "",
                  "| model | " + " | ".join(str(n) for n in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
        for k in abl:
            if k == "ablation_autoguided":
                lines.append(_row("EMD, autoguided teacher (weak: std 0.12), lambda ~ U[1, 2]; sampled at 1",
                                  runs[k]["energy_lambda1"]))
                lines.append(_row("... same student sampled at lambda 1.5", runs[k]["energy_lambda1.5"]))
            else:
                lines.append(_row(k.removeprefix("ablation_").upper(), runs[k]["energy"]))
    st = r["step_time_s"]
    lines += ["", "Training-step time (median of interleaved steps, same MLP 3x256 and batch, one run):", "",
              "| step | ms | / flow matching |", "|---|---|---|"]
    for k in ("flow_matching", "emd", "lmd"):
        lines.append(f"| {k} | {1000 * st[k]:.1f} | {st[k] / st['flow_matching']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
