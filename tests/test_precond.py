"""Preconditioning classes: reference values, exact boundaries, Gaussian-data optima, the string registry.

Stand-in networks here decode their inputs with the papers' formulas written out in this file (not the
library's), so a wrong scaling or noise label in a preconditioning shows up as a wrong prediction.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_fewstep.diffusion import (PRECONDITIONINGS, ConsistencyPreconditioning, CTMPreconditioning, EDMPath,
                                   EDMPreconditioning, FlowMapPreconditioning, LinearPath, PreconditionedNet,
                                   Preconditioning, TrigFlowPath, TrigFlowPreconditioning, TwoTimePreconditioning,
                                   VelocityPreconditioning, VPCosinePath, VPEpsPreconditioning, VPVPreconditioning,
                                   convert, from_x0_eps, to_x0_eps)
from lit_fewstep.diffusion.paths import _bcast
from lit_fewstep.diffusion.precond import (TrigFlowEDMPreconditioning, VPXPreconditioning, consistency_coefficients, edm_coefficients,
                                          trigflow_coefficients)
from lit_fewstep.nets import MLP

SD = 0.5  # sigma_data
S_GAUSS = 0.7  # std of the 1-D Gaussian data of the closed-form optima (!= SD, so c_skip is not trivial)
ONE_TIME = ("edm", "velocity", "trigflow", "consistency", "vp_eps", "vp_v", "vp_x", "trigflow_edm")
TWO_TIME = ("ctm", "flow_map")


def _mlp(dim=3, second_time=False, num_classes=0, seed=0):
    """An MLP whose zero-initialised output layer is re-drawn, so its raw output is not 0."""
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=32, depth=2, emb_dim=16, num_classes=num_classes, second_time=second_time)
    torch.nn.init.normal_(net.out.weight, std=0.5)
    torch.nn.init.normal_(net.out.bias, std=0.5)
    return net


def _times(name, B, dtype=torch.float64):
    """Interior times of each parameterization's path."""
    lo, hi = {"edm": (0.01, 40.0), "consistency": (0.01, 40.0), "ctm": (0.01, 40.0), "trigflow": (0.05, 1.5), "trigflow_edm": (0.05, 1.5),
              "velocity": (0.02, 0.98), "flow_map": (0.02, 0.98), "vp_eps": (0.02, 0.98), "vp_v": (0.02, 0.98),
              "vp_x": (0.02, 0.98)}[name]
    return torch.linspace(lo, hi, B, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Registry


def test_registry_has_one_class_per_string():
    assert tuple(PRECONDITIONINGS) == ONE_TIME + TWO_TIME
    expected = {"edm": EDMPreconditioning, "velocity": VelocityPreconditioning, "trigflow": TrigFlowPreconditioning,
                "consistency": ConsistencyPreconditioning, "vp_eps": VPEpsPreconditioning, "vp_v": VPVPreconditioning,
                "vp_x": VPXPreconditioning, "trigflow_edm": TrigFlowEDMPreconditioning, "ctm": CTMPreconditioning, "flow_map": FlowMapPreconditioning}
    for name, cls in PRECONDITIONINGS.items():
        assert cls is expected[name] and cls.name == name and issubclass(cls, Preconditioning)
        assert cls.two_time == (name in TWO_TIME) == issubclass(cls, TwoTimePreconditioning)
        p = PreconditionedNet(_mlp(second_time=name in TWO_TIME), name, SD, 0.002)
        assert isinstance(p.precond, cls) and p.path is p.precond.path and p.prediction == p.precond.prediction
    kinds = {n: (type(c(SD).path).__name__, c.prediction) for n, c in PRECONDITIONINGS.items()}
    assert kinds == {"edm": ("EDMPath", "x0"), "velocity": ("LinearPath", "velocity"),
                     "trigflow": ("TrigFlowPath", "velocity"), "consistency": ("EDMPath", "x0"),
                     "vp_eps": ("VPCosinePath", "eps"), "vp_v": ("VPCosinePath", "v"), "vp_x": ("VPCosinePath", "x0"),
                     "trigflow_edm": ("TrigFlowPath", "velocity"), "ctm": ("EDMPath", "x0"), "flow_map": ("LinearPath", "velocity")}


def test_unknown_string_and_wrong_net_are_named():
    with pytest.raises(ValueError, match="preconditioning: unknown value 'ddpm'.*'vp_eps'"):
        PreconditionedNet(_mlp(), "ddpm")
    with pytest.raises(ValueError, match="second_time=True"):
        PreconditionedNet(_mlp(second_time=False), "ctm")
    with pytest.raises(ValueError, match="sigma_min"):
        PreconditionedNet(_mlp(second_time=True), "ctm", SD, 0.0)
    one = PreconditionedNet(_mlp(), "edm").double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one-time"):
        one(x, torch.ones(2), s=torch.ones(2))
    with pytest.raises(ValueError, match="one-time"):
        one.jump(x, torch.ones(2), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# The four existing strings compute exactly what the string switch computed


class _OldPreconditionedNet(torch.nn.Module):
    """Verbatim copy of the arithmetic of the string switch this refactor replaced."""

    def __init__(self, net, preconditioning, sigma_data, sigma_min):
        super().__init__()
        self.net, self.preconditioning, self.sigma_data, self.sigma_min = net, preconditioning, sigma_data, sigma_min
        self.path = {"edm": EDMPath(), "consistency": EDMPath(sigma_min=sigma_min), "velocity": LinearPath(),
                     "trigflow": TrigFlowPath(sigma_data=sigma_data)}[preconditioning]
        self.prediction = "x0" if preconditioning in ("edm", "consistency") else "velocity"

    def forward(self, x_t, t, class_labels=None, return_features=False, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        if self.preconditioning in ("edm", "consistency"):
            c_skip, c_out, c_in, c_noise = edm_coefficients(t, self.sigma_data)
            if self.preconditioning == "consistency":
                c_skip, c_out = consistency_coefficients(t, self.sigma_data, self.sigma_min)
            c_skip, c_out, c_in = (_bcast(c, x_t) for c in (c_skip, c_out, c_in))
            out = self.net(c_in * x_t, c_noise, class_labels=class_labels, return_features=return_features, **cond)
            F, feats = out if return_features else (out, None)
            pred = c_skip * x_t + c_out * F
        elif self.preconditioning == "velocity":
            out = self.net(x_t, t, class_labels=class_labels, return_features=return_features, **cond)
            pred, feats = out if return_features else (out, None)
        else:
            out = self.net(x_t / self.sigma_data, t, class_labels=class_labels, return_features=return_features, **cond)
            F, feats = out if return_features else (out, None)
            pred = self.sigma_data * F
        return (pred, feats) if return_features else pred

    def x0(self, x_t, t, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        pred = self(x_t, t, class_labels=class_labels, **cond)
        if self.preconditioning == "trigflow":
            c_skip, c_out = trigflow_coefficients(t, self.sigma_data)
            return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * (pred / self.sigma_data)
        return to_x0_eps(pred, self.prediction, x_t, t, self.path)[0]

    def x0_from(self, x_t, t, path, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        x_own, t_own = convert(x_t, t, path, self.path)
        return self.x0(x_own, t_own, class_labels=class_labels, **cond)


@pytest.mark.parametrize("name", ["edm", "velocity", "trigflow", "consistency"])
def test_existing_strings_are_bit_identical_to_the_string_switch(name):
    net = _mlp(num_classes=4)
    new, old = PreconditionedNet(net, name, 0.6, 0.003), _OldPreconditionedNet(net, name, 0.6, 0.003)
    assert list(new.state_dict()) == ["net." + k for k in net.state_dict()]
    assert (new.sigma_data, new.sigma_min, new.preconditioning, new.num_classes) == (0.6, 0.003, name, 4)
    assert type(new.path) is type(old.path) and vars(new.path) == vars(old.path) and new.prediction == old.prediction
    torch.manual_seed(1)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4])
    t = {"edm": torch.tensor([0.003, 0.1, 1.0, 10.0, 80.0]), "consistency": torch.tensor([0.003, 0.1, 1.0, 10.0, 80.0]),
         "velocity": torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), "trigflow": torch.tensor([0.0, 0.1, 0.7, 1.2, 1.56])}[name]
    assert torch.equal(new(x, t, class_labels=y), old(x, t, class_labels=y))
    (p_new, f_new), (p_old, f_old) = new(x, t, y, True), old(x, t, y, True)
    assert torch.equal(p_new, p_old) and torch.equal(f_new, f_old)
    assert torch.equal(new.x0(x, t, class_labels=y), old.x0(x, t, class_labels=y))
    assert torch.equal(new.x0(x, t[2]), old.x0(x, t[2]))  # scalar time, null label
    sigmas = torch.tensor([0.01, 0.3, 1.0, 5.0, 50.0])
    for path in (EDMPath(), VPCosinePath(), TrigFlowPath(0.6), LinearPath()):
        x_p, t_p = convert(x, sigmas, EDMPath(), path)
        assert torch.equal(new.x0_from(x_p, t_p, path, class_labels=y), old.x0_from(x_p, t_p, path, class_labels=y))


def test_existing_strings_bit_identical_under_jvp():
    """sCM differentiates the TrigFlow student in forward mode; the JVP must not change either."""
    net = _mlp()
    new, old = PreconditionedNet(net, "trigflow", SD), _OldPreconditionedNet(net, "trigflow", SD, 0.002)
    x, t = torch.randn(4, 3), torch.tensor([0.1, 0.4, 0.9, 1.3])
    tx, tt = torch.randn(4, 3), torch.ones(4)
    a = torch.func.jvp(lambda x_, t_: new(x_, t_), (x, t), (tx, tt))
    b = torch.func.jvp(lambda x_, t_: old(x_, t_), (x, t), (tx, tt))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# Reference values


@pytest.mark.parametrize("sigma", [0.002, 0.25, 0.5, 1.0, 80.0])
def test_edm_matches_table_1(sigma):
    """Karras et al. 2022, Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    c_noise = ln(s)/4; D = c_skip x + c_out F(c_in x, c_noise) (Eq. 7)."""
    sd = 0.5
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
    c_in = 1.0 / math.sqrt(sigma**2 + sd**2)
    c_noise = math.log(sigma) / 4
    got = edm_coefficients(torch.tensor([sigma], dtype=torch.float64), sd)
    for g, e in zip(got, (c_skip, c_out, c_in, c_noise)):
        assert g.item() == pytest.approx(e, rel=1e-14, abs=1e-300)
    if sigma == 0.5:  # sigma = sigma_d: the closed forms 1/2, sd/sqrt(2), 1/(sd sqrt(2)), ln(sd)/4
        assert (c_skip, c_out, c_in) == pytest.approx((0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2))), rel=1e-15)
    p = EDMPreconditioning(sd)
    x, F, t = torch.tensor([[1.5, -2.0]], dtype=torch.float64), torch.tensor([[0.3, 0.7]], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    x_in, label = p.inputs(x, t)
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-14, atol=0)
    assert label.item() == pytest.approx(c_noise, rel=1e-14)
    torch.testing.assert_close(p.output(F, x, t), c_skip * x + c_out * F, rtol=1e-14, atol=0)
    # Eq. 8: the raw network's regression target for the clean sample y = x0
    y = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(p.raw_target(y, x, t), (y - c_skip * x) / c_out, rtol=1e-13, atol=0)


def test_consistency_and_trigflow_coefficients_reference():
    eps, sd = 0.002, 0.5
    p = ConsistencyPreconditioning(sd, eps)
    t = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    x, F = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    c_skip = sd**2 / ((t - eps) ** 2 + sd**2)
    c_out = sd * (t - eps) / torch.sqrt(sd**2 + t**2)
    x_in, label = p.inputs(x, t)  # c_in, c_noise are EDM's
    torch.testing.assert_close(x_in, x / torch.sqrt(t**2 + sd**2)[:, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(label, torch.log(t) / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(p.output(F, x, t), c_skip[:, None] * x + c_out[:, None] * F, rtol=1e-14, atol=0)
    q = TrigFlowPreconditioning(sd)
    t = torch.tensor([0.0, 0.3, 1.5], dtype=torch.float64)
    x_in, label = q.inputs(x, t)
    assert torch.equal(x_in, x / sd) and torch.equal(label, t)
    v = q.output(F, x, t)
    torch.testing.assert_close(v, sd * F, rtol=1e-15, atol=0)
    torch.testing.assert_close(q.to_x0(v, x, t), torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * sd * F,
                               rtol=1e-14, atol=1e-15)


def test_vp_noise_label_is_1000_times_the_cosine_time():
    """Progressive distillation's `inv_cos` input: t = arctan(exp(-lambda/2)) / (pi/2) with lambda = ln(a^2/b^2),
    scaled by 1000 like a DDPM timestep."""
    t = torch.tensor([0.01, 0.3, 0.5, 0.99], dtype=torch.float64)
    a, b = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    lam = torch.log(a**2 / b**2)
    x = torch.randn(4, 2, dtype=torch.float64)
    for cls in (VPEpsPreconditioning, VPVPreconditioning):
        x_in, label = cls(SD).inputs(x, t)
        assert torch.equal(x_in, x)
        torch.testing.assert_close(label, 1000 * torch.atan(torch.exp(-lam / 2)) / (math.pi / 2), rtol=1e-13, atol=0)


def test_trigflow_edm_is_the_edm_denoiser_of_the_same_weights_on_trigflow():
    """sCD's student starts from an EDM teacher through "trigflow_edm": with the same raw net, its sCM
    consistency function at (x_t, t) on TrigFlow is EDM's D at sigma = sigma_d tan t, x = x_t / cos t;
    f(x, 0) = x exactly; and along sCM's tangent (cos t sin t) the noise label ln(sigma_d tan t)/4 moves at 1/4."""
    net = _mlp(num_classes=3).double()
    trig, edm = PreconditionedNet(net, "trigflow_edm", SD), PreconditionedNet(net, "edm", SD)
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([0.004, 0.05, 0.4, 0.8, 1.2, 1.56], dtype=torch.float64)
    sigma, cos = SD * torch.tan(t), torch.cos(t)[:, None]
    torch.testing.assert_close(trig.x0(x, t, class_labels=y), edm.x0(x / cos, sigma, class_labels=y),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trig.x0_from(x, t, TrigFlowPath(SD), class_labels=y),
                               edm.x0_from(x, t, TrigFlowPath(SD), class_labels=y), rtol=1e-12, atol=1e-12)
    tf = PreconditionedNet(_mlp(), "trigflow_edm", SD)
    assert torch.equal(tf.x0(x.float(), torch.zeros(6)), x.float())
    label_rate = torch.func.jvp(lambda t_: TrigFlowEDMPreconditioning(SD).inputs(x, t_)[1], (t,),
                                (torch.cos(t) * torch.sin(t),))[1]
    torch.testing.assert_close(label_rate, torch.full_like(t, 0.25), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Float64 round trips


@pytest.mark.parametrize("name", ONE_TIME + TWO_TIME)
def test_float64_round_trips(name):
    """raw -> prediction -> raw, and prediction -> (x0, eps) -> prediction through `predictions.py`; the
    class's own x0 agrees with the generic conversion (TrigFlow's closed form included)."""
    torch.manual_seed(0)
    p = PRECONDITIONINGS[name](SD, 0.002)
    B = 6
    x, F, t = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64), _times(name, B)
    if p.two_time:
        s = t * 0.4  # s < t; and s = t, where the prediction has the kind `p.prediction`
        torch.testing.assert_close(p.raw_target(p.output(F, x, t, s), x, t, s), F, rtol=1e-12, atol=1e-12)
        pred = p.output(F, x, t, t)
    else:
        pred = p.output(F, x, t)
        torch.testing.assert_close(p.raw_target(pred, x, t), F, rtol=1e-12, atol=1e-12)
    x0, eps = to_x0_eps(pred, p.prediction, x, t, p.path)
    torch.testing.assert_close(from_x0_eps(x0, eps, p.prediction, t, p.path), pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.path.noise(x0, eps, t), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.to_x0(pred, x, t), x0, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Exact boundaries


def test_boundaries_are_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    cm = PreconditionedNet(_mlp(), "consistency", SD, 0.002)
    assert torch.equal(cm.x0(x, torch.full((4,), 0.002)), x)  # CM: f(x, eps) = x
    tf = PreconditionedNet(_mlp(), "trigflow", SD)
    assert torch.equal(tf.x0(x, torch.zeros(4)), x)  # sCM: f(x, 0) = x
    t = torch.tensor([0.002, 0.5, 3.0, 80.0])
    ctm = PreconditionedNet(_mlp(second_time=True), "ctm", SD, 0.002)
    assert torch.equal(ctm.jump(x, t, t), x)  # CTM: G(x, t, t) = x
    assert torch.equal(ctm.x0(x, torch.full((4,), 0.002)), x)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    fm = PreconditionedNet(_mlp(second_time=True), "flow_map", SD)
    assert torch.equal(fm.jump(x, t, t), x)  # AYF: f(x, t, t) = x
    assert torch.equal(fm.x0(x, torch.zeros(4)), x)
    assert not torch.equal(fm.jump(x, t, t * 0.5)[1:], x[1:])  # the map does move when s != t


def test_two_time_nets_feed_s_and_x0_is_the_jump_to_time_zero():
    calls = []

    class Recorder(torch.nn.Module):
        second_time = True

        def forward(self, x, noise_labels, class_labels=None, s_labels=None, return_features=False):
            calls.append((x, noise_labels, s_labels))
            return torch.sin(x) + noise_labels[:, None] - 0.5 * s_labels[:, None]

    x = torch.randn(3, 2, dtype=torch.float64)
    t, s = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.002], dtype=torch.float64)
    ctm = PreconditionedNet(Recorder(), "ctm", SD, 0.002)
    ctm.jump(x, t, s)
    x_in, lt, ls = calls[-1]
    torch.testing.assert_close(x_in, x / torch.sqrt(t**2 + SD**2)[:, None], rtol=1e-15, atol=0)
    assert torch.equal(lt, torch.log(t) / 4) and torch.equal(ls, torch.log(s) / 4)
    ctm(x, t)
    assert torch.equal(calls[-1][2], torch.log(t) / 4)  # forward without s: s = t (the denoiser g(x, t, t))
    assert torch.equal(ctm.x0(x, t), ctm.jump(x, t, torch.full((3,), 0.002, dtype=torch.float64)))
    fm = PreconditionedNet(Recorder(), "flow_map")
    t, s = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64), torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64)
    out = fm.jump(x, t, s)
    assert torch.equal(calls[-1][0], x) and torch.equal(calls[-1][1], t) and torch.equal(calls[-1][2], s)
    F = torch.sin(x) + t[:, None] - 0.5 * s[:, None]
    torch.testing.assert_close(out, x + (s - t)[:, None] * F, rtol=1e-15, atol=0)
    assert torch.equal(fm.x0(x, t), fm.jump(x, t, 0.0))


def test_flow_map_jvp_in_t_with_a_real_net():
    """AYF's EMD tangent differentiates F(x_t, t, s) in (x, t) by forward mode; the class must allow it."""
    fm = PreconditionedNet(_mlp(second_time=True), "flow_map").double()
    x, t, s = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64), None
    s = t * 0.5
    v = torch.randn(4, 3, dtype=torch.float64)
    F, dF = torch.func.jvp(lambda x_, t_: fm(x_, t_, s=s), (x, t), (v, torch.ones(4, dtype=torch.float64)))
    h = 1e-6
    fd = (fm(x + h * v, t + h, s=s) - fm(x - h * v, t - h, s=s)) / (2 * h)
    torch.testing.assert_close(dF, fd, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Closed-form optima for 1-D Gaussian data x ~ N(0, S^2)
#
# On x_t = a x + b z the posterior mean is E[x | x_t] = a S^2 / (a^2 S^2 + b^2) x_t, and the PF-ODE keeps the
# standardised value x_t / std(t) fixed, std(t)^2 = a^2 S^2 + b^2, so its exact jump is x_t std(s) / std(t).


def _ab(path_name, t, sd=SD):
    if path_name == "edm":
        return torch.ones_like(t), t
    if path_name == "vp":
        return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    if path_name == "trigflow":
        return torch.cos(t), sd * torch.sin(t)
    return 1 - t, t  # linear


def _posterior_mean(x_t, a, b):
    return (a * S_GAUSS**2 / (a**2 * S_GAUSS**2 + b**2))[:, None] * x_t


class _GaussianOptimum(torch.nn.Module):
    """The raw network that makes each one-time preconditioning output the exact Gaussian optimum.
    It decodes (x_t, t) from its inputs by the papers' formulas, not by the library's."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x_in, label, class_labels=None, return_features=False):
        k = self.kind
        if k == "edm":  # EDM Table 1: label = ln(sigma)/4, x_in = x / sqrt(sigma^2 + sd^2)
            sigma = torch.exp(4 * label)
            x = x_in * torch.sqrt(sigma**2 + SD**2)[:, None]
            c_skip = SD**2 / (sigma**2 + SD**2)
            c_out = sigma * SD / torch.sqrt(sigma**2 + SD**2)
            return (_posterior_mean(x, *_ab("edm", sigma)) - c_skip[:, None] * x) / c_out[:, None]
        if k in ("vp_eps", "vp_v"):  # DDPM-style: x_in = x_t, label = 1000 t
            t = label / 1000
            a, b = _ab("vp", t)
            x0 = _posterior_mean(x_in, a, b)
            eps = (x_in - a[:, None] * x0) / b[:, None]
            return eps if k == "vp_eps" else a[:, None] * eps - b[:, None] * x0
        if k == "velocity":  # v = E[z - x | x_t] on the linear path
            a, b = _ab("linear", label)
            x0 = _posterior_mean(x_in, a, b)
            eps = (x_in - a[:, None] * x0) / b[:, None]
            return eps - x0
        # trigflow: x_in = x_t / sd, velocity = sd F = -sin t x0 + cos t sd eps
        a, b = _ab("trigflow", label)
        x_t = x_in * SD
        x0 = _posterior_mean(x_t, a, b)
        eps = (x_t - a[:, None] * x0) / b[:, None]
        return (-torch.sin(label)[:, None] * x0 + torch.cos(label)[:, None] * SD * eps) / SD


@pytest.mark.parametrize("kind", ["vp_eps", "vp_v", "velocity", "trigflow"])
def test_gaussian_optimum_gives_the_same_x0_as_edm(kind):
    """Nets holding the exact optimum on other paths give the EDM optimum's x0 at equal-SNR states."""
    torch.manual_seed(0)
    edm = PreconditionedNet(_GaussianOptimum("edm"), "edm", SD)
    other = PreconditionedNet(_GaussianOptimum(kind), kind, SD)
    sigma = torch.tensor([0.01, 0.2, 0.7, 2.0, 9.0], dtype=torch.float64)
    x_edm = (torch.randn(5, 1, dtype=torch.float64) * S_GAUSS + sigma[:, None] * torch.randn(5, 1, dtype=torch.float64))
    x_o, t_o = convert(x_edm, sigma, EDMPath(), other.path)
    exact = (S_GAUSS**2 / (S_GAUSS**2 + sigma**2))[:, None] * x_edm
    torch.testing.assert_close(edm.x0(x_edm, sigma), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other.x0(x_o, t_o), exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(edm.x0_from(x_o, t_o, other.path), exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(other.x0_from(x_edm, sigma, EDMPath()), exact, rtol=1e-9, atol=1e-10)


def test_consistency_net_with_the_exact_ode_end_point():
    """CM's consistency function for Gaussian data is the PF-ODE jump to eps: x sqrt((S^2 + eps^2)/(S^2 + sigma^2))."""
    eps = 0.002

    class ExactCM(torch.nn.Module):
        def forward(self, x_in, label, class_labels=None, return_features=False):
            sigma = torch.exp(4 * label)
            x = x_in * torch.sqrt(sigma**2 + SD**2)[:, None]
            f = torch.sqrt((S_GAUSS**2 + eps**2) / (S_GAUSS**2 + sigma**2))[:, None] * x
            c_skip = SD**2 / ((sigma - eps) ** 2 + SD**2)  # CM App. C
            c_out = SD * (sigma - eps) / torch.sqrt(SD**2 + sigma**2)
            return (f - c_skip[:, None] * x) / c_out[:, None]

    cm = PreconditionedNet(ExactCM(), "consistency", SD, eps)
    sigma = torch.tensor([0.01, 0.5, 5.0, 80.0], dtype=torch.float64)
    x = torch.randn(4, 1, dtype=torch.float64)
    torch.testing.assert_close(cm.x0(x, sigma), torch.sqrt((S_GAUSS**2 + eps**2) / (S_GAUSS**2 + sigma**2))[:, None] * x,
                               rtol=1e-10, atol=1e-12)


class _ExactCTM(torch.nn.Module):
    """CTM's raw net holding the exact trajectory map of Gaussian data on the EDM path, decoded from
    (c_in(t) x, ln(t)/4, ln(s)/4): G* = x sqrt((S^2 + s^2)/(S^2 + t^2)), g* = (G* - (s/t) x) / (1 - s/t),
    and at s = t the limit g* = the denoiser S^2/(S^2 + t^2) x."""

    second_time = True

    def forward(self, x_in, label, class_labels=None, s_labels=None, return_features=False):
        t, s = torch.exp(4 * label)[:, None], torch.exp(4 * s_labels)[:, None]
        x = x_in * torch.sqrt(t**2 + SD**2)
        G = torch.sqrt((S_GAUSS**2 + s**2) / (S_GAUSS**2 + t**2)) * x
        g = torch.where(s == t, S_GAUSS**2 / (S_GAUSS**2 + t**2) * x, (G - (s / t) * x) / (1 - s / t))
        c_skip, c_out = SD**2 / (t**2 + SD**2), t * SD / torch.sqrt(t**2 + SD**2)
        return (g - c_skip * x) / c_out


class _ExactFlowMap(torch.nn.Module):
    """Flow-map raw net holding the exact map on the linear path: f* = x std(s)/std(t), F* = (f* - x)/(s - t),
    and at s = t the PF-ODE velocity x d ln std / dt."""

    second_time = True

    def forward(self, x, t, class_labels=None, s_labels=None, return_features=False):
        t, s = t[:, None], s_labels[:, None]

        def std(u):
            return torch.sqrt((1 - u) ** 2 * S_GAUSS**2 + u**2)

        f = std(s) / std(t) * x
        v = (-(1 - t) * S_GAUSS**2 + t) / std(t) ** 2 * x
        return torch.where(s == t, v, (f - x) / torch.where(s == t, torch.ones_like(s), s - t))


def test_ctm_composition_equals_the_direct_jump():
    """G(G(x, t, u), u, s) = G(x, t, s) for the exact trajectory map; G(x, t, t) = x; g(x, t, t) denoises."""
    torch.manual_seed(0)
    ctm = PreconditionedNet(_ExactCTM(), "ctm", SD, 0.002)
    t = torch.tensor([80.0, 10.0, 1.0, 0.3], dtype=torch.float64)
    u, s = t * 0.3, t * 0.05
    x = torch.randn(4, 1, dtype=torch.float64) * torch.sqrt(S_GAUSS**2 + t[:, None] ** 2)
    direct = ctm.jump(x, t, s)
    torch.testing.assert_close(ctm.jump(ctm.jump(x, t, u), u, s), direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(direct, torch.sqrt((S_GAUSS**2 + s**2) / (S_GAUSS**2 + t**2))[:, None] * x,
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(ctm.jump(x, t, t), x)
    torch.testing.assert_close(ctm(x, t), _posterior_mean(x, *_ab("edm", t)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctm.x0(x, t), ctm.jump(ctm.jump(x, t, u), u, torch.full_like(t, 0.002)),
                               rtol=1e-10, atol=1e-12)


def test_flow_map_composition_equals_the_direct_jump():
    torch.manual_seed(0)
    fm = PreconditionedNet(_ExactFlowMap(), "flow_map", SD)
    t = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    u, s = t * 0.6, t * 0.1
    x = torch.randn(4, 1, dtype=torch.float64)
    direct = fm.jump(x, t, s)
    torch.testing.assert_close(fm.jump(fm.jump(x, t, u), u, s), direct, rtol=1e-10, atol=1e-12)
    assert torch.equal(fm.jump(x, t, t), x)
    # s = t is the flow-matching velocity: it matches the velocity net holding the Gaussian optimum
    vel = PreconditionedNet(_GaussianOptimum("velocity"), "velocity", SD)
    torch.testing.assert_close(fm(x, t), vel(x, t), rtol=1e-10, atol=1e-12)
    # the one-step x0 is the ODE end point x std(0)/std(t), not the posterior mean
    std = torch.sqrt((1 - t) ** 2 * S_GAUSS**2 + t**2)[:, None]
    torch.testing.assert_close(fm.x0(x, t), S_GAUSS / std * x, rtol=1e-10, atol=1e-12)
