"""The sampler protocol (`diffusion.solvers`: steps, `run_steps`) and guidance (`diffusion.guidance`):
closed-form exactness, marginals preserved within sampling error, bit-equality with the loops the protocol
replaced (consistency multistep, DMD2's chain, CFG), state carried between steps, exact NFE counts."""

import math

import pytest
import torch

from lit_fewstep.diffusion import (
    Autoguidance,
    ClassifierFreeGuidance,
    ConstantAccelerationStep,
    DDIMHeunStep,
    DDIMStep,
    DenoiseRenoise,
    EDMPath,
    EulerStep,
    HeunStep,
    LinearPath,
    NFECounter,
    PreconditionedNet,
    SamplerState,
    SelfConditioned,
    StochasticDDIMStep,
    TrigFlowPath,
    TwoTimeJump,
    VPCosinePath,
    autoguided_x0,
    denoise_renoise,
    gaussian_noise,
    guide,
    guided_x0,
    multistep_consistency_sample,
    run_steps,
    sample_edm_heun,
    scale_from_cfg_w,
    solve_ode,
)
from lit_fewstep.diffusion.paths import _bcast
from lit_fewstep.nets import MLP

F64 = torch.float64
MU, S = 0.7, 0.5  # 1-D Gaussian data N(MU, S^2)


pytestmark = pytest.mark.usefixtures("float32_default_dtype")


def _t(v, dtype=F64):
    return torch.as_tensor(v, dtype=dtype)


def marginal_std(path, t, s=S):
    """Std of x_t = a x + b z for x ~ N(MU, s^2)."""
    a, b = path.a(_t(t)), path.b(_t(t))
    return torch.sqrt(a * a * s * s + b * b)


def gaussian_x0(path, s=S):
    """Exact E[x | x_t] for x ~ N(MU, s^2) on `path` (s = 0: a point at MU)."""
    def x0(x, t):
        a, b = _bcast(path.a(t), x), _bcast(path.b(t), x)
        return MU + a * s * s / (a * a * s * s + b * b) * (x - a * MU)

    return x0


def pf_ode_flow(path, x, t, t_next, s=S):
    """The exact PF-ODE map of Gaussian data from t to t_next: it keeps (x_t - a MU) / std_t fixed."""
    return path.a(_t(t_next)) * MU + marginal_std(path, t_next, s) / marginal_std(path, t, s) * (x - path.a(_t(t)) * MU)


def start(path, T, n, seed, s=S, dtype=F64):
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return path.a(_t(T, dtype)) * MU + marginal_std(path, T, s).to(dtype) * z


PATHS = [(EDMPath(), 80.0, 0.0), (VPCosinePath(), 0.999, 0.0), (LinearPath(), 0.99, 0.0),
         (TrigFlowPath(sigma_data=0.5), 1.5, 0.0)]


# ------------------------------------------------------------------------------------------------ DDIM
@pytest.mark.parametrize("path,T,t_end", PATHS, ids=lambda v: type(v).__name__ if hasattr(v, "a") else str(v))
@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_ddim_with_the_exact_denoiser_lands_on_the_pf_ode_solution(path, T, t_end, num_steps):
    """Data N(MU, 0) (a point): the exact denoiser is constant along every trajectory, so DDIM is the exact
    PF-ODE flow in any number of steps, to the end and at every grid time (for spread-out data it is only
    first order: next test)."""
    x = start(path, T, 64, seed=0, s=0.0)
    times = torch.linspace(T, t_end, num_steps + 1, dtype=F64)
    state = SamplerState.start(x, T)
    for t_next in times[1:].tolist():
        state = DDIMStep(path)(gaussian_x0(path, s=0.0), state, t_next)
        torch.testing.assert_close(state.x, pf_ode_flow(path, x, T, t_next, s=0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.x, torch.full_like(x, MU), rtol=0, atol=1e-12)


def test_ddim_is_first_order_and_path_independent_for_gaussian_data():
    """Spread-out data: the error to the closed form halves when the steps double; and DDIM is the same sampler
    on every path (VP and EDM at equal log-SNR give the same x / a)."""
    vp, edm = VPCosinePath(), EDMPath()
    x = start(vp, 0.999, 256, seed=1)
    exact = pf_ode_flow(vp, x, 0.999, 0.0)
    errs = []
    for n in (32, 64, 128):
        times = torch.linspace(0.999, 0.0, n + 1, dtype=F64)
        out = run_steps(gaussian_x0(vp), x, times, DDIMStep(vp)).x
        errs.append((out - exact).abs().max().item())
        sigmas = vp.sigma(times)  # the same grid written in EDM sigma (last: 0)
        out_edm = run_steps(gaussian_x0(edm), x / vp.a(times[0]), sigmas, DDIMStep(edm)).x
        torch.testing.assert_close(out_edm, out, rtol=0, atol=1e-10)
    assert errs[0] > errs[1] > errs[2] > 0
    assert 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3, errs


def test_ddim_heun_is_second_order_path_independent_and_heun_on_edm():
    """`DDIMHeunStep`: on the EDM path it is Karras et al.'s Heun step (`HeunStep`) for any model; on Gaussian data
    its error to the closed form falls by 4x when the steps double (DDIM's by 2x; from sigma = 12.7, where 8 steps
    are already in the asymptotic range), and VP and EDM at equal log-SNR
    give the same x / a; a step that ends at b = 0 is DDIM's; with point data it is exact like DDIM."""
    vp, edm = VPCosinePath(), EDMPath()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(8, 3, generator=g, dtype=F64), torch.rand(8, generator=g, dtype=F64) * 5 + 0.1
    model = lambda x_t, t_: torch.tanh(1.3 * x_t + 0.7 * _bcast(t_, x_t)) - 0.2 * x_t ** 2  # noqa: E731
    torch.testing.assert_close(DDIMHeunStep(edm)(model, SamplerState.start(x, t), 0.6 * t).x,
                               HeunStep(edm)(model, SamplerState.start(x, t), 0.6 * t).x, rtol=0, atol=1e-12)
    x = start(vp, 0.95, 256, seed=1)
    t_end = 0.05
    exact = pf_ode_flow(vp, x, 0.95, t_end)
    errs = []
    for n in (8, 16, 32):
        times = torch.linspace(0.95, t_end, n + 1, dtype=F64)
        out = run_steps(gaussian_x0(vp), x, times, DDIMHeunStep(vp)).x
        errs.append((out - exact).abs().max().item())
        out_edm = run_steps(gaussian_x0(edm), x / vp.a(times[0]), vp.sigma(times), DDIMHeunStep(edm)).x
        torch.testing.assert_close(out_edm * vp.a(times[-1]), out, rtol=0, atol=1e-10)
    assert 3.4 < errs[0] / errs[1] < 4.6 and 3.4 < errs[1] / errs[2] < 4.6, errs
    ddim = run_steps(gaussian_x0(vp), x, torch.linspace(0.95, t_end, 17, dtype=F64), DDIMStep(vp)).x
    assert (ddim - exact).abs().max().item() > 1.5 * errs[0]  # DDIM at the same 16 evaluations
    # per-sample ends: the samples stepping to t = 0 take DDIM's step, the others Heun's
    t_next = torch.where(torch.arange(256) % 2 == 0, 0.0, 0.3).to(F64)
    state = SamplerState.start(x, 0.6)
    heun, plain = DDIMHeunStep(vp)(gaussian_x0(vp), state, t_next).x, DDIMStep(vp)(gaussian_x0(vp), state, t_next).x
    assert torch.equal(heun[0::2], plain[0::2]) and (heun[1::2] - plain[1::2]).abs().max() > 1e-4
    point = start(vp, 0.9, 16, seed=2, s=0.0)
    torch.testing.assert_close(DDIMHeunStep(vp)(gaussian_x0(vp, s=0.0), SamplerState.start(point, 0.9), 0.4).x,
                               pf_ode_flow(vp, point, 0.9, 0.4, s=0.0), rtol=0, atol=1e-12)


def test_ddim_clips_x0_before_recomputing_the_noise():
    vp = VPCosinePath()
    x, t = torch.tensor([[3.0], [-0.2]], dtype=F64), 0.5
    state = DDIMStep(vp, clip_x0=1.0)(lambda x_t, t_: 2.0 * x_t, SamplerState.start(x, t), 0.25)
    x0 = (2.0 * x).clamp(-1, 1)
    eps = (x - vp.a(_t(t)) * x0) / vp.b(_t(t))
    torch.testing.assert_close(state.x, vp.a(_t(0.25)) * x0 + vp.b(_t(0.25)) * eps)
    assert torch.equal(state.extra["x0"], x0)


# ------------------------------------------------------------------------------ Meng's stochastic sampler
def distilled_student(path, grid_step):
    """An ideally distilled N/2-step student for Gaussian data: its x0 is the progressive-distillation target
    x~ = (x_u - (b_u / b_t) x_t) / (a_u - (b_u / b_t) a_t) of the exact PF-ODE jump t -> u = max(t - 2 delta, 0), so
    one DDIM step of twice the length lands exactly on the ODE (Meng et al.'s stochastic sampler assumes this)."""
    def x0(x, t):
        u = (t - 2 * grid_step).clamp_min(0.0)
        a_t, b_t, a_u, b_u = (_bcast(v, x) for v in (path.a(t), path.b(t), path.a(u), path.b(u)))
        std = lambda a, b: torch.sqrt(a * a * S * S + b * b)  # noqa: E731
        x_u = a_u * MU + std(a_u, b_u) / std(a_t, b_t) * (x - a_t * MU)
        return (x_u - b_u / b_t * x) / (a_u - b_u / b_t * a_t)

    return x0


@pytest.mark.parametrize("num_steps", [2, 5, 8])
def test_stochastic_vp_step_preserves_the_gaussian_marginal(num_steps):
    """With exact double-length jumps, jump + forward re-noising keeps x_t ~ p_t at every grid time: mean and
    std within sampling error (n = 200k: std error of the std ~ 0.16%). A wrong re-noising std fails."""
    vp, n = VPCosinePath(), 200_000
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=F64)
    model = distilled_student(vp, 1.0 / num_steps)
    step = StochasticDDIMStep(vp, gaussian_noise(torch.Generator().manual_seed(7)))
    state = SamplerState.start(start(vp, 1.0, n, seed=2), 1.0)
    for t_next in times[1:].tolist():
        state = step(model, state, t_next)
        mean, std = state.x.mean().item(), state.x.std().item()
        exp_mean, exp_std = vp.a(_t(t_next)).item() * MU, marginal_std(vp, t_next).item()
        assert abs(mean - exp_mean) < 5 * exp_std / math.sqrt(n), (t_next, mean, exp_mean)
        assert abs(std / exp_std - 1) < 5 * math.sqrt(0.5 / n), (t_next, std, exp_std)


def test_stochastic_step_is_ddim_at_the_last_step_and_draws_no_noise_there():
    vp, calls = VPCosinePath(), []
    noise = lambda like: calls.append(1) or torch.zeros_like(like)  # noqa: E731
    x = start(vp, 0.3, 8, seed=3)
    out = StochasticDDIMStep(vp, noise)(gaussian_x0(vp), SamplerState.start(x, 0.3), 0.0)
    assert torch.equal(out.x, DDIMStep(vp)(gaussian_x0(vp), SamplerState.start(x, 0.3), 0.0).x) and not calls


# ------------------------------------------------------------------------ denoise-and-renoise (CM, DMD2)
def _old_multistep(f_fn, noise, times, path, noise_fn, t_min=0.0):
    """multistep_consistency_sample as written before the sampler protocol (reference)."""
    vec = lambda t: torch.as_tensor(t, dtype=noise.dtype).expand(noise.shape[0])  # noqa: E731
    T = vec(times[0].item())
    x = f_fn(_bcast(path.b(T), noise) * noise, T)
    for tau in times[1:].tolist():
        x = f_fn(path.transition(x, t_min, tau, noise_fn()), vec(tau))
    return x


def _old_dmd_chain(f_fn, x, sigmas, noise_fn):
    """DMD.chain as written before the sampler protocol (reference)."""
    for i, sigma in enumerate(sigmas):
        x0 = f_fn(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))
        if i + 1 < len(sigmas):
            x = x0 + sigmas[i + 1] * noise_fn(x0)
    return x0


def tiny_net(precond, seed=0, dim=2, num_classes=0):
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=16, depth=2, emb_dim=8, num_classes=num_classes)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
        net.out.bias.normal_(0, 0.1)
    return PreconditionedNet(net, precond, sigma_data=0.5).eval()


@pytest.mark.parametrize("precond,t_min,times", [
    ("consistency", 0.002, [80.0, 17.5, 2.52, 0.17]),
    ("consistency", 0.002, [80.0]),
    ("trigflow", 0.0, [1.5, 1.1, 0.4]),
])
def test_multistep_consistency_sample_is_bit_identical_to_the_old_loop(precond, t_min, times):
    net = tiny_net(precond)
    f = lambda x, t: net.x0(x, t)  # noqa: E731
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    times = torch.tensor(times, dtype=F64)
    g_old, g_new = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        old = _old_multistep(f, noise, times, net.path, lambda: torch.randn(noise.shape, generator=g_old), t_min)
        new = multistep_consistency_sample(f, noise, times, net.path, lambda: torch.randn(noise.shape, generator=g_new),
                                           t_min=t_min)
    assert torch.equal(old, new)
    assert torch.equal(g_old.get_state(), g_new.get_state())  # the same number of draws


# 5.7288604 and 0.74138218 are float32 noise levels where sqrt(sigma^2) != sigma in torch: a re-noising through
# `GaussianPath.transition` from time 0 would differ in the last bit there.
@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 2.5), (80.0, 2.5, 0.6, 0.15), (80.0, 5.728860378265381, 0.7413821816444397)])
def test_denoise_renoise_is_dmd2s_chain_bit_for_bit(sigmas):
    """t_min=None re-noises the estimate as data (x = x0 + sigma z on EDM), exactly DMD.chain's arithmetic."""
    net, edm = tiny_net("edm", seed=3), EDMPath()
    f = lambda x, t: net.x0_from(x, t, edm)  # noqa: E731
    x = 80.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        old = _old_dmd_chain(f, x, sigmas, gaussian_noise(g_old))
        new = denoise_renoise(f, x, sigmas, edm, gaussian_noise(g_new))
    assert torch.equal(old, new)
    assert torch.equal(g_old.get_state(), g_new.get_state())


def test_denoise_renoise_marginal_and_last_step():
    """With the exact consistency function of Gaussian data (the PF-ODE end point), every re-noised state has
    the marginal p_t; the last step returns the estimate itself (no draw)."""
    edm, n = EDMPath(), 200_000
    f = lambda x, t: pf_ode_flow(edm, x, t, 0.0)  # noqa: E731  (t: [B], constant)
    f_ = lambda x, t: f(x, t[0].item())  # noqa: E731
    step = DenoiseRenoise(edm, gaussian_noise(torch.Generator().manual_seed(8)))
    state = SamplerState.start(start(edm, 80.0, n, seed=9), 80.0)
    for t_next in (5.0, 0.8, 0.1):
        state = step(f_, state, t_next)
        assert abs(state.x.std().item() / marginal_std(edm, t_next).item() - 1) < 5 * math.sqrt(0.5 / n)
    draws = []
    last = DenoiseRenoise(edm, lambda like: draws.append(1) or torch.randn_like(like))(f_, state, 0.0)
    assert torch.equal(last.x, last.extra["x0"]) and not draws


# ------------------------------------------------------------------------------------ CTM gamma-sampling
def gaussian_two_time_map(path, calls=None):
    """The exact two-time map G(x_t, t, s) of Gaussian data on EDM (the PF-ODE flow from t to s)."""
    def G(x, t, s):
        if calls is not None:
            calls.append(s.clone())
        return MU + _bcast(marginal_std(path, s) / marginal_std(path, t), x) * (x - MU)

    return G


def test_two_time_jump_gamma_one_is_denoise_renoise_and_gamma_zero_the_direct_jump():
    edm, t_min = EDMPath(), 0.002
    G = gaussian_two_time_map(edm)
    times = [80.0, 10.0, 1.0, 0.2, t_min]
    x = start(edm, 80.0, 512, seed=10)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    ctm = run_steps(G, x, times, TwoTimeJump(edm, gamma=1.0, noise_fn=gaussian_noise(g1), t_min=t_min))
    cm = run_steps(lambda x_t, t: G(x_t, t, torch.full_like(t, t_min)), x, times,
                   DenoiseRenoise(edm, gaussian_noise(g2), t_min=t_min))
    assert torch.equal(ctm.x, cm.x)
    assert torch.equal(g1.get_state(), g2.get_state())
    det = run_steps(G, x, times, TwoTimeJump(edm, gamma=0.0, t_min=t_min))
    torch.testing.assert_close(det.x, pf_ode_flow(edm, x, 80.0, t_min), rtol=1e-12, atol=1e-12)


def test_two_time_jump_intermediate_gamma_jumps_below_and_renoises_to_the_marginal():
    edm, t_min, gamma, n = EDMPath(), 0.002, 0.6, 200_000
    calls = []
    step = TwoTimeJump(edm, gamma=gamma, noise_fn=gaussian_noise(torch.Generator().manual_seed(12)), t_min=t_min)
    state = SamplerState.start(start(edm, 80.0, n, seed=13), 80.0)
    for t_next in (4.0, 0.5):
        state = step(gaussian_two_time_map(edm, calls), state, t_next)
        s_prime = math.sqrt(1 - gamma**2) * (t_next - t_min) + t_min  # CTM: sqrt(1 - gamma^2)(s - sigma_min) + sigma_min
        assert torch.allclose(calls[-1], torch.full((n,), s_prime, dtype=F64))
        assert abs(state.x.std().item() / marginal_std(edm, t_next).item() - 1) < 5 * math.sqrt(0.5 / n)
    with pytest.raises(ValueError, match="gamma"):
        TwoTimeJump(edm, gamma=1.5)
    with pytest.raises(ValueError, match="noise_fn"):
        TwoTimeJump(edm, gamma=0.5)


# ------------------------------------------------------------------------------ stateful steps
class RecordingSelfCondModel:
    """x0(x, t, previous estimate): records what it is fed, returns a value that differs at every call."""

    def __init__(self):
        self.fed, self.returned = [], []

    def __call__(self, x, t, x0_prev):
        self.fed.append(x0_prev.clone())
        out = 0.5 * x + 0.1 * len(self.returned) + 0.01 * x0_prev
        self.returned.append(out)
        return out


@pytest.mark.parametrize("inner", ["ddim", "heun", "denoise_renoise"])
def test_self_conditioning_feeds_zeros_first_then_the_previous_estimate(inner):
    vp = VPCosinePath()
    step = {"ddim": DDIMStep(vp), "heun": HeunStep(vp),
            "denoise_renoise": DenoiseRenoise(vp, gaussian_noise(torch.Generator().manual_seed(0)))}[inner]
    model = RecordingSelfCondModel()
    x = torch.randn(4, 3, dtype=F64)
    out = run_steps(model, x, [0.9, 0.6, 0.3, 0.1], SelfConditioned(step))
    per_step = 2 if inner == "heun" else 1
    assert len(model.fed) == 3 * per_step
    assert torch.equal(model.fed[0], torch.zeros_like(x))
    for i in range(1, 3):  # each evaluation of step i sees the estimate the previous step recorded (its last one)
        for j in range(per_step):
            assert torch.equal(model.fed[i * per_step + j], model.returned[i * per_step - 1])
    assert torch.equal(out.extra["self_cond"], model.returned[-1])


def test_self_conditioning_needs_a_step_that_makes_an_estimate():
    edm = EDMPath()
    with pytest.raises(ValueError, match="estimate"):
        run_steps(lambda x, t, s, p: x, torch.randn(2, 1), [1.0, 0.5], SelfConditioned(TwoTimeJump(edm)))


def test_constant_acceleration_step_is_exact_for_constant_acceleration_and_computes_v0_once():
    """CAF: x(tau) = x_noise + v0 tau + A tau^2 / 2 is integrated exactly on any grid (here CAF's own
    floor(1000 i / N) / 1000 grid, in the package's time t = 1 - tau); v0 is evaluated once."""
    N, counter = 5, NFECounter()
    A = torch.tensor([[0.3, -1.2]], dtype=F64)
    z = torch.randn(6, 2, dtype=F64)
    velocity = counter.counted(lambda x, t: 2.0 * x + 1.0)
    seen_v0 = []
    accel = lambda x, t, v0: seen_v0.append(v0) or A.expand_as(x)  # noqa: E731
    times = [1.0 - math.floor(1000 * i / N) / 1000 for i in range(N)] + [0.0]
    out = run_steps(accel, z, times, ConstantAccelerationStep(velocity), counter=counter)
    v0 = 2.0 * z + 1.0
    torch.testing.assert_close(out.x, z + v0 + 0.5 * A, rtol=1e-12, atol=1e-12)
    assert counter.count == N + 1 and all(v is seen_v0[0] for v in seen_v0)
    assert torch.equal(out.extra["v0"], v0)
    given = run_steps(accel, z, times, ConstantAccelerationStep(), extra={"v0": v0})  # v0 known: N evaluations
    torch.testing.assert_close(given.x, out.x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="initial velocity"):
        run_steps(accel, z, times, ConstantAccelerationStep())


# ------------------------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("name,per_step", [("euler", 1), ("heun", 2), ("ddim", 1), ("stochastic_ddim", 1),
                                           ("denoise_renoise", 1), ("two_time", 1), ("two_time_gamma", 1),
                                           ("self_cond_ddim", 1), ("self_cond_heun", 2)])
def test_run_steps_counts_every_evaluation(name, per_step):
    vp, noise = VPCosinePath(), gaussian_noise(torch.Generator().manual_seed(0))
    x0 = lambda x, t: 0.5 * x  # noqa: E731
    model, step = {
        "euler": (x0, EulerStep(vp)), "heun": (x0, HeunStep(vp)), "ddim": (x0, DDIMStep(vp)),
        "stochastic_ddim": (x0, StochasticDDIMStep(vp, noise)), "denoise_renoise": (x0, DenoiseRenoise(vp, noise)),
        "two_time": (lambda x, t, s: 0.9 * x, TwoTimeJump(vp)),
        "two_time_gamma": (lambda x, t, s: 0.9 * x, TwoTimeJump(vp, gamma=0.5, noise_fn=noise)),
        "self_cond_ddim": (lambda x, t, p: 0.5 * x + p, SelfConditioned(DDIMStep(vp))),
        "self_cond_heun": (lambda x, t, p: 0.5 * x + p, SelfConditioned(HeunStep(vp))),
    }[name]
    times = [0.95, 0.7, 0.4, 0.2, 0.1]
    counter = NFECounter()
    run_steps(model, torch.randn(3, 2), times, step, counter=counter)
    assert counter.count == per_step * 4


def test_guided_sampling_counts_two_per_guided_call():
    model, labels = _TwoClassModel(), torch.tensor([0, 1, 1])
    counter = NFECounter()
    fn = lambda x, t: guided_x0(model, x, t, labels, torch.tensor([1.0, 2.0, 3.0]), counter=counter)  # noqa: E731
    run_steps(fn, torch.randn(3, 2), [5.0, 1.0, 0.3, 0.0], [HeunStep(EDMPath())] * 2 + [EulerStep(EDMPath())])
    assert counter.count == 2 * 5
    counter.count = 0
    fn1 = lambda x, t: guided_x0(model, x, t, labels, torch.ones(3), counter=counter)  # noqa: E731
    run_steps(fn1, torch.randn(3, 2), [5.0, 1.0, 0.0], EulerStep(EDMPath()))
    assert counter.count == 2


def test_run_steps_checks_the_number_of_steps():
    with pytest.raises(ValueError, match="3 steps"):
        run_steps(lambda x, t: x, torch.randn(2, 1), [1.0, 0.5, 0.0], [EulerStep(EDMPath())] * 3)


def test_solve_ode_is_bit_identical_to_the_old_loop():
    net, edm = tiny_net("edm", seed=5), EDMPath()
    f = lambda x, t: net.x0(x, t)  # noqa: E731
    from lit_fewstep.diffusion import euler_step, heun_step, karras_sigmas
    times = karras_sigmas(6).float()
    x_T = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        x = x_T
        for i in range(6):
            t, t_next = times[i].item(), times[i + 1].item()
            x = (heun_step if i < 4 else euler_step)(f, x, t, t_next, edm)
        assert torch.equal(solve_ode(f, x_T, times, edm, euler_last=2), x)


# ------------------------------------------------------------------------------------------ guidance
class _TwoClassModel(torch.nn.Module):
    """Class-conditional closed-form denoiser (EDM coordinates): class c has mean c, null label 2 = mean 0.5.
    Row-wise arithmetic only, so a sample's output never depends on the rest of the batch."""

    num_classes = 2

    def x0(self, x_t, t, class_labels=None):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(x_t.shape[0])
        mu = torch.where(class_labels == 2, 0.5, class_labels.to(x_t.dtype)).reshape(-1, 1)
        return mu + 0.25 / (0.25 + t.reshape(-1, 1) ** 2) * (x_t - mu)

    def x0_from(self, x_t, t, path, class_labels=None):
        return self.x0(x_t, t, class_labels)


def _old_cfg(model, class_labels, scale, x_t, t):
    """ClassifierFreeGuidance.__call__ as written before (reference)."""
    if scale == 1.0:
        return model.x0(x_t, t, class_labels=class_labels)
    null = torch.full_like(class_labels, model.num_classes)
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
    both = model.x0(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null]))
    d_cond, d_uncond = both.chunk(2)
    return guide(d_cond, d_uncond, scale)


@pytest.mark.parametrize("scale", [1.0, 1.5, 4.0])
def test_guided_x0_float_scale_is_the_old_cfg_bit_for_bit(scale):
    net = tiny_net("edm", seed=7, num_classes=3)
    x, t = torch.randn(8, 2), torch.rand(8) * 5 + 0.1
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = _old_cfg(net, labels, scale, x, t)
        counter = NFECounter()
        assert torch.equal(guided_x0(net, x, t, labels, scale, counter=counter), old)
        assert torch.equal(ClassifierFreeGuidance(net, labels, scale)(x, t), old)
        assert counter.count == (1 if scale == 1.0 else 2)
        # the two-pass form is DMD's real score / the pair maker's: cond, then null label, then guide
        two = guided_x0(net, x, t, labels, scale, batched=False)
        if scale != 1.0:
            null = torch.full_like(labels, 3)
            assert torch.equal(two, guide(net.x0(x, t, class_labels=labels), net.x0(x, t, class_labels=null), scale))
        torch.testing.assert_close(two, old)


@pytest.mark.parametrize("batched", [True, False])
def test_per_sample_cfg_scales_equal_each_sample_alone(batched):
    model = _TwoClassModel()
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 1.0, 5.0, 0.05, 2.0], dtype=F64)
    labels, scales = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1.0, 2.0, 3.5, 0.5, 7.0], dtype=F64)
    counter = NFECounter()
    together = guided_x0(model, x, t, labels, scales, counter=counter, batched=batched)
    assert counter.count == 2
    for i in range(5):
        alone = guided_x0(model, x[i:i + 1], t[i:i + 1], labels[i:i + 1], float(scales[i]), batched=batched)
        assert torch.equal(together[i:i + 1], alone), i
    # the same through a whole sampler: per-sample scales in sample_edm_heun equal per-sample runs
    noise = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    full = sample_edm_heun(lambda x_t, s: guided_x0(model, x_t, s, labels, scales, batched=batched), noise, 7)
    for i in range(5):
        one = sample_edm_heun(lambda x_t, s: guided_x0(model, x_t, s, labels[i:i + 1], float(scales[i]),
                                                       batched=batched), noise[i:i + 1], 7)
        assert torch.equal(full[i:i + 1], one), i


def test_per_sample_cfg_with_a_network_matches_each_sample_alone():
    net = tiny_net("edm", seed=8, num_classes=3)
    x, t = torch.randn(6, 2), torch.rand(6) * 3 + 0.1
    labels, scales = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1.0, 1.5, 2.0, 3.0, 0.0, 4.0])
    with torch.no_grad():
        together = guided_x0(net, x, t, labels, scales)
        for i in range(6):
            torch.testing.assert_close(together[i:i + 1], guided_x0(net, x[i:i + 1], t[i:i + 1], labels[i:i + 1],
                                                                    float(scales[i])))


def test_guidance_scale_one_runs_only_the_conditional_model():
    model, labels = _TwoClassModel(), torch.tensor([0, 1, 1])
    x, t = torch.randn(3, 2), torch.tensor([0.3, 1.0, 5.0])
    counter = NFECounter()
    out = guided_x0(model, x, t, labels, torch.ones(3), counter=counter)
    assert torch.equal(out, model.x0(x, t, class_labels=labels)) and counter.count == 1


def test_guidance_errors_name_the_problem():
    model, x, t = _TwoClassModel(), torch.randn(3, 2), torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        guided_x0(model, x, t, torch.tensor([0, 1, 1]), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="class-conditional"):
        guided_x0(model, x, t, None, 2.0)
    assert guided_x0(model, x, t, torch.tensor([0, 1, 1]), 1.0) is not None  # scale 1 needs nothing more


def test_guidance_with_a_path_converts_the_state():
    """path= queries the model's x0_from (e.g. a flow-matching teacher sampled in EDM coordinates)."""
    net, edm = tiny_net("velocity", seed=9, num_classes=2), EDMPath()
    x, t, labels = 5 * torch.randn(4, 2), torch.tensor([5.0, 1.0, 0.5, 0.1]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        got = guided_x0(net, x, t, labels, 2.5, path=edm)
        cond, uncond = net.x0_from(x, t, edm, class_labels=labels), net.x0_from(x, t, edm, class_labels=labels * 0 + 2)
    torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond))


def test_autoguidance_per_sample_and_scale_one():
    good, weak = tiny_net("edm", seed=10), tiny_net("edm", seed=11)
    x, t = torch.randn(4, 2), torch.tensor([0.2, 1.0, 3.0, 10.0])
    scales = torch.tensor([1.0, 2.0, 2.5, 0.5])
    with torch.no_grad():
        counter = NFECounter()
        out = autoguided_x0(good, weak, x, t, scales, counter=counter)
        d_good, d_weak = good.x0(x, t), weak.x0(x, t)
        torch.testing.assert_close(out, d_weak + scales[:, None] * (d_good - d_weak))
        assert counter.count == 2
        one = Autoguidance(good, weak, 1.0)
        assert torch.equal(one(x, t), d_good) and one.counter.count == 1


def test_scale_from_cfg_w():
    assert scale_from_cfg_w(0.0) == 1.0 and scale_from_cfg_w(2.0) == 3.0
    assert torch.equal(scale_from_cfg_w(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 2.0]))
