"""Align Your Flow (lit_fewstep.methods.flow_map.AYF): the identities a flow map and its losses must satisfy.

There is no official code to compare against; instead (docs/flow_map.md): f(x, t, t) = x; at s = t both residuals
are the flow-matching residual F - v; at s = 0 the EMD tangent is the continuous-time consistency tangent of sCM
(computed by methods/scm.py on TrigFlow for the same function); the discrete EMD loss divided by eps tends to the
continuous gradient; on 1-D Gaussian data the exact flow map has zero EMD and LMD residual; lambda = 1 is the
unguided teacher. Everything in float64 on tiny networks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_fewstep.diffusion.paths import convert, make_path
from lit_fewstep.diffusion.predictions import convert_prediction
from lit_fewstep.methods.flow_map import AYF
from lit_fewstep.methods.scm import scm_tangent, trigflow_jvp
from lit_fewstep.nets import MLP

LINEAR = make_path("linear")


class GaussianTeacher(nn.Module):
    """Exact denoiser of 1-D data N(mu, s0^2) on any path: E[x0 | x_t] is a Wiener filter of x_t / a = x0 + sigma z."""

    num_classes = 0

    def __init__(self, mu: float = 0.7, s0: float = 0.4):
        super().__init__()
        self.mu, self.s0 = mu, s0

    def x0_from(self, x_t, t, path, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(x_t.shape[0])[:, None]
        a, b = path.a(t), path.b(t)
        var = a**2 * self.s0**2 + b**2
        return self.mu + a * self.s0**2 / var * (x_t - a * self.mu)

    def velocity(self, x_t, t):
        return convert_prediction(self.x0_from(x_t, t, LINEAR), "x0", "velocity", x_t, t, LINEAR)

    def flow_map(self, x_t, t, s):
        """The exact PF-ODE map on the linear path: standardized coordinates are constant along the ODE."""
        t, s = t[:, None], s[:, None]
        m_t, m_s = (1 - t) * self.mu, (1 - s) * self.mu
        sd_t = ((1 - t) ** 2 * self.s0**2 + t**2).sqrt()
        sd_s = ((1 - s) ** 2 * self.s0**2 + s**2).sqrt()
        return m_s + sd_s / sd_t * (x_t - m_t)


class ExactAverageVelocity(nn.Module):
    """A raw "network" F(x, t, s) = (f_exact(x, t, s) - x) / (s - t), the teacher's velocity on the diagonal."""

    in_channels, num_classes, second_time, guidance_embed = 1, 0, True, False

    def __init__(self, teacher: GaussianTeacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, noise_labels, class_labels=None, s_labels=None, return_features=False, **cond):
        t, s = noise_labels, s_labels
        diagonal = (s == t)[:, None]
        gap = torch.where(diagonal, torch.ones_like(x), (s - t)[:, None])
        average = (self.teacher.flow_map(x, t, s) - x) / gap
        return torch.where(diagonal, self.teacher.velocity(x, t), average)


def mlp(dim: int = 2, guidance: bool = False, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=32, depth=2, emb_dim=16, second_time=True, guidance_embed=guidance)
    with torch.no_grad():  # an untrained MLP outputs exactly 0; give it a non-trivial function
        net.out.weight.normal_(0, 0.5)
        net.out.bias.normal_(0, 0.1)
    return net.double()


def ayf(net, teacher=None, **kw) -> AYF:
    kw = {"init_from_teacher": False, "ema_decay": 0.0, "warmup_steps": 0, **kw}
    module = AYF(net, "unused.pt", **kw).double()
    module.register_frozen("teacher", module=teacher or GaussianTeacher())
    return module


def states(n: int = 6, dim: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=torch.float64)
    s = t * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), t, s


# ----------------------------------------------------------------------------------------------- boundaries
def test_flow_map_is_the_identity_at_s_equals_t():
    module = ayf(mlp(dim=2))
    x, t, _ = states(dim=2)
    F = module.F(module.student, x, t, t, None, None)
    assert F.abs().min() > 0  # a network with a non-zero output ...
    assert torch.equal(module.student.jump(x, t, t), x)  # ... is still exactly the identity at s = t


def test_emd_and_lmd_residuals_at_s_equals_t_are_the_flow_matching_residual():
    teacher = GaussianTeacher()
    module = ayf(mlp(dim=1), teacher)
    x, t, _ = states()
    v = teacher.velocity(x, t)
    F_minus, g_emd = module.emd_tangent(x, t, t, v, None, None, r=1.0)
    assert torch.allclose(g_emd, F_minus - v, atol=1e-12, rtol=0)
    F_minus_l, g_lmd = module.lmd_tangent(x, t, t, None, None, r=1.0)
    assert torch.allclose(g_lmd, F_minus_l - v, atol=1e-12, rtol=0)
    # and off the diagonal the derivative term is there (the identity above is not vacuous)
    _, g_off = module.emd_tangent(x, t, 0.5 * t, v, None, None, r=1.0)
    assert (g_off - (module.F(module.student, x, t, 0.5 * t, None, None) - v)).abs().max() > 1e-3


def test_emd_tangent_at_s0_is_the_scm_tangent_of_the_same_function():
    """At s = 0 the flow map is a consistency function f(x_t, t) = x_t - t F(x_t, t, 0). sCM on TrigFlow, for the
    same function (its raw F built from f through the path conversion), computes g_sCM = cos(t') df/dt'; the EMD
    tangent is g = -df/dt on the linear path. So g_sCM = -cos(t') (dt/dt') g."""
    sigma_d = 0.6
    trig = make_path("trigflow", sigma_data=sigma_d)
    teacher = GaussianTeacher()
    module = ayf(mlp(dim=1), teacher)
    x_trig, _, _ = states()
    t_trig = torch.linspace(0.2, 1.3, x_trig.shape[0], dtype=torch.float64)
    x_lin, t_lin = convert(x_trig, t_trig, trig, LINEAR)
    zero = torch.zeros_like(t_lin)

    def f_lin(x, t):  # the consistency function in linear-path coordinates
        return module.student.jump(x, t, torch.zeros_like(t))

    def F_scm(x, t):  # sCM's raw network for the same f: f = cos t x - sin t sigma_d F
        xl, tl = convert(x, t, trig, LINEAR)
        return (torch.cos(t)[:, None] * x - f_lin(xl, tl)) / (sigma_d * torch.sin(t)[:, None])

    x0 = teacher.x0_from(x_lin, t_lin, LINEAR)  # one teacher, its ODE written on both paths
    v_lin = convert_prediction(x0, "x0", "velocity", x_lin, t_lin, LINEAR)
    v_trig = convert_prediction(x0, "x0", "velocity", x_trig, t_trig, trig)
    F_minus, cs_dF_dt = trigflow_jvp(F_scm, x_trig, t_trig, v_trig)
    g_scm = scm_tangent(F_minus, cs_dF_dt, v_trig, x_trig, t_trig, sigma_d, r=1.0)
    _, g_emd = module.emd_tangent(x_lin, t_lin, zero, v_lin, None, None, r=1.0)
    _, dt_lin = torch.func.jvp(lambda tt: convert(x_trig, tt, trig, LINEAR)[1], (t_trig,), (torch.ones_like(t_trig),))
    expected = -(torch.cos(t_trig) * dt_lin)[:, None] * g_emd
    assert g_emd.abs().min() > 1e-3
    assert torch.allclose(g_scm, expected, rtol=1e-8, atol=1e-10)


def test_discrete_emd_loss_over_eps_tends_to_the_continuous_gradient():
    """||f(x_t, t, s) - sg f(x_t + (t' - t) v, t', s)||^2 with t' = t + eps (s - t): its gradient / eps tends to
    2 (t - s)^2 g dF/dtheta, the gradient of (t - s)^2 ||F - sg(F - g)||^2."""
    teacher = GaussianTeacher()
    module = ayf(mlp(dim=1), teacher, tangent_norm="none")
    x, t, s = states()
    v = teacher.velocity(x, t)
    params = list(module.student.parameters())

    def grad(loss):
        return torch.cat([p.flatten() for p in torch.autograd.grad(loss, params)])

    F_minus, g = module.emd_tangent(x, t, s, v, None, None, r=1.0)
    F_theta = module.F(module.student, x, t, s, None, None)
    continuous = grad(((t - s) ** 2 * (F_theta - F_minus + g).pow(2).sum(1)).sum())
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        t_next = t + eps * (s - t)
        with torch.no_grad():
            target = module.student.jump(x + (t_next - t)[:, None] * v, t_next, s)
        discrete = grad((module.student.jump(x, t, s) - target).pow(2).sum() / eps)
        errors.append(((discrete - continuous).norm() / continuous.norm()).item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # first order in eps
    assert errors[2] < 1e-3


def test_exact_flow_map_of_gaussian_data_has_zero_emd_and_lmd_residual():
    teacher = GaussianTeacher(mu=0.7, s0=0.4)
    exact = ExactAverageVelocity(teacher)
    module = ayf(exact, teacher)
    x, t, s = states(n=16)
    v = teacher.velocity(x, t)
    _, g_emd = module.emd_tangent(x, t, s, v, None, None, r=1.0)
    _, g_lmd = module.lmd_tangent(x, t, s, None, None, r=1.0)
    assert g_emd.abs().max() < 1e-9 and g_lmd.abs().max() < 1e-9
    # a slightly wrong map (its mean off by 5%) is not: the residuals detect errors
    wrong = ayf(ExactAverageVelocity(GaussianTeacher(mu=0.735, s0=0.4)), teacher)
    _, g_wrong = wrong.emd_tangent(x, t, s, v, None, None, r=1.0)
    _, g_wrong_l = wrong.lmd_tangent(x, t, s, None, None, r=1.0)
    assert g_wrong.abs().max() > 1e-3 and g_wrong_l.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- autoguidance
def test_lambda_one_is_the_unguided_teacher_and_lambda_two_extrapolates():
    good, weak = GaussianTeacher(0.7, 0.4), GaussianTeacher(0.5, 0.6)
    module = AYF(mlp(dim=1, guidance=True), "unused.pt", guide_ckpt="unused.pt", guidance_range=(1.0, 3.0),
                 init_from_teacher=False, ema_decay=0.0).double()
    module.register_frozen("teacher", module=good)
    module.register_frozen("guide", module=weak)
    x, t, _ = states()
    one = torch.ones_like(t)
    assert torch.equal(module.teacher_velocity(x, t, None, one), good.velocity(x, t))
    v2 = module.teacher_velocity(x, t, None, 2 * one)
    assert torch.allclose(v2, 2 * good.velocity(x, t) - weak.velocity(x, t), atol=1e-12)
    assert (v2 - good.velocity(x, t)).abs().max() > 1e-2
    lam = module.sample_guidance(x)
    assert lam.min() >= 1.0 and lam.max() <= 3.0 and lam.std() > 0


# ----------------------------------------------------------------------------------------------- sampler, inputs
def test_n_step_sampler_is_n_jumps_without_renoising():
    module = ayf(mlp(dim=2)).float()
    for nfe in (1, 2, 5):
        a = module.sample(64, nfe, generator=torch.Generator().manual_seed(3), use_ema=False)
        b = module.sample(64, nfe, generator=torch.Generator().manual_seed(3), use_ema=False)
        assert a.nfe == nfe and torch.equal(a.x, b.x)  # N NFE, deterministic given the noise
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    x, times = noise.clone(), torch.linspace(1.0, 0.0, 3)
    for t, s in zip(times[:-1], times[1:]):
        x = module.student.jump(x, t, s)
    assert torch.allclose(module.sample(64, 2, generator=torch.Generator().manual_seed(3), use_ema=False).x, x)


def test_time_pairs_are_ordered_and_hit_the_diagonal():
    module = ayf(mlp(dim=2), diagonal_fraction=0.25, t_max=0.9)
    for sampling in ("sorted", "gap"):
        module.time_sampling = sampling
        t, s = module.sample_times(torch.zeros(4000, 2, dtype=torch.float64))
        assert (s >= 0).all() and (s <= t).all() and (t <= 0.9).all() and (t >= module.t_eps).all()
        assert abs((s == t).double().mean().item() - 0.25) < 0.03
        assert (s == 0).double().mean() < 0.01 and (t - s).max() > 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"objective": "cd"}, "objective"), ({"time_sampling": "uniform"}, "time_sampling"),
    ({"guidance_range": (1.0, 3.0)}, "guidance_range"), ({"t_max": 1.5}, "t_max"),
    ({"guide_ckpt": "g.pt", "guidance_range": (1.0, 3.0)}, "guidance_embed"),
    ({"diagonal_fraction": 2.0}, "diagonal_fraction"), ({"tangent_norm": "l1"}, "tangent_norm"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AYF(mlp(dim=2), "unused.pt", **kwargs)


def test_an_edm_teacher_cannot_initialise_the_student():
    from lit_fewstep.diffusion.precond import PreconditionedNet

    module = AYF(mlp(dim=2), "unused.pt", init_from_teacher=True, ema_decay=0.0).double()
    teacher = PreconditionedNet(MLP(dim=2, hidden=32, depth=2, emb_dim=16), "edm").double()
    with pytest.raises(ValueError, match="init_from_teacher"):
        module._init_from(teacher)
    fm = PreconditionedNet(MLP(dim=2, hidden=32, depth=2, emb_dim=16), "velocity").double()
    module._init_from(fm)  # a flow-matching teacher fits: F(x, t, s) = v_teacher(x, t) at the start
    x, t, s = states(dim=2)
    assert torch.allclose(module.F(module.student, x, t, s, None, None), fm(x, t), atol=1e-12)
