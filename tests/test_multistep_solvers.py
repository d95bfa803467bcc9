"""Training-free multistep ODE solvers (diffusion/solvers.py): DPM-Solver++(2M) and UniPC-2 — equal to diffusers'
schedulers on the same model, and of the order their papers state on Gaussian data, where the PF-ODE is exact."""

from __future__ import annotations

import math

import pytest
import torch

from lit_fewstep.diffusion.paths import EDMPath, VPCosinePath
from lit_fewstep.diffusion.solvers import (DDIMStep, DPMSolverPP2M, NFECounter, UniPC, cosine_sigmas, run_steps,
                                           sample_edm_heun)

MU, S2 = 0.7, 0.25  # data N(MU, S2) in every coordinate


def gaussian_x0(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x_t = a x0 + b z, x0 ~ N(MU, S2)."""
    return MU + a * S2 / (a * a * S2 + b * b) * (x - a * MU)


def edm_x0(x, t):
    sigma = t.double().reshape(-1, *([1] * (x.ndim - 1)))
    return gaussian_x0(x.double(), torch.ones_like(sigma), sigma).to(x.dtype)


def exact_edm(x_T, sigma_T, sigma):
    """The PF-ODE's solution for Gaussian data: x - MU scales with sqrt(S2 + sigma^2)."""
    return MU + (x_T - MU) * math.sqrt((S2 + sigma**2) / (S2 + sigma_T**2))


def log_snr_grid(n: int, sigma_max: float = 80.0, sigma_end: float = 0.5) -> torch.Tensor:
    return torch.exp(-torch.linspace(-math.log(sigma_max), -math.log(sigma_end), n + 1, dtype=torch.float64))


def end_errors(step, ns=(8, 16, 32, 64)) -> list[float]:
    x_T = 80.0 * torch.randn(1000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return [float((run_steps(edm_x0, x_T, log_snr_grid(n), step).x - exact_edm(x_T, 80.0, 0.5)).abs().max()) for n in ns]


def test_order_of_accuracy_when_halving_the_steps():
    """Error ratio per halving of the step: 2 for DDIM (first order), 4 for DPM-Solver++(2M) (second order); UniPC's
    corrector raises UniP-2 to at least third order (ratios >= 8; measured 12.8, 28, 17.8)."""
    path = EDMPath()
    ddim, dpm, unipc = (end_errors(step) for step in (DDIMStep(path), DPMSolverPP2M(path), UniPC(path)))
    ratios = {name: [e[i] / e[i + 1] for i in range(len(e) - 1)] for name, e in
              (("ddim", ddim), ("dpm", dpm), ("unipc", unipc))}
    assert all(1.8 < r < 2.2 for r in ratios["ddim"]), ratios
    assert all(3.6 < r < 4.8 for r in ratios["dpm"]), ratios
    assert all(r > 8.0 for r in ratios["unipc"]), ratios
    assert unipc[-1] < dpm[-1] < ddim[-1]


def test_the_first_step_is_ddim_and_a_step_into_zero_noise_returns_the_estimate():
    path = VPCosinePath()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    def x0_fn(x_t, t):
        shape = (-1, 1)
        return gaussian_x0(x_t, path.a(t).reshape(shape), path.b(t).reshape(shape))

    for step in (DPMSolverPP2M(path), UniPC(path)):
        one = run_steps(x0_fn, x.double(), [0.9, 0.6], step).x
        torch.testing.assert_close(one, run_steps(x0_fn, x.double(), [0.9, 0.6], DDIMStep(path)).x, rtol=1e-12, atol=1e-12)
        state = run_steps(x0_fn, x.double(), [0.9, 0.6, 0.3, 0.0], step)
        torch.testing.assert_close(state.x, state.extra["x0"].double() * path.a(torch.tensor(0.0)).double())


@pytest.mark.parametrize("name", ["dpm", "unipc"])
@pytest.mark.parametrize("num_steps", [5, 10, 20])
def test_equal_to_diffusers_schedulers(name, num_steps):
    """Our steps on a diffusers DDPM schedule (timestep k = time (k + 1) / T on `DiscreteVPPath`) equal diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, order 2) / UniPCMultistepScheduler (bh2, order 2) on the same model."""
    diffusers = pytest.importorskip("diffusers")
    from lit_fewstep.teachers import DiscreteVPPath

    base = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    path = DiscreteVPPath(base.alphas_cumprod)
    if name == "dpm":
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            base.config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
        step = DPMSolverPP2M(path)
    else:
        scheduler = diffusers.UniPCMultistepScheduler.from_config(
            base.config, solver_order=2, solver_type="bh2", predict_x0=True, final_sigmas_type="zero")
        step = UniPC(path)
    scheduler.set_timesteps(num_steps)
    x_T = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for k in scheduler.timesteps:
        ab = base.alphas_cumprod[int(k)].double()
        eps = (x - ab.sqrt() * gaussian_x0(x, ab.sqrt(), (1 - ab).sqrt())) / (1 - ab).sqrt()
        x = scheduler.step(eps, k, x).prev_sample

    def x0_fn(x_t, t):
        a, b = path.a(t.double()).reshape(-1, 1, 1, 1), path.b(t.double()).reshape(-1, 1, 1, 1)
        return gaussian_x0(x_t, a, b)

    times = [(int(k) + 1) / 1000 for k in scheduler.timesteps] + [0.0]
    ours = run_steps(x0_fn, x_T, times, step).x
    assert float((ours - x).abs().max()) < 2e-6  # diffusers keeps alphas_cumprod in float32


@pytest.mark.parametrize("method", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("nfe", [1, 2, 4, 8])
def test_teacher_sampler_spends_exactly_the_nfe(method, nfe):
    counter = NFECounter()
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    out = sample_edm_heun(counter.counted(edm_x0), noise, nfe, method=method)
    assert counter.count == nfe and torch.isfinite(out).all()
    if nfe == 8:  # beats Heun at the same budget on Gaussian data (Heun: 3 Heun steps + 2 Euler steps)
        exact = MU + (noise * 80.0 - MU) * math.sqrt(S2 / (S2 + 80.0**2))
        heun = sample_edm_heun(edm_x0, noise, nfe)
        assert (out - exact).abs().max() < (heun - exact).abs().max()


def test_unknown_solver_is_named():
    with pytest.raises(ValueError, match=r"^solver: unknown method 'dpm'; choose one of heun, euler, dpmpp_2m, unipc"):
        sample_edm_heun(edm_x0, torch.zeros(1, 2), 4, method="dpm")


def test_cosine_grid_is_even_in_vp_time_and_nests_when_halving():
    sigmas = cosine_sigmas(8, 80.0)
    assert sigmas[0] == pytest.approx(80.0, rel=1e-12) and sigmas[-1] == 0.0 and len(sigmas) == 9
    times = 2 / math.pi * torch.atan(sigmas)
    assert torch.allclose(times.diff(), times.diff()[0].expand(8), rtol=0, atol=1e-12)
    assert torch.equal(cosine_sigmas(4, 80.0), sigmas[::2])  # a 4-step grid is every other point of the 8-step one


@pytest.mark.parametrize("nfe", [1, 4])
def test_euler_on_the_cosine_grid_is_ddim_on_the_vp_cosine_path(nfe):
    """EDM's x = z / a and sigma = b / a turn DDIM's update into Euler's: the same samples, every nfe, counted."""
    noise = torch.randn(500, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counter = NFECounter()
    euler = sample_edm_heun(counter.counted(edm_x0), noise, nfe, method="euler", grid="cosine")
    vp = VPCosinePath()
    t = 2 / math.pi * torch.atan(cosine_sigmas(nfe, 80.0))
    vp_x0 = lambda z, tt: gaussian_x0(z, vp.a(tt).reshape(-1, 1), vp.b(tt).reshape(-1, 1))  # noqa: E731
    ddim = run_steps(vp_x0, noise * vp.b(t[0]), t, DDIMStep(vp)).x
    assert counter.count == nfe
    assert torch.allclose(euler, ddim, rtol=0, atol=1e-9)


def test_unknown_grid_is_named():
    with pytest.raises(ValueError, match=r"^grid: unknown grid 'uniform'; choose one of karras, cosine"):
        sample_edm_heun(edm_x0, torch.zeros(1, 2), 4, grid="uniform")
