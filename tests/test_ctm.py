"""CTM (lit_fewstep/methods/ctm.py): the trajectory map, the official draw and target, gamma-sampling, the
adaptive weights. The conformance suite (tests/test_conformance.py) runs CTM through fit / sample / export /
resume with the other methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_fewstep.diffusion.precond import PreconditionedNet, edm_coefficients
from lit_fewstep.diffusion.solvers import consistency_sigmas, gaussian_noise, heun_step, multistep_consistency_sample
from lit_fewstep.methods import CTM
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.methods.ctm import adaptive_weight, heun_step_probs, last_layer
from lit_fewstep.nets import MLP

TREE_TEACHER = "lit_fewstep/assets/edm_tree.pt"


def tree_ctm(**kw) -> CTM:
    net = MLP(dim=2, hidden=128, depth=3, emb_dim=64, num_classes=2, second_time=True)
    module = CTM(net, TREE_TEACHER, num_scales=18, sigma_data=1.062, **kw)
    module._init_from(module._teacher())
    return module


def random_out(module: nn.Module, seed: int = 0) -> None:
    """A non-trivial output layer (an untrained MLP outputs exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.net.out.weight, module.net.out.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ----------------------------------------------------------------------------------------------- the map
def test_jump_to_the_same_time_is_the_identity_exactly():
    net = PreconditionedNet(MLP(dim=2, hidden=16, depth=2, emb_dim=8, second_time=True), "ctm", 0.5, 0.002)
    random_out(net)
    x = torch.randn(64, 2)
    t = torch.exp(torch.randn(64) * 2).clamp(0.002, 80)
    assert torch.equal(net.jump(x, t, t), x)


class ExactGaussianMap(nn.Module):
    """The raw network whose CTM map is the exact PF-ODE trajectory map of 1-D data N(0, sigma_d^2) on the EDM
    path: x_s = x_t sqrt((s^2 + sigma_d^2) / (t^2 + sigma_d^2)), so g = (G - (s/t) x) / (1 - s/t) (s < t) and the
    denoiser sigma_d^2 / (t^2 + sigma_d^2) x at s = t."""

    in_channels, num_classes, second_time = 1, 0, True

    def __init__(self, sigma_d: float):
        super().__init__()
        self.sigma_d = sigma_d

    def forward(self, x_in, noise_labels, class_labels=None, s_labels=None, return_features=False):
        t, s = torch.exp(4 * noise_labels)[:, None], torch.exp(4 * s_labels)[:, None]
        _, _, c_in, _ = edm_coefficients(t, self.sigma_d)
        x = x_in / c_in
        d2 = self.sigma_d**2
        exact = x * torch.sqrt((s * s + d2) / (t * t + d2))
        ratio = s / t
        g = torch.where(ratio < 1, (exact - ratio * x) / (1 - ratio).clamp_min(1e-300), d2 / (t * t + d2) * x)
        c_skip, c_out, _, _ = edm_coefficients(t, self.sigma_d)
        return (g - c_skip * x) / c_out


def test_composition_equals_the_direct_jump_for_the_exact_gaussian_map():
    sigma_d = 0.7
    net = PreconditionedNet(ExactGaussianMap(sigma_d), "ctm", sigma_d, 0.002)
    x = torch.randn(256, 1, dtype=torch.float64)
    t = torch.full((256,), 40.0, dtype=torch.float64)
    u = torch.full((256,), 3.0, dtype=torch.float64)
    s = torch.full((256,), 0.05, dtype=torch.float64)
    direct = net.jump(x, t, s)
    composed = net.jump(net.jump(x, t, u), u, s)
    torch.testing.assert_close(composed, direct, rtol=1e-10, atol=1e-12)
    closed = x * math.sqrt((0.05**2 + sigma_d**2) / (40.0**2 + sigma_d**2))
    torch.testing.assert_close(direct, closed, rtol=1e-10, atol=1e-12)
    # and a wrong map (t -> u -> s through a halved middle time) does not compose
    assert not torch.allclose(net.jump(net.jump(x, t, u / 2), u, s), direct, rtol=1e-3)


# ----------------------------------------------------------------------------------------------- the official draw and target
def test_draw_order_and_heun_step_distribution():
    module = tree_ctm()
    x = torch.zeros(4096, 2)
    grid = module.grid().float()
    counts = torch.zeros(module.max_heun_steps + 1)
    for k in range(60):
        module.iteration.fill_(k)
        module._draws = 0
        n, i, t, u, s = module.draw_times(x)
        counts[n] += 1
        assert 1 <= n <= module.max_heun_steps
        assert torch.equal(t, grid[i]) and torch.equal(u, grid[i + n])
        assert bool((s <= u).all() and (u < t).all() and (s >= module.sigma_min * (1 - 1e-6)).all())
        assert bool((s == u).any()) and bool((s == grid[-1]).any())
    assert heun_step_probs(4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert counts[13:].sum() > counts[:5].sum()  # P(n) grows with n


def test_target_with_u_equal_s_is_the_teacher_solution_carried_to_time_zero():
    torch.manual_seed(0)
    module = tree_ctm()
    random_out(module.student)  # the inner jump must not matter at u = s, whatever the student is
    teacher = load_teacher(TREE_TEACHER)
    grid = module.grid()
    B, n = 32, 3
    i = torch.randint(0, module.num_scales - 1 - n, (B,))
    t, u = grid[i].float(), grid[i + n].float()
    y = torch.randint(0, 2, (B,))
    x_t = torch.randn(B, 2) * t[:, None]
    target = module.ctm_target(x_t, i, n, u, u, y)
    x = x_t
    for k in range(n):  # by hand: n teacher Heun steps on the grid
        x = heun_step(lambda xx, tt: teacher(xx, tt, class_labels=y), x, grid[i + k].float(), grid[i + k + 1].float(),
                      module.path)
    expected = module.target.jump(x, u, module.sigma_min, class_labels=y)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    # at s < u the student's inner jump enters
    s = torch.full_like(u, module.sigma_min)
    assert not torch.allclose(module.ctm_target(x_t, i, n, u, torch.maximum(s, u / 3), y), expected, atol=1e-3)


def test_init_from_teacher_makes_the_student_the_teachers_denoiser_for_every_s():
    module = tree_ctm()
    teacher = load_teacher(TREE_TEACHER)
    x, t, y = torch.randn(16, 2) * 3, torch.full((16,), 3.0), torch.randint(0, 2, (16,))
    for s in (3.0, 0.5, 0.002):
        torch.testing.assert_close(module.student(x, t, class_labels=y, s=torch.full((16,), s)),
                                   teacher(x, t, class_labels=y))


def test_estimate_gradient_reaches_the_student_not_the_target():
    module = tree_ctm(gan_start=0)
    random_out(module.student)
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    module.generator_loss((x, y)).backward()
    assert module.student.net.out.weight.grad is not None and module.student.net.out.weight.grad.norm() > 0
    assert all(p.grad is None for p in module.target.parameters())
    assert all(p.grad is None for p in module.discriminator.parameters())


# ----------------------------------------------------------------------------------------------- adaptive weights
def _by_hand_norm(module: CTM, loss: torch.Tensor) -> float:
    """||d loss / d W|| at the student's last layer: a full backward, read W's gradient, clear it."""
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    norm = float(module.student.net.out.weight.grad.norm())
    module.zero_grad(set_to_none=True)
    return norm


def test_generator_loss_is_the_adaptively_weighted_sum_in_value_and_gradient():
    """generator_loss backpropagates each part of the graph once (gradients to the student's outputs first); its
    value, its gradient and both adaptive weights must equal L_CTM + w_DSM L_DSM + w_GAN lambda L_GAN with
    w = ||grad_W L_CTM|| / (||grad_W L|| + 1e-4) measured by full backwards by hand."""
    torch.manual_seed(0)
    module = tree_ctm(gan_start=0, discriminator_hidden=32, gan_weight=0.7)
    random_out(module.student)
    x, y = torch.randn(128, 2), torch.randint(0, 2, (128,))
    assert last_layer(module.student) is module.student.net.out.weight
    module.iteration.fill_(1)
    module._draws = 0
    loss = module.generator_loss((x, y))
    loss.backward()
    got = {n: p.grad.clone() for n, p in module.student.named_parameters()}
    assert all(p.grad is None for p in module.target.parameters())
    assert all(p.grad is None for p in module.discriminator.parameters())

    module._draws = 0  # the same draws: t, u, s, noise, then DSM's sigma and noise
    d, estimate, _ = module.ctm_terms(x, y)
    loss_ctm, loss_dsm = d.mean(), module.dsm_loss(x, y)
    loss_gan = -module.discriminate(estimate, y).mean()
    norm_ctm, norm_dsm, norm_gan = (_by_hand_norm(module, l) for l in (loss_ctm, loss_dsm, loss_gan))
    w_dsm = min(norm_ctm / (norm_dsm + 1e-4), 1e4)
    w_gan = min(max(norm_ctm / (norm_gan + 1e-4), 0.01), 10.0)
    assert 0.01 < w_gan < 10.0  # the check is not decided by the clamp
    expected = loss_ctm + w_dsm * loss_dsm + w_gan * 0.7 * loss_gan
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    expected.backward(retain_graph=True)
    for name, p in module.student.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    W = module.student.net.out.weight
    assert float(module.gan_weight_for(torch.tensor(norm_ctm), torch.tensor(norm_gan))) == pytest.approx(w_gan)
    assert float(adaptive_weight(loss_ctm, loss_gan * 1e6, W, clamp=(0.01, 10.0))) == pytest.approx(0.01)


def test_dsm_adaptive_weight_and_off_switch():
    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    module = tree_ctm()
    random_out(module.student)
    module.iteration.fill_(1)
    module._draws = 0
    with_dsm = module.generator_loss((x, y))
    module._draws = 0
    d, _, _ = module.ctm_terms(x, y)
    loss_dsm = module.dsm_loss(x, y)
    w = adaptive_weight(d.mean(), loss_dsm, module.student.net.out.weight)
    torch.testing.assert_close(with_dsm, d.mean() + w * loss_dsm)
    off = tree_ctm(dsm_weight=0)
    off.student.load_state_dict(module.student.state_dict())
    off.iteration.fill_(1)
    torch.testing.assert_close(off.generator_loss((x, y)), d.mean())


def test_fixed_weights_need_no_output_layer(monkeypatch):
    """With a fixed DSM weight and the GAN's weight not adaptive nothing reads the last layer, so a network
    without one trains; the loss is then the plain weighted sum."""
    import lit_fewstep.methods.ctm as ctm_module

    def no_layer(net):
        raise ValueError("no output layer")

    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    module = tree_ctm(dsm_weight=0.5, gan_start=0, gan_adaptive=False, gan_weight=0.3, discriminator_hidden=32)
    random_out(module.student)
    module.iteration.fill_(1)
    monkeypatch.setattr(ctm_module, "last_layer", no_layer)
    module._draws = 0
    loss = module.generator_loss((x, y))
    module._draws = 0
    d, estimate, _ = module.ctm_terms(x, y)
    expected = d.mean() + 0.5 * module.dsm_loss(x, y) - 0.3 * module.discriminate(estimate, y).mean()
    torch.testing.assert_close(loss, expected.detach())


# ----------------------------------------------------------------------------------------------- sampling
def _toy_ctm() -> CTM:
    module = CTM(MLP(dim=2, hidden=16, depth=2, emb_dim=8, second_time=True), "no_teacher_needed.pt",
                 sigma_data=0.8, ema_decay=0.0)
    random_out(module.student)
    return module


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_gamma_one_is_the_consistency_multistep_sampler(nfe):
    module = _toy_ctm()
    out = module.sample(32, nfe, gamma=1.0, generator=torch.Generator().manual_seed(3))
    assert out.nfe == nfe
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(32, 2, generator=gen)
    net = module.student
    times = consistency_sigmas(nfe, module.sigma_min, module.sigma_max, module.rho).float()
    draw = gaussian_noise(gen)
    expected = multistep_consistency_sample(lambda x_t, t: net.x0(x_t, t), noise, times, module.path,
                                            lambda: draw(noise), t_min=module.sigma_min)
    torch.testing.assert_close(out.x, expected, rtol=1e-6, atol=1e-6)


def test_gamma_zero_is_the_deterministic_chain_and_heun_uses_the_denoiser():
    module = _toy_ctm()
    net = module.student
    out = module.sample(16, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    grid = module.sampling_grid(3).float()
    x = noise * module.sigma_max
    for a, b in zip(grid[:-1], grid[1:]):
        x = net.jump(x, a, b)
    torch.testing.assert_close(out.x, x)
    assert module.sample(8, 2, gamma=0.5, generator=torch.Generator().manual_seed(1)).nfe == 2
    heun = module.sample(8, 35, solver="heun", generator=torch.Generator().manual_seed(1))
    assert heun.nfe == 35 and torch.isfinite(heun.x).all()
    with pytest.raises(ValueError, match="^gamma"):
        module.sample(4, 2, gamma=1.5)
    with pytest.raises(ValueError, match="^guidance_scale"):
        module.sample(4, 2, guidance_scale=2.0)


def test_sample_command_takes_gamma_and_heun(tmp_path):
    from lit_fewstep.cli import sample_main

    module = _toy_ctm()
    ckpt = tmp_path / "ctm.pt"
    module.export(str(ckpt))
    for extra, nfe in ((["--gamma", "1.0"], 3), (["--solver", "heun"], 5)):
        out = sample_main(["--ckpt", str(ckpt), "--nfe", str(nfe), "--num", "6", "--seed", "2",
                           "--out", str(tmp_path / f"s{nfe}.npz"), *extra])
        data = np.load(out)
        assert data["samples"].shape == (6, 2) and int(data["nfe"]) == nfe
    expected = module.sample(6, 3, gamma=1.0, generator=torch.Generator().manual_seed(2)).x
    np.testing.assert_allclose(np.load(tmp_path / "s3.npz")["samples"], expected.numpy(), rtol=1e-5, atol=1e-6)
