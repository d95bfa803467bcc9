"""Analog Bits: the bit codec, the sampler (self-conditioning hook, asymmetric intervals), the losses, and an exact
denoiser on the discrete grid toy whose decoded samples must follow the true probability table."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lit_fewstep.data import DigitsDataModule
from lit_fewstep.data.bits import BitCodec, categorical_bits_x0, gray_decode, gray_encode
from lit_fewstep.data.toy import CategoricalGrid
from lit_fewstep.diffusion.paths import VPCosinePath
from lit_fewstep.diffusion.solvers import DDIMStep, run_steps, uniform_times
from lit_fewstep.methods import AnalogBits
from lit_fewstep.methods.analog_bits import (AsymmetricDDIMStep, analog_bits_sample, nearest_bit_accuracy,
                                             token_total_variation)
from lit_fewstep.nets import MLP, UNet

pytestmark = pytest.mark.usefixtures("float32_default_dtype")


# ----------------------------------------------------------------------------------------------- codec
@pytest.mark.parametrize("code", ["binary", "gray"])
@pytest.mark.parametrize("levels", [2, 5, 16, 17, 256])
def test_codec_round_trips_every_token(code, levels):
    codec = BitCodec(levels, -1.0, 1.0, code, scale=0.5)
    tokens = torch.arange(levels)[:, None]
    analog = codec.encode(tokens)
    assert analog.shape == (levels, codec.num_bits) and codec.num_bits == math.ceil(math.log2(levels))
    assert set(analog.unique().tolist()) <= {-0.5, 0.5}
    assert torch.equal(codec.decode(analog), tokens)
    assert torch.equal(codec.quantize(codec.dequantize(tokens)), tokens)
    # every token has its own codeword
    assert analog.unique(dim=0).shape[0] == levels


def test_codec_reference_values_and_layout():
    binary, gray = BitCodec(16, code="binary"), BitCodec(16, code="gray")
    five = torch.tensor([[5]])
    assert binary.to_bits(five).flatten().tolist() == [0, 1, 0, 1]  # MSB first
    assert gray.to_bits(five).flatten().tolist() == [0, 1, 1, 1]  # gray(5) = 5 ^ 2 = 7
    # Gray code: neighbouring levels differ in exactly one bit
    g = gray.to_bits(torch.arange(16)[:, None])
    assert ((g[1:] - g[:-1]).abs().sum(1) == 1).all()
    v = torch.arange(1024)
    assert torch.equal(gray_decode(gray_encode(v), 10), v)
    # images: channel c owns bit channels c n .. c n + n - 1, same pixel
    tokens = torch.randint(0, 16, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    bits = binary.to_bits(tokens)
    assert bits.shape == (3, 8, 4, 4)
    assert torch.equal(bits[:, 4:8], binary.to_bits(tokens[:, 1:2]))
    assert torch.equal(binary.from_bits(bits), tokens)
    # codes past the last level decode to it (17 levels in 5 bits: 31 -> 16)
    assert BitCodec(17).from_bits(torch.ones(1, 5, dtype=torch.long)).item() == 16


def test_digits_are_seventeen_exact_levels_and_four_bit_option():
    dm = DigitsDataModule(image_size=8, batch_size=16)
    x, _ = dm.load_all()
    codec = BitCodec(17)
    tokens = codec.quantize(x)
    assert codec.num_bits == 5 and tokens.min() == 0 and tokens.max() == 16
    assert torch.equal(codec.dequantize(tokens), x)  # x / 8 - 1 of integers 0..16: lossless
    four = BitCodec(16)
    err = (four.dequantize(four.quantize(x)) - x).abs().max().item()
    assert four.num_bits == 4 and 0 < err <= four.step / 2 + 1e-6


def test_codec_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="^num_levels"):
        BitCodec(1)
    with pytest.raises(ValueError, match="^code"):
        BitCodec(4, code="onehot")
    with pytest.raises(ValueError, match="^scale"):
        BitCodec(4, scale=0.0)
    with pytest.raises(ValueError, match="^tokens"):
        BitCodec(4).to_bits(torch.tensor([[4]]))


# ----------------------------------------------------------------------------------------------- sampler
def _x0_fn(x, t, prev=None):
    """A smooth, state- and time-dependent data predictor (not a constant), optionally reading prev."""
    out = torch.tanh(1.7 * x + t[:, None]) * 1.3
    return out if prev is None else out + 0.25 * prev


def test_td_zero_is_plain_ddim():
    path, noise = VPCosinePath(), torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    for steps in (1, 3, 10):
        ours = analog_bits_sample(_x0_fn, noise, steps, path, td=0.0, self_condition=False, clip=1.0)
        plain = run_steps(_x0_fn, noise, uniform_times(steps, 1.0, 0.0, dtype=noise.dtype), DDIMStep(path, clip_x0=1.0))
        assert torch.equal(ours.x, plain.x) and torch.equal(ours.extra["x0"], plain.extra["x0"])
    assert not torch.equal(analog_bits_sample(_x0_fn, noise, 10, path, td=1.0, self_condition=False).x,
                           analog_bits_sample(_x0_fn, noise, 10, path, td=0.0, self_condition=False).x)


def test_asymmetric_step_lands_td_steps_later_but_keeps_the_nominal_time():
    path = VPCosinePath()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    t, t_next, delta = 0.7, 0.6, 0.15
    state = run_steps(_x0_fn, x, [t, t_next], AsymmetricDDIMStep(path, delta))
    tv = torch.full((5,), t)
    x0 = _x0_fn(x, tv)
    eps = (x - path.a(tv)[:, None] * x0) / path.b(tv)[:, None]
    land = torch.tensor(t_next - delta)
    torch.testing.assert_close(state.x, path.a(land) * x0 + path.b(land) * eps)
    assert torch.allclose(state.t, torch.full((5,), t_next))
    # the last step lands on 0 whatever td is: x = x0 there
    end = run_steps(_x0_fn, x, [0.1, 0.0], AsymmetricDDIMStep(path, 0.3))
    torch.testing.assert_close(end.x, _x0_fn(x, torch.full((5,), 0.1)), atol=1e-6, rtol=0)


def _method(self_condition=0.5, loss="mse", **kw):
    torch.manual_seed(0)
    net = MLP(dim=6, hidden=32, depth=2, emb_dim=16, extra_channels=6 if self_condition > 0 else 0)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.5)
    return AnalogBits(net, num_levels=8, low=-1.75, high=1.75, self_condition=self_condition, loss=loss, **kw)


def test_self_conditioning_input_is_zeros_then_the_previous_estimate():
    module = _method()
    calls = []
    predict = module.predict

    def recording(net, x_t, t, x0_prev=None, class_labels=None):
        out = predict(net, x_t, t, x0_prev, class_labels)
        calls.append((x0_prev.clone(), out[0].clone()))
        return out

    module.predict = recording
    samples = module.sample(16, 6, generator=torch.Generator().manual_seed(0))
    assert samples.nfe == 6 and len(calls) == 6
    assert torch.equal(calls[0][0], torch.zeros(16, 6))
    for (_, previous_out), (fed, _) in zip(calls[:-1], calls[1:]):
        assert torch.equal(fed, previous_out.clamp(-1.0, 1.0))
        assert fed.abs().sum() > 0
    # the sample is the decoded last clipped estimate
    assert torch.equal(samples.extras["tokens"], module.codec.decode(calls[-1][1].clamp(-1, 1)))
    # switched off at sampling: zeros at every step
    calls.clear()
    module.sample(16, 4, generator=torch.Generator().manual_seed(0), self_condition=False)
    assert all(fed.abs().sum() == 0 for fed, _ in calls)


def test_training_self_conditions_the_first_half_with_the_detached_estimate():
    module = _method(self_condition=0.5)
    calls = []
    predict = module.predict

    def recording(net, x_t, t, x0_prev=None, class_labels=None):
        out = predict(net, x_t, t, x0_prev, class_labels)
        calls.append((x_t.shape[0], x0_prev.clone(), out[0].detach().clone(), out[0].requires_grad))
        return out

    module.predict = recording
    x, _ = CategoricalGrid().sample(10, torch.Generator().manual_seed(0))
    loss = module.bits_loss((x,))
    (n0, prev0, out0, grad0), (n1, prev1, _, grad1) = calls
    assert (n0, n1) == (5, 10) and not grad0 and grad1 and loss.requires_grad
    assert torch.equal(prev0, torch.zeros(5, 6))
    assert torch.equal(prev1[:5], out0.clamp(-1, 1)) and torch.equal(prev1[5:], torch.zeros(5, 6))


def test_logistic_loss_is_per_bit_cross_entropy():
    module = _method(loss="logistic")
    x, _ = CategoricalGrid().sample(32, torch.Generator().manual_seed(0))
    bits = module.encode(x)
    raw = torch.randn_like(bits)
    ce = F.binary_cross_entropy_with_logits(raw, (bits > 0).float())
    torch.testing.assert_close(-F.logsigmoid(raw * bits / module.codec.scale).mean(), ce)
    x0, out = module.predict(module.model, bits, torch.full((32,), 0.5), torch.zeros_like(bits))
    torch.testing.assert_close(x0, 2 * torch.sigmoid(out) - 1)
    assert torch.isfinite(module.bits_loss((x,)))


def test_sample_returns_tokens_and_the_image_view_for_digits():
    net = UNet(img_resolution=8, in_channels=5, extra_channels=5, model_channels=16, channel_mult=(1,), num_blocks=1,
               attn_resolutions=())
    module = AnalogBits(net)
    assert module.data_shape == (1, 8, 8) and module.noise_shape == (5, 8, 8)
    out = module.sample(3, 2, generator=torch.Generator().manual_seed(0))
    tokens = out.extras["tokens"]
    assert tokens.dtype == torch.int64 and tokens.shape == out.x.shape == (3, 1, 8, 8)
    assert torch.equal(out.x, module.codec.dequantize(tokens)) and out.x.min() >= -1 and out.x.max() <= 1


def test_bad_configuration_names_the_field():
    with pytest.raises(ValueError, match="^net.extra_channels"):
        AnalogBits(MLP(dim=6, hidden=8, depth=1, emb_dim=8), num_levels=8)
    with pytest.raises(ValueError, match="^net.extra_channels"):
        AnalogBits(MLP(dim=6, hidden=8, depth=1, emb_dim=8, extra_channels=6), num_levels=8, self_condition=0.0)
    with pytest.raises(ValueError, match="^net.in_channels"):
        AnalogBits(MLP(dim=7, hidden=8, depth=1, emb_dim=8, extra_channels=7), num_levels=8)
    with pytest.raises(ValueError, match="^loss"):
        _method(loss="softmax")
    with pytest.raises(ValueError, match="^td"):
        _method(td=-1.0)
    with pytest.raises(ValueError, match="^self_condition"):
        _method(self_condition=0.0).sample(2, 2, self_condition=True)


# ----------------------------------------------------------------------------------------------- exact denoiser
@pytest.mark.parametrize("code", ["binary", "gray"])
def test_exact_denoiser_decodes_to_the_true_distribution(code):
    """With the exact E[x_bits | x_t] of the grid toy the sampler's decoded tokens follow the probability table
    (TV at 20,000 samples ~0.016 from sampling alone); one step decodes the posterior mean at t = 1 instead, which
    collapses onto few cells (the check can fail)."""
    grid = CategoricalGrid()
    codec = BitCodec(grid.cells, float(grid.centres[0]), float(grid.centres[-1]), code)
    ij = torch.cartesian_prod(torch.arange(grid.cells), torch.arange(grid.cells))  # row-major like probs
    codewords = codec.encode(ij, torch.float64)  # [64, 6]
    path = VPCosinePath()

    def x0_fn(x, t):
        return categorical_bits_x0(x, path.a(t), path.b(t), codewords, grid.probs.flatten())

    noise = torch.randn(20_000, codec.channels(2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = codec.decode(analog_bits_sample(x0_fn, noise, 100, path, self_condition=False).extra["x0"])
    tv = token_total_variation(tokens, grid.probs)
    assert tv < 0.035, tv
    impossible = grid.probs.flatten()[tokens[:, 0] * grid.cells + tokens[:, 1]] == 0
    assert impossible.double().mean() < 0.005
    one = codec.decode(analog_bits_sample(x0_fn, noise, 1, path, self_condition=False).extra["x0"])
    assert token_total_variation(one, grid.probs) > 0.5
    # the tokens are the grid's own cells
    x = codec.dequantize(tokens)
    assert torch.equal(grid.cell_index(x), tokens)


def test_nearest_bit_accuracy_reference_values():
    codec = BitCodec(4)  # 2 bits per value
    ref = codec.dequantize(torch.tensor([[0, 0], [3, 3]]))
    same = nearest_bit_accuracy(codec, ref, ref)
    assert same == {"bit_accuracy": 1.0, "exact_match": 1.0, "token_accuracy": 1.0}
    one_bit = codec.dequantize(torch.tensor([[1, 0]]))  # 01 00 vs 00 00: one of four bits wrong
    assert nearest_bit_accuracy(codec, one_bit, ref) == {"bit_accuracy": 0.75, "exact_match": 0.0,
                                                         "token_accuracy": 0.5}


def test_evaluator_scores_the_grid_toy_by_exact_token_tv():
    from lit_fewstep.data import Toy2DDataModule
    from lit_fewstep.evaluation import Evaluator

    evaluator = Evaluator(Toy2DDataModule("grid", batch_size=64, num_train=256, num_val=64), num_reference=500)
    grid = evaluator.datamodule.distribution
    exact, _ = grid.sample(3000, torch.Generator().manual_seed(5))
    assert evaluator.score(exact)["token_tv"] < 0.07  # sampling alone: ~0.04 at 3,000 points
    shifted = exact.clone()
    shifted[:, 0] += 2 * grid.extent / grid.cells  # one cell right: impossible cells (but the clamped last column)
    assert evaluator.score(shifted)["token_tv"] > 0.7
