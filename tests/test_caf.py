"""Constant Acceleration Flow (lit_fewstep/methods/caf.py): the path, its rectified-flow limit, the N-step sampler and
inversion on exact fields, the losses, the reflow pairs on the teacher's own path. The conformance suite
(tests/test_conformance.py) runs CAF and its 2-rectified-flow configuration through fit / sample / export / resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_fewstep.data.pairs import make_pairs
from lit_fewstep.diffusion.paths import LinearPath
from lit_fewstep.methods import CAF
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.methods.caf import caf_acceleration, caf_estimate, caf_path, caf_pseudo_huber
from lit_fewstep.nets import MLP

F64 = torch.float64


class Field(nn.Module):
    """A hand-written field fn(x, tau, extra) posing as a 2-D network (exact velocity / acceleration)."""

    in_channels, img_resolution, num_classes = 2, None, 0

    def __init__(self, fn, extra_channels: int = 0):
        super().__init__()
        self.fn, self.extra_channels = fn, extra_channels
        self.calls = []
        self.weight = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x, noise_labels, class_labels=None, extra=None):
        self.calls.append((x, noise_labels, extra))
        return self.fn(x, noise_labels, extra)


def one_pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(3, 2, generator=g, dtype=F64) for _ in range(3))  # x0, x1, an arbitrary v0


def exact_caf(x0, x1, v0, h: float = 1.5) -> CAF:
    """CAF whose velocity net returns v0 (any value) and whose acceleration net returns 2 (x1 - x0 - v0_given): the
    exact fields of a single coupling (x0, x1), whatever v0 is."""
    velocity = Field(lambda x, t, e: v0.expand_as(x))
    acceleration = Field(lambda x, t, e: caf_acceleration(x0, x1, e), extra_channels=2)
    return CAF(velocity, acceleration, h=h, ema_decay=0.0)


# ----------------------------------------------------------------------------------------------- the path
def test_path_hits_x0_at_0_and_x1_at_1_for_any_v0_with_velocity_v0_and_acceleration_a():
    x0, x1, v0 = one_pair()
    for scale in (0.0, 1.0, -3.0):
        v = scale * v0
        torch.testing.assert_close(caf_path(x0, x1, v, torch.zeros(3, dtype=F64)), x0, rtol=0, atol=1e-15)
        torch.testing.assert_close(caf_path(x0, x1, v, torch.ones(3, dtype=F64)), x1, rtol=0, atol=1e-15)
        tau = torch.tensor(0.37, dtype=F64)
        d1 = torch.func.jacfwd(lambda s: caf_path(x0, x1, v, s.expand(3)))(tau)
        d2 = torch.func.jacfwd(torch.func.jacfwd(lambda s: caf_path(x0, x1, v, s.expand(3))))(tau)
        a = caf_acceleration(x0, x1, v)
        torch.testing.assert_close(d1, v + a * tau, rtol=1e-12, atol=1e-12)  # dx/dtau = v0 + a tau
        torch.testing.assert_close(d2, a, rtol=1e-12, atol=1e-12)  # constant acceleration
        for t in (0.0, 0.4, 1.0):  # the one-step estimate (Eq. 9) from any point of the path lands on x1
            tt = torch.full((3,), t, dtype=F64)
            torch.testing.assert_close(caf_estimate(caf_path(x0, x1, v, tt), tt, v, a), x1, rtol=1e-12, atol=1e-12)


def test_h1_and_zero_acceleration_is_rectified_flow_on_the_linear_path():
    """v0* = x1 - x0 (h = 1): a = 0, the path is the package's linear path at t = 1 - tau (CAF's x0 its noise z, x1
    its data), and the velocity target is minus the linear path's dx/dt."""
    x0, x1, _ = one_pair(1)
    v0 = 1.0 * (x1 - x0)
    assert torch.equal(caf_acceleration(x0, x1, v0), torch.zeros_like(x0))
    tau = torch.tensor([0.0, 0.3, 0.9], dtype=F64)
    linear = LinearPath()
    torch.testing.assert_close(caf_path(x0, x1, v0, tau), linear.noise(x1, x0, 1 - tau), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v0, -linear.velocity(x1, x0, 1 - tau), rtol=0, atol=0)
    # and the 2-RF configuration samples that straight line exactly at every N (Euler on the linear path)
    rf = CAF(Field(lambda x, t, e: (x1 - x0).expand_as(x)), None, h=1.0, ema_decay=0.0)
    for nfe in (1, 2, 5):
        out, spent = rf.generate(rf.flow, x0, nfe)
        torch.testing.assert_close(out, x1, rtol=1e-13, atol=1e-13)
        assert spent == nfe


def test_rectified_flow_sampler_is_euler_in_caf_time():
    """2-RF's sampler is x_{i+1} = x_i + v(x_i, tau_i) / N with the network fed CAF's tau (not the package's t)."""
    field = Field(lambda x, t, e: torch.sin(3 * x) + t[:, None] * x)
    rf = CAF(field, None, h=1.0, ema_decay=0.0)
    x = torch.randn(4, 2, dtype=F64)
    for N in (1, 3):
        out, _ = rf.generate(rf.flow, x, N)
        ref = x.clone()
        for i in range(N):
            tau = torch.full((4,), i / N, dtype=F64)
            ref = ref + field.fn(ref, tau, None) / N
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- sampler, inversion
@pytest.mark.parametrize("N", [1, 2, 3, 4, 7])
def test_n_step_sampler_with_the_exact_v0_and_a_lands_on_x1_for_every_n(N):
    """Even with a v0 that is not h (x1 - x0): the acceleration conditioned on that v0 corrects it (IVC)."""
    x0, x1, v0 = one_pair(2)
    for v in (v0, 1.5 * (x1 - x0)):
        model = exact_caf(x0, x1, v)
        out, spent = model.generate(model.flow, x0, N + 1)
        torch.testing.assert_close(out, x1, rtol=1e-12, atol=1e-12)
        assert spent == N + 1
        assert len(model.flow.velocity.calls) == 1 and len(model.flow.acceleration.calls) == N
        assert all(torch.equal(extra, v) for _, _, extra in model.flow.acceleration.calls)  # v0, kept
        taus = [float(t[0]) for _, t, _ in model.flow.acceleration.calls]
        assert taus == pytest.approx([i / N for i in range(N)], abs=1e-12)  # CAF's clock: noise at 0


def test_one_evaluation_is_the_velocity_net_alone():
    x0, x1, _ = one_pair(3)
    model = exact_caf(x0, x1, 1.5 * (x1 - x0), h=1.5)
    out, spent = model.generate(model.flow, x0, 1)
    torch.testing.assert_close(out, x1, rtol=1e-13, atol=1e-13)  # x0 + v0* / h
    assert spent == 1 and not model.flow.acceleration.calls


def test_sampler_is_the_papers_update_for_a_nonconstant_acceleration():
    """z_{i+1} = z_i + v0 D + (tau_i + D / 2) a(z_i, tau_i, v0) D, D = 1 / N, v0 = v(z_0, 0) (CAF Eq. 10)."""
    v_fn = lambda x, t, e: torch.cos(x) + 0.5  # noqa: E731
    a_fn = lambda x, t, e: torch.tanh(x * e) - t[:, None] * x  # noqa: E731
    model = CAF(Field(v_fn), Field(a_fn, extra_channels=2), ema_decay=0.0)
    z = torch.randn(5, 2, dtype=F64)
    N = 4
    out, _ = model.generate(model.flow, z, N + 1)
    v0 = v_fn(z, torch.zeros(5, dtype=F64), None)
    ref, D = z.clone(), 1.0 / N
    for i in range(N):
        tau = torch.full((5,), i * D, dtype=F64)
        ref = ref + v0 * D + (tau[:, None] + D / 2) * a_fn(ref, tau, v0) * D
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 9])
def test_inversion_inverts_sampling_for_exact_fields(nfe):
    x0, x1, _ = one_pair(4)
    model = exact_caf(x0, x1, 1.5 * (x1 - x0))  # the exact v0* is the same at tau = 0 and tau = 1
    z, spent = model.invert(x1, nfe)
    torch.testing.assert_close(z, x0, rtol=1e-12, atol=1e-12)
    assert spent == nfe
    back, _ = model.generate(model.flow, z, nfe)
    torch.testing.assert_close(back, x1, rtol=1e-12, atol=1e-12)
    rf = CAF(Field(lambda x, t, e: (x1 - x0).expand_as(x)), None, h=1.0, ema_decay=0.0)
    torch.testing.assert_close(rf.invert(x1, nfe)[0], x0, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- losses
def with_pairs(model: CAF, x0, x1) -> CAF:
    model.register_buffer("pair_noise", x0, persistent=False)
    model.register_buffer("pair_x", x1, persistent=False)
    model.register_buffer("pair_labels", None, persistent=False)
    return model


def test_pseudo_huber_uses_the_official_constant():
    r = torch.tensor([[3.0, 4.0]], dtype=F64)
    c = 0.00054 * 2
    assert caf_pseudo_huber(r, torch.zeros_like(r)).item() == pytest.approx((math.sqrt(25 + c * c) - c) / 2, rel=1e-14)
    img = torch.ones(1, 3, 4, 4, dtype=F64)  # D = 48: c = 0.02592, not iCT's 0.00054 sqrt(48)
    c = 0.00054 * 48
    assert caf_pseudo_huber(img, 0 * img).item() == pytest.approx((math.sqrt(48 + c * c) - c) / 48, rel=1e-14)


def test_losses_vanish_on_the_exact_fields_and_not_otherwise():
    x0 = torch.tensor([[1.0, -1.0]], dtype=F64).expand(8, 2).contiguous()  # one coupling, repeated
    x1 = torch.tensor([[-2.0, 0.5]], dtype=F64).expand(8, 2).contiguous()
    h = 1.5
    batch = (torch.zeros(8, 2, dtype=F64),)
    velocity = Field(lambda x, t, e: h * (x1[:1] - x0[:1]).expand_as(x))
    good = with_pairs(CAF(velocity, Field(lambda x, t, e: caf_acceleration(x0[:1], x1[:1], e), 2), h=h,
                          ema_decay=0.0), x0, x1)
    assert good.velocity_loss(batch).item() == pytest.approx(0.0, abs=1e-12)
    assert good.acceleration_loss(batch).item() == pytest.approx(0.0, abs=1e-12)
    v_off = Field(lambda x, t, e: 0.3 * (x1[:1] - x0[:1]).expand_as(x))  # a wrong v0: a* absorbs it
    fixed = with_pairs(CAF(v_off, Field(lambda x, t, e: caf_acceleration(x0[:1], x1[:1], e), 2), h=h,
                           ema_decay=0.0), x0, x1)
    assert fixed.velocity_loss(batch).item() > 0.1
    assert fixed.acceleration_loss(batch).item() == pytest.approx(0.0, abs=1e-12)
    blind = with_pairs(CAF(v_off, Field(lambda x, t, e: caf_acceleration(x0[:1], x1[:1], 0 * x), 2), h=h,
                           ema_decay=0.0), x0, x1)  # ignores v0: wrong
    assert blind.acceleration_loss(batch).item() > 0.1


def test_acceleration_stage_starts_from_the_ema_velocity_and_feeds_it_v0():
    net = lambda extra=0: MLP(dim=2, hidden=16, depth=1, emb_dim=8, extra_channels=extra)  # noqa: E731
    model = CAF(net(), net(2), velocity_iterations=3, ema_decay=0.5)
    with torch.no_grad():
        for p in model.flow.velocity.parameters():
            p.add_(1.0)  # raw weights differ from the EMA
    model.begin_acceleration()
    for p, q in zip(model.flow.velocity.parameters(), model.ema.velocity.parameters()):
        assert torch.equal(p, q)
    assert [s.name for s in model.stages] == ["velocity", "acceleration"] and model.stages[1].start == 3


def test_bad_configurations_are_refused_with_the_field():
    mlp = lambda extra=0: MLP(dim=2, hidden=8, depth=1, emb_dim=8, extra_channels=extra)  # noqa: E731
    with pytest.raises(ValueError, match="^acceleration_net: with ivc .*extra_channels to 2"):
        CAF(mlp(), mlp(0))
    with pytest.raises(ValueError, match="^acceleration_net: without ivc"):
        CAF(mlp(), mlp(2), ivc=False)
    with pytest.raises(ValueError, match="^h: without an acceleration net"):
        CAF(mlp(), None, h=1.5)
    with pytest.raises(ValueError, match="^h:"):
        CAF(mlp(), mlp(2), h=0.0)
    with pytest.raises(ValueError, match="^pairs_path:"):
        CAF(mlp(), mlp(2)).prepare()


# ----------------------------------------------------------------------------------------------- couplings
def test_linear_pairs_start_from_the_noise_on_the_teachers_own_path():
    """One Euler step of the flow-matching teacher from t = 1 is its data estimate at t = 1 from z itself (not from
    sigma_max z on the EDM path): the pair's noise is the exact start of the teacher's flow."""
    teacher = load_teacher("lit_fewstep/assets/fm_tree.pt")
    pairs = make_pairs(teacher, 16, nfe=1, seed=0, path="linear")
    assert pairs["path"] == "linear" and math.isinf(pairs["sigma_max"]) and pairs["nfe"] == 1
    z, y = pairs["noise"], pairs["labels"]
    with torch.no_grad():
        expected = teacher.x0(z, torch.ones(16), class_labels=y)
    torch.testing.assert_close(pairs["x"], expected, rtol=1e-5, atol=1e-5)
    edm = load_teacher("lit_fewstep/assets/edm_tree.pt")
    with pytest.raises(ValueError, match="^path: 'linear'"):
        make_pairs(edm, 4, nfe=1, path="linear")


# ----------------------------------------------------------------------------------------------- adversarial stage
def test_adversarial_stage_alternates_and_its_fake_is_the_one_step_estimate():
    mlp = lambda extra=0: MLP(dim=2, hidden=8, depth=1, emb_dim=8, extra_channels=extra)  # noqa: E731
    model = CAF(mlp(), mlp(2), velocity_iterations=3, acceleration_iterations=4, adversarial_iterations=6,
                ema_decay=0.0)
    assert [s.name for s in model.stages] == ["velocity", "acceleration", "adversarial"]
    active = {k: [p.name for p in model.phases if p.active(k)] for k in range(12)}
    assert active[2] == ["velocity"] and active[3] == ["acceleration"] and active[6] == ["acceleration"]
    assert [active[k] for k in range(7, 12)] == [["discriminator"], ["adversarial"], ["discriminator"],
                                                 ["adversarial"], ["discriminator"]]
    x0, x1, v0 = one_pair(5)
    exact = exact_caf(x0, x1, v0)
    # the generator's fake x̂_1 = x0 + v0 + a(x0, 0, v0) / 2 is x1 on the exact fields, whatever v0 is
    torch.testing.assert_close(exact.one_step_estimate(x0, None), x1, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="^adversarial_iterations:"):
        CAF(mlp(), mlp(2), adversarial_iterations=5)  # the acceleration stage never ends
    with pytest.raises(ValueError, match="^generator_every:"):
        CAF(mlp(), mlp(2), acceleration_iterations=3, adversarial_iterations=5, generator_every=1)


def test_ema_warms_up_like_the_official_one_and_restarts_with_each_stage():
    """decay_n = min(ema_decay, 1 - (1 + n)^(-2/3)) at the n-th update of a stage (n from 0: the first copies)."""
    net = lambda extra=0: MLP(dim=2, hidden=8, depth=1, emb_dim=8, extra_channels=extra)  # noqa: E731
    model = CAF(net(), net(2), velocity_iterations=3, ema_decay=0.9)
    raw, ema = model.flow.velocity.out.bias, model.ema.velocity.out.bias
    expected = ema.detach().clone()
    for n in range(4):
        with torch.no_grad():
            raw.add_(1.0)
        model.update_ema()
        decay = min(0.9, 1.0 - (1.0 + n) ** (-2 / 3))
        expected = decay * expected + (1 - decay) * raw.detach()
        torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-6)
    assert int(model.ema_stage_updates) == 4
    model.begin_acceleration()
    assert int(model.ema_stage_updates) == 0 and torch.equal(raw, ema)  # stage 2 starts from the EMA velocity
