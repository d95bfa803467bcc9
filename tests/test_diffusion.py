"""Diffusion core: path and prediction conversions, preconditioning, ODE solvers, guidance."""

import itertools
import math

import pytest
import torch

from lit_fewstep.diffusion import (
    ClassifierFreeGuidance,
    EDMPath,
    LinearPath,
    NFECounter,
    PREDICTION_KINDS,
    TrigFlowPath,
    VPCosinePath,
    consistency_coefficients,
    convert,
    convert_prediction,
    edm_coefficients,
    from_x0_eps,
    heun_schedule_for_nfe,
    karras_sigmas,
    sample_edm_heun,
    solve_ode,
    to_x0_eps,
    uniform_times,
)
from lit_fewstep.diffusion.paths import make_path



@pytest.fixture(autouse=True)
def float64_default():
    """Closed-form checks run in float64; restored afterwards so other test files keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

PATHS = [EDMPath(), VPCosinePath(), TrigFlowPath(0.5), LinearPath()]
MID_TIMES = {"edm": [0.01, 0.7, 20.0], "vp_cosine": [0.05, 0.5, 0.9], "trigflow": [0.05, 0.8, 1.5], "linear": [0.05, 0.5, 0.95]}


def _times(path):
    return torch.tensor(MID_TIMES[path.name])


@pytest.mark.parametrize("src,dst", list(itertools.permutations(PATHS, 2)))
def test_path_conversion_round_trip(src, dst):
    torch.manual_seed(0)
    t = _times(src)
    x_t = torch.randn(3, 4)
    x_dst, t_dst = convert(x_t, t, src, dst)
    torch.testing.assert_close(dst.log_snr(t_dst), src.log_snr(t), rtol=1e-10, atol=1e-10)
    x_back, t_back = convert(x_dst, t_dst, dst, src)
    torch.testing.assert_close(x_back, x_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_back, t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversion_keeps_the_noisy_point(path):
    """x_t / a(t) = x + sigma z on every path: converting a noised sample lands on the other path's noised sample."""
    torch.manual_seed(1)
    x, z, t = torch.randn(3, 2), torch.randn(3, 2), _times(path)
    x_edm, sigma = convert(path.noise(x, z, t), t, path, EDMPath())
    torch.testing.assert_close(sigma, path.b(t) / path.a(t))
    torch.testing.assert_close(x_edm, x + sigma[:, None] * z)


def test_trigflow_sigma_is_sigma_d_tan_t():
    t = torch.tensor([0.1, 0.7, 1.3])
    _, sigma = convert(torch.ones(3, 1), t, TrigFlowPath(0.5), EDMPath())
    torch.testing.assert_close(sigma, 0.5 * torch.tan(t))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_derivatives_match_finite_differences(path):
    t, h = _times(path), 1e-6
    for f, df in ((path.a, path.da), (path.b, path.db)):
        torch.testing.assert_close(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path,kind", list(itertools.product(PATHS, PREDICTION_KINDS)), ids=str)
def test_prediction_round_trip(path, kind):
    torch.manual_seed(2)
    t = _times(path)
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    x_t = path.noise(x0, eps, t)
    pred = from_x0_eps(x0, eps, kind, t, path)
    x0_back, eps_back = to_x0_eps(pred, kind, x_t, t, path)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)
    for other in PREDICTION_KINDS:
        there = convert_prediction(pred, kind, other, x_t, t, path)
        torch.testing.assert_close(convert_prediction(there, other, kind, x_t, t, path), pred, rtol=1e-9, atol=1e-9)


def test_velocity_is_time_derivative_of_the_path():
    path, x, z, t, h = LinearPath(), torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.3, 0.6]), 1e-6
    torch.testing.assert_close(from_x0_eps(x, z, "velocity", t, path), z - x)
    torch.testing.assert_close(path.velocity(x, z, t), (path.noise(x, z, t + h) - path.noise(x, z, t - h)) / (2 * h))


def test_unknown_path_and_kind_are_named():
    with pytest.raises(ValueError, match="path: unknown path 'ddpm'"):
        make_path("ddpm")
    with pytest.raises(ValueError, match="prediction: unknown kind 'noise'"):
        from_x0_eps(torch.zeros(1), torch.zeros(1), "noise", torch.ones(1), EDMPath())


def test_edm_coefficients_reference_values():
    sigma = torch.tensor([0.5])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
    torch.testing.assert_close(c_skip, torch.tensor([0.5]))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5)]))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)


def test_consistency_boundary_coefficients():
    c_skip, c_out = consistency_coefficients(torch.tensor([0.002, 80.0]), 0.5, 0.002)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[1] < 1e-4


def test_karras_grid():
    s = karras_sigmas(18)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
    assert (s[:-1] > s[1:]).all()
    # rho = 7: the midpoint in sigma^(1/7) space
    assert s[1].item() == pytest.approx((80 ** (1 / 7) + (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17) ** 7)


@pytest.mark.parametrize("nfe,expected", [(1, (0, 1)), (2, (0, 2)), (4, (1, 2)), (8, (3, 2)), (35, (17, 1))])
def test_heun_schedule_spends_exact_nfe(nfe, expected):
    assert heun_schedule_for_nfe(nfe) == expected
    counter = NFECounter()
    sample_edm_heun(counter.counted(lambda x, t: torch.zeros_like(x)), torch.randn(4, 2), nfe)
    assert counter.count == nfe


# --- closed-form Gaussian data: D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) -------------------------
MU, S = torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)


def gaussian_denoiser(x, sigma):
    sigma = sigma.reshape(-1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def closed_form_endpoint(x_T, sigma_max=80.0):
    """The PF-ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant."""
    return MU + S / torch.sqrt(S**2 + sigma_max**2) * (x_T - MU)


# Mean / max absolute endpoint error; Heun at 35 NFE is a few percent off on this Gaussian (steps of
# h / sigma ~ 0.5 around sigma ~ s), and second-order convergence brings it down quickly.
@pytest.mark.parametrize("method,nfe,mean_tol,max_tol", [("heun", 35, 0.05, 0.3), ("heun", 141, 3e-3, 0.02),
                                                          ("euler", 400, 0.03, 0.15)])
def test_ode_solution_matches_closed_form(method, nfe, mean_tol, max_tol):
    torch.manual_seed(3)
    noise = torch.randn(4000, 2)
    x = sample_edm_heun(gaussian_denoiser, noise, nfe, method=method)
    err = (x - closed_form_endpoint(80.0 * noise)).abs()
    assert err.mean().item() < mean_tol and err.max().item() < max_tol, (err.mean().item(), err.max().item())
    torch.testing.assert_close(x.mean(0), MU, atol=0.08, rtol=0)
    torch.testing.assert_close(x.std(0), S, atol=0.06, rtol=0.03)


def test_heun_converges_second_order():
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    exact = closed_form_endpoint(80.0 * noise)
    errs = [(sample_edm_heun(gaussian_denoiser, noise, nfe) - exact).abs().max().item() for nfe in (9, 17, 33)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > 3.5  # second order: about 4x per halving of the step


def test_ode_on_linear_path_with_converted_denoiser():
    """The same closed-form teacher, used on the flow-matching path through `convert`, lands on the same point."""
    lin, edm = LinearPath(), EDMPath()

    def x0_linear(x_t, t):
        x_edm, sigma = convert(x_t, t, lin, edm)
        return gaussian_denoiser(x_edm, sigma)

    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    t_max = 80.0 / 81.0  # linear time with sigma = 80
    times = uniform_times(400, t_max=t_max)
    x = solve_ode(x0_linear, noise * (1 - t_max) * 80.0, times, lin, method="heun")
    torch.testing.assert_close(x, closed_form_endpoint(80.0 * noise), atol=2e-3, rtol=0)


class _TwoClassModel(torch.nn.Module):
    """Class-conditional closed-form denoiser: class c has mean c, null label = mean 0.5."""

    num_classes = 2

    def x0(self, x_t, t, class_labels=None):
        mu = torch.where(class_labels == 2, 0.5, class_labels.to(x_t.dtype)).reshape(-1, 1)
        return mu + 0.25 / (0.25 + t.reshape(-1, 1) ** 2) * (x_t - mu)


def test_cfg_scale_one_is_the_conditional_model_exactly():
    model, labels = _TwoClassModel(), torch.tensor([0, 1, 1])
    x, t = torch.randn(3, 2), torch.tensor([0.3, 1.0, 5.0])
    counter = NFECounter()
    out = ClassifierFreeGuidance(model, labels, scale=1.0, counter=counter)(x, t)
    assert torch.equal(out, model.x0(x, t, class_labels=labels)) and counter.count == 1
    guided = ClassifierFreeGuidance(model, labels, scale=3.0, counter=counter)(x, t)
    uncond = model.x0(x, t, class_labels=torch.full_like(labels, 2))
    torch.testing.assert_close(guided, uncond + 3.0 * (model.x0(x, t, class_labels=labels) - uncond))
    assert counter.count == 3  # guidance counts two evaluations
