"""Contract tests for lit_fewstep.nets: shapes, conditioning, input errors, forward-mode AD, gradient flow,
multi-resolution inputs, and that nets built with the defaults are unchanged (parameters and computation)."""

import hashlib
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_fewstep.nets import DiT, DiscriminatorHead, MLP, UNet
from lit_fewstep.utils.config import instantiate

ASSETS = Path(__file__).resolve().parents[1] / "lit_fewstep" / "assets"

NUM_CLASSES = 3

# Small, fully-conditioned configurations (every conditioning input switched on).
FACTORIES = {
    "mlp": lambda **kw: MLP(dim=2, hidden=32, depth=2, emb_dim=16, **kw),
    "unet8": lambda **kw: UNet(
        img_resolution=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), num_heads=2, **kw,
    ),
    "unet16": lambda **kw: UNet(
        img_resolution=16, in_channels=2, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
        attn_resolutions=(8,), **kw,
    ),
    "dit16": lambda **kw: DiT(img_resolution=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2, **kw),
    # Multi-resolution nets, run by the shared tests at their reference size (img_resolution).
    "unet_multi": lambda **kw: UNet(
        img_resolution=16, in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
        attn_resolutions=(8,), num_heads=2, resolutions=(4, 8, 16), **kw,
    ),
    "dit_multi": lambda **kw: DiT(
        img_resolution=16, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, resolutions=(4, 8, 16), **kw,
    ),
}
MULTI = ["unet_multi", "dit_multi"]
FULL = dict(num_classes=NUM_CLASSES, second_time=True, guidance_embed=True, extra_channels=2)


def make(name, **kw):
    torch.manual_seed(0)
    return FACTORIES[name](**kw)


def perturb(net, std=0.2):
    """Move zero-initialised layers away from zero so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def inputs(net, batch=3, dtype=torch.float32, res=None):
    g = torch.Generator().manual_seed(2)
    if net.img_resolution is None:
        shape, extra_shape = (batch, net.in_channels), (batch, net.extra_channels)
    else:
        r = net.img_resolution if res is None else res
        shape, extra_shape = (batch, net.in_channels, r, r), (batch, net.extra_channels, r, r)
    x = torch.randn(shape, generator=g, dtype=dtype)
    kw = {}
    if net.num_classes:
        kw["class_labels"] = torch.tensor([0, 1, NUM_CLASSES])[:batch]
    if net.second_time:
        kw["s_labels"] = torch.rand(batch, generator=g, dtype=dtype)
    if net.guidance_embed:
        kw["guidance"] = 1 + 2 * torch.rand(batch, generator=g, dtype=dtype)
    if net.extra_channels:
        kw["extra"] = torch.randn(extra_shape, generator=g, dtype=dtype)
    return x, torch.rand(batch, generator=g, dtype=dtype), kw


@pytest.mark.parametrize("name", list(FACTORIES))
def test_shapes_and_features(name):
    net = make(name, **FULL)
    x, t, kw = inputs(net)
    out, feats = net(x, t, **kw, return_features=True)
    assert out.shape == x.shape
    assert feats.shape[:2] == (x.shape[0], net.feature_channels)
    assert tuple(feats.shape[1:]) == net.feature_shape
    for attr in ("in_channels", "out_channels", "num_classes", "img_resolution", "second_time",
                 "guidance_embed", "extra_channels"):
        assert hasattr(net, attr)
    assert net.num_classes == NUM_CLASSES and net.second_time and net.guidance_embed and net.extra_channels == 2


def test_feature_shapes_are_the_documented_ones():
    _, f = make("unet16")(torch.randn(2, 2, 16, 16), torch.rand(2), return_features=True)
    assert f.shape == (2, 32, 4, 4)  # 16 -> 8 -> 4, 16 * channel_mult[-1] channels
    _, f = make("dit16")(torch.randn(2, 1, 16, 16), torch.rand(2), return_features=True)
    assert f.shape == (2, 32, 4, 4)  # 16 / patch 4 tokens per side, hidden 32
    _, f = make("mlp")(torch.randn(2, 2), torch.rand(2), return_features=True)
    assert f.shape == (2, 32)


@pytest.mark.parametrize("name", ["unet8", "dit16"])
def test_out_channels(name):
    net = make(name, out_channels=3)
    x, t, kw = inputs(net)
    assert net(x, t, **kw).shape == (x.shape[0], 3, *x.shape[2:])


@pytest.mark.parametrize("res", [8, 16, 28, 32, 64])
def test_unet_resolutions(res):
    # Four levels at 28 give 28 -> 14 -> 7 -> 4: the decoder must come back to 7, then 28.
    mult = (1, 2, 2, 2) if res >= 28 else (1, 2, 2)
    net = UNet(img_resolution=res, model_channels=8, channel_mult=mult, num_blocks=1, attn_resolutions=(8, 7))
    x = torch.randn(2, 1, res, res)
    out, f = net(x, torch.rand(2), return_features=True)
    assert out.shape == x.shape and tuple(f.shape[1:]) == net.feature_shape


def test_zero_init_outputs_zero():
    for name in FACTORIES:
        net = make(name)
        x, t, kw = inputs(net)
        assert torch.count_nonzero(net(x, t, **kw)) == 0, name


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_conditioning_changes_output(name):
    net = perturb(make(name, **FULL)).eval()
    x, t, kw = inputs(net)
    base = net(x, t, **kw)

    def differs(**change):
        return not torch.allclose(net(x, t, **{**kw, **change}), base, atol=1e-6)

    assert not torch.allclose(net(x, t + 0.5, **kw), base, atol=1e-6)
    # Null label vs real label, and None == all-null.
    assert differs(class_labels=torch.full_like(kw["class_labels"], NUM_CLASSES))
    assert torch.allclose(net(x, t, **{**kw, "class_labels": torch.full((3,), NUM_CLASSES)}),
                          net(x, t, **{**kw, "class_labels": None}))
    assert differs(s_labels=kw["s_labels"] + 0.5)
    assert differs(guidance=kw["guidance"] + 1.0)
    assert differs(extra=None)  # None reads as zeros, which differs from the given extra
    assert torch.allclose(net(x, t, **{**kw, "extra": None}), net(x, t, **{**kw, "extra": torch.zeros_like(kw["extra"])}))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_input_errors(name):
    net = make(name, num_classes=NUM_CLASSES, second_time=True)
    x, t, kw = inputs(net)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\].*got values in \[0, 4\]"):
        net(x, t, **{**kw, "class_labels": torch.tensor([0, 1, 4])})
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\].*\[-1, 1\]"):
        net(x, t, **{**kw, "class_labels": torch.tensor([-1, 0, 1])})
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        net(x, t, **{**kw, "class_labels": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"class_labels must have shape \[B\]"):
        net(x, t, **{**kw, "class_labels": torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="s_labels is required.*second_time=True"):
        net(x, t, **{**kw, "s_labels": None})
    with pytest.raises(ValueError, match="guidance was given.*guidance_embed=False"):
        net(x, t, guidance=torch.ones(3), **kw)
    with pytest.raises(ValueError, match="extra was given.*extra_channels=0"):
        net(x, t, extra=x, **kw)
    with pytest.raises(ValueError, match=r"noise_labels must have shape \[B\]"):
        net(x, t[:2], **kw)
    with pytest.raises(ValueError, match="x must have shape"):
        net(x[:, :1] if x.dim() == 2 else x[..., :-1], t, **kw)

    uncond = make(name)
    with pytest.raises(ValueError, match="class_labels was given.*num_classes=0"):
        uncond(x, t, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="s_labels was given.*second_time=False"):
        uncond(x, t, s_labels=t)
    guided = make(name, guidance_embed=True)
    with pytest.raises(ValueError, match="guidance is required"):
        guided(x, t)
    extra = make(name, extra_channels=2)
    with pytest.raises(ValueError, match="extra must have shape"):
        extra(x, t, extra=torch.cat([x, x, x], dim=1))


@pytest.mark.parametrize("name", ["mlp", "unet8", "dit16"])
def test_guidance_null_pins_the_guidance_embedding_at_zero(name):
    """With guidance_null the prediction at that scale does not depend on the guidance embedding's weights (nor do
    their gradients see it); at any other scale it does, and the parameters are those of a net without it."""
    pinned = perturb(make(name, num_classes=NUM_CLASSES, guidance_embed=True, guidance_null=1.0))
    plain = make(name, num_classes=NUM_CLASSES, guidance_embed=True)
    assert pinned.state_dict().keys() == plain.state_dict().keys()
    x, t, kw = inputs(pinned)
    without_guidance = dict(kw, guidance=torch.ones(3))
    before = pinned(x, t, **without_guidance)
    with torch.no_grad():
        for p in pinned.cond.guidance.parameters():
            p.add_(torch.randn_like(p))
    assert torch.allclose(pinned(x, t, **without_guidance), before, atol=1e-6)
    pinned(x, t, **without_guidance).square().sum().backward()
    assert all(p.grad.abs().max() < 1e-6 for p in pinned.cond.guidance.parameters())
    guided = dict(kw, guidance=torch.tensor([1.0, 2.5, 4.0]))
    plain.load_state_dict(pinned.state_dict())
    assert not torch.allclose(pinned(x, t, **guided)[1:], plain(x, t, **guided)[1:], atol=1e-3)
    with pytest.raises(ValueError, match="guidance_null.*guidance_embed=True"):
        make(name, guidance_null=1.0)


def test_guidance_adapter_is_exactly_off_at_the_null_scale_and_on_elsewhere():
    """UNet(guidance_adapter=True, guidance_rank=r): every residual block gets a bias-free modulation layer and a
    gated convolutional branch, both fed silu(c) - silu(c at the null scale). With the other weights those of a net
    without adapters, the prediction at the null scale is that net's bit for bit however the adapters and the
    guidance embedding are set, and their gradients there are zero; at other scales the adapters change it. Fails if
    the adapters see the plain conditioning or a layer after the gate carries a bias."""
    adapted = perturb(make("unet8", num_classes=NUM_CLASSES, guidance_embed=True, guidance_null=1.0,
                           guidance_adapter=True, guidance_rank=4))
    plain = make("unet8", num_classes=NUM_CLASSES, guidance_embed=True, guidance_null=1.0)
    adapter_keys = {k for k in adapted.state_dict() if ".guidance_affine." in k or ".guidance_branch." in k}
    assert adapter_keys and adapted.state_dict().keys() - adapter_keys == plain.state_dict().keys()
    assert not any(k.endswith(("guidance_affine.bias", "gate.bias", "conv_b.bias")) for k in adapter_keys)
    assert any(k.endswith("guidance_branch.conv_b.weight") for k in adapter_keys)
    plain.load_state_dict(adapted.state_dict(), strict=False)
    x, t, kw = inputs(adapted)
    null = dict(kw, guidance=torch.ones(3))
    assert torch.equal(adapted(x, t, **null), plain(x, t, **null))
    adapted(x, t, **null).square().sum().backward()
    assert all(p.grad.abs().max() == 0 for n, p in adapted.named_parameters() if n in adapter_keys)
    guided = dict(kw, guidance=torch.tensor([1.0, 2.5, 4.0]))
    out, reference = adapted(x, t, **guided), plain(x, t, **guided)
    assert torch.equal(out[0], reference[0])  # the sample at the null scale, inside a mixed batch
    assert not torch.allclose(out[1:], reference[1:], atol=1e-3)
    fresh = make("unet8", num_classes=NUM_CLASSES, guidance_embed=True, guidance_null=1.0, guidance_adapter=True,
                 guidance_rank=4)
    assert all(p.abs().max() == 0 for n, p in fresh.named_parameters()  # the adapters start at zero
               if n.endswith(("guidance_affine.weight", "conv_b.weight")))
    with pytest.raises(ValueError, match="guidance_adapter.*guidance_null"):
        make("unet8", guidance_embed=True, guidance_adapter=True)
    with pytest.raises(ValueError, match="guidance_rank.*guidance_adapter=True"):
        make("unet8", guidance_embed=True, guidance_null=1.0, guidance_rank=4)


def test_scalar_noise_label_is_broadcast():
    net = perturb(make("unet8"))
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(net(x, torch.tensor(0.3)), net(x, torch.full((3,), 0.3)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jvp_matches_finite_differences(name):
    """torch.func.jvp through the net (float64) equals a central finite difference.

    Checked along a joint (x, t) direction and along t alone (the path sCM / flow-map losses use).
    A mild weight perturbation keeps the FD truncation error (eps^2 times the third derivative) far
    below the tolerance; large random weights make the DiT so curved that eps=1e-5 is not enough.
    """
    net = perturb(make(name, **FULL), std=0.05).double().eval()
    x, t, kw = inputs(net, batch=2, dtype=torch.float64)
    kw["class_labels"] = kw["class_labels"][:2]
    g = torch.Generator().manual_seed(3)
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)

    f = lambda x_, t_: net(x_, t_, **kw)  # noqa: E731
    eps = 1e-5
    for tx in (dx, torch.zeros_like(dx)):
        out, tangent = torch.func.jvp(f, (x, t), (tx, dt))
        with torch.no_grad():
            fd = (f(x + eps * tx, t + eps * dt) - f(x - eps * tx, t - eps * dt)) / (2 * eps)
            assert torch.allclose(out, f(x, t))
        assert tangent.abs().max() > 1e-3  # the check is not vacuous
        rel = (tangent - fd).norm() / fd.norm()
        assert rel < 1e-6, f"{name}: relative JVP error {rel:.2e}"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradient_reaches_every_parameter(name):
    """No unused parameters when every conditioning is given (DDP's reducer needs this)."""
    net = perturb(make(name, **FULL))
    x, t, kw = inputs(net)
    out, feats = net(x, t, **kw, return_features=True)
    (out.square().mean() + feats.mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_gradient_reaches_every_parameter_without_perturbation():
    """At zero init gradients are zero upstream of the zero layers, but every parameter is still in the graph."""
    net = make("dit16", **FULL)
    x, t, kw = inputs(net)
    net(x, t, **kw).square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    "name,features_shape",
    [("maps", (4, 32, 4, 4)), ("small_map", (4, 32, 2, 2)), ("one_pixel", (4, 32, 1, 1)), ("vector", (4, 32))],
)
def test_discriminator_head(name, features_shape):
    head = DiscriminatorHead(32, hidden=16, num_classes=NUM_CLASSES)
    feats = torch.randn(features_shape)
    labels = torch.tensor([0, 1, 2, 3])
    logits = head(feats, labels)
    assert logits.shape == (4,)
    # Projection term: the label changes the logit.
    assert not torch.allclose(head(feats, torch.tensor([1, 2, 0, 0])), logits)
    assert torch.allclose(head(feats), head(feats, torch.full((4,), NUM_CLASSES)))
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        head(feats, torch.tensor([0, 1, 2, 9]))


def test_discriminator_head_one_pixel_is_the_padded_conv():
    """Vector features take the linear shortcut; it must equal the 4x4 / stride-2 conv on the 1x1 map padded by 2
    (values and the conv weight's gradient, whose other taps get exactly zero)."""
    torch.manual_seed(0)
    head = DiscriminatorHead(8, hidden=6).double()
    feats = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    h_conv = F.conv2d(feats[:, :, None, None], head.conv.weight, head.conv.bias, stride=2, padding=2)
    expected = head.fc(F.silu(head.norm(h_conv)).mean(dim=(2, 3))).squeeze(1)
    (g_conv,) = torch.autograd.grad(expected.square().sum(), head.conv.weight)
    logits = head(feats)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    (g_fast,) = torch.autograd.grad(logits.square().sum(), head.conv.weight)
    torch.testing.assert_close(g_fast, g_conv, rtol=1e-12, atol=1e-12)
    assert g_conv[:, :, 2, 2].abs().sum() > 0


def test_discriminator_head_on_net_features():
    net = make("unet8")
    _, feats = net(torch.randn(2, 1, 8, 8), torch.rand(2), return_features=True)
    head = DiscriminatorHead(net.feature_channels)
    assert head(feats).shape == (2,)
    with pytest.raises(ValueError, match="class_labels was given"):
        head(feats, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="features must have shape"):
        head(torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("cls", [MLP, UNet, DiT, DiscriminatorHead])
def test_constructor_is_config_friendly(cls):
    """Only simple named arguments with defaults (jsonargparse class_path), no **kwargs."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    assert required == (["in_channels"] if cls is DiscriminatorHead else [])


def test_bf16_inputs_keep_float32_time_embedding():
    net = perturb(make("mlp")).to(torch.bfloat16)
    out = net(torch.randn(2, 2, dtype=torch.bfloat16), torch.tensor([0.1, 0.2], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------- defaults unchanged
# Recorded with the code before the multi-resolution option existed: for each factory built with the defaults
# ("plain") and with every conditioning on ("full"): sha256 of the state dict's "key:shape:dtype" lines, the
# parameter count, and sum / sum |.| of the perturbed net's output on `inputs(net)` (float64 of a float32 run).
RECORDED = {
    ("mlp", "plain"): ("e7e4275bb075f567", 10274, 4.191931515932083, 4.191931515932083),
    ("mlp", "full"): ("e6dfbe72b6bdb4bb", 13666, -1.7442719675600529, 2.1579163186252117),
    ("unet8", "plain"): ("d29f43f6f27962c6", 190369, -281.3451429568231, 318.0558301769197),
    ("unet8", "full"): ("0f1710a8cd8615fe", 201409, 148.30049835890532, 239.18354120105505),
    ("unet16", "plain"): ("36a8611d8f1145f1", 300226, 66.91728026559576, 1807.515245623421),
    ("unet16", "full"): ("f2264f1088972980", 311266, -632.0571945942938, 1348.7743285633624),
    ("dit16", "plain"): ("b28dde80fe7a5e9e", 50288, -147.6835053563118, 1117.6422399505973),
    ("dit16", "full"): ("fe87e3bfd2d867f8", 70000, 588.9893032051623, 3235.1645283810794),
}


def state_fingerprint(net):
    lines = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in net.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16], sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,config", list(RECORDED))
def test_defaults_keep_parameters_and_computation(name, config):
    digest, count, total, total_abs = RECORDED[name, config]
    net = make(name, **(FULL if config == "full" else {}))
    assert state_fingerprint(net) == (digest, count)
    assert getattr(net, "resolutions", None) is None
    assert not any("resolution" in k for k in net.state_dict())
    net = perturb(net).eval()
    x, t, kw = inputs(net)
    with torch.no_grad():
        out = net(x, t, **kw).double()
    # a signed sum cancels (66.9 out of an absolute sum of 1,807 for unet16): its rounding, which differs between
    # CPUs' kernels, scales with the absolute sum
    assert out.sum().item() == pytest.approx(total, abs=1e-6 * total_abs)
    assert out.abs().sum().item() == pytest.approx(total_abs, rel=1e-6)


@pytest.mark.parametrize("asset,prefix", [
    ("edm_digits.pt", "model.net."), ("fm_digits.pt", "model.net."), ("dmd2_digits.pt", "G.net."),
    ("edm_tree.pt", "model.net."), ("fm_tree.pt", "model.net."), ("fm_tree_guide.pt", "model.net."),
])
def test_shipped_network_weights_load_strictly(asset, prefix):
    """The shipped checkpoints' recorded net configs still build nets with exactly their keys and shapes."""
    ckpt = torch.load(ASSETS / asset, map_location="cpu", weights_only=True)
    net = instantiate(ckpt["lit_fewstep"]["config"]["init_args"]["net"])
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)  # raises on any missing / unexpected key or shape mismatch
    assert getattr(net, "resolutions", None) is None


def test_multi_resolution_adds_only_the_resolution_table():
    """Same architecture with and without ``resolutions``: one extra key, the [3, cond_dim] table."""
    unet = UNet(img_resolution=16, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, num_heads=2)
    unet_multi = make("unet_multi")
    keys = {k: v.shape for k, v in unet_multi.state_dict().items()}
    assert keys.pop("cond.resolution.weight") == (3, 64)
    assert keys == {k: v.shape for k, v in unet.state_dict().items()}
    dit = DiT(img_resolution=16, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    keys = {k: v.shape for k, v in make("dit_multi").state_dict().items()}
    assert keys.pop("cond.resolution.weight") == (3, 32)
    assert keys == {k: v.shape for k, v in dit.state_dict().items()}


# --------------------------------------------------------------------------- several resolutions
@pytest.mark.parametrize("name", MULTI)
def test_multi_resolution_runs_at_every_listed_size(name):
    net = perturb(make(name, **FULL)).eval()
    p = getattr(net, "patch_size", None)
    for r in (4, 8, 16):
        x, t, kw = inputs(net, res=r)
        out, feats = net(x, t, **kw, return_features=True)
        assert out.shape == x.shape and torch.isfinite(out).all()
        if p is None:  # the UNet halves twice (rounding up)
            assert feats.shape == (3, net.feature_channels, -(-r // 4), -(-r // 4))
        else:
            assert feats.shape == (3, net.feature_channels, r // p, r // p)
        assert torch.equal(net(x, t, **kw, resolution=r), out)  # the optional cross-check agrees
        with pytest.raises(ValueError, match=rf"resolution=5 was given but x is {r}x{r}"):
            net(x, t, **kw, resolution=5)
    x, t, kw = inputs(net)  # the reference size: feature_shape describes it
    assert tuple(net(x, t, **kw, return_features=True)[1].shape[1:]) == net.feature_shape


@pytest.mark.parametrize("name", MULTI)
def test_multi_resolution_refuses_unlisted_sizes(name):
    net = make(name)
    for r in (6, 12, 32):
        with pytest.raises(ValueError, match=r"^x is \d+x\d+, which is not one of the network's resolutions=\[4, 8, 16\]") as err:
            net(torch.randn(2, 1, r, r), torch.rand(2))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, r, r\] with r one of resolutions=\[4, 8, 16\]"):
        net(torch.randn(2, 1, 8, 16), torch.rand(2))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 2, 8, 8), torch.rand(2))
    extra = make(name, extra_channels=2)
    with pytest.raises(ValueError, match=r"extra must have shape \[2, 2, 8, 8\]"):
        extra(torch.randn(2, 1, 8, 8), torch.rand(2), extra=torch.randn(2, 2, 16, 16))


@pytest.mark.parametrize("name", ["unet16", "dit16"])
def test_fixed_size_nets_refuse_other_sizes(name):
    net = make(name)
    with pytest.raises(ValueError, match=r"x must have shape \[B, \d, 16, 16\], got \[2, \d, 8, 8\]"):
        net(torch.randn(2, net.in_channels, 8, 8), torch.rand(2))
    x, t, kw = inputs(net)
    assert torch.equal(net(x, t, resolution=16), net(x, t))
    with pytest.raises(ValueError, match="resolution=8 was given but x is 16x16"):
        net(x, t, resolution=8)


def test_resolutions_option_is_validated():
    unet = dict(in_channels=1, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1)
    with pytest.raises(ValueError, match=r"img_resolution=16 must be one of resolutions=\[4, 8\]"):
        UNet(img_resolution=16, resolutions=(4, 8), **unet)
    with pytest.raises(ValueError, match="resolutions must not repeat"):
        UNet(img_resolution=8, resolutions=(8, 8), **unet)
    with pytest.raises(ValueError, match="resolutions must hold positive ints"):
        UNet(img_resolution=8, resolutions=(0, 8), **unet)
    with pytest.raises(ValueError, match="resolutions must be a non-empty list"):
        UNet(img_resolution=8, resolutions=(), **unet)
    # Three levels downsample twice: 2 -> 1 -> (1) would downsample a 1x1 map.
    with pytest.raises(ValueError, match=r"resolutions: 2 is too small for 3 levels of channel_mult.*>= 3"):
        UNet(img_resolution=8, resolutions=(2, 8), **unet)
    UNet(img_resolution=8, resolutions=(3, 8), **unet)
    with pytest.raises(ValueError, match=r"resolutions: 6 is not divisible by patch_size \(4\)"):
        DiT(img_resolution=16, patch_size=4, hidden_size=32, num_heads=2, resolutions=(6, 16))
    # Unsorted lists are accepted; the embedding index follows the sorted order.
    assert UNet(img_resolution=8, resolutions=(8, 4), **unet).resolutions == (4, 8)


@pytest.mark.parametrize("res", [7, 14, 28])
def test_unet_odd_cascade(res):
    """A 7 -> 14 -> 28 cascade (28x28 images): odd maps come back to their size through the skips."""
    net = UNet(img_resolution=28, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7,),
               resolutions=(7, 14, 28), extra_channels=1)
    x = torch.randn(2, 1, res, res)
    assert net(x, torch.rand(2), extra=torch.randn(2, 1, res, res)).shape == x.shape


@pytest.mark.parametrize("name", MULTI)
def test_resolution_embedding_matters(name):
    """Each size has its own (different) learned row; it changes the output and receives gradients."""
    net = perturb(make(name, **FULL)).eval()
    table = net.cond.resolution.weight
    assert table.shape[0] == 3
    assert not torch.allclose(table[0], table[1]) and not torch.allclose(table[1], table[2])
    x, t, kw = inputs(net, res=8)
    base = net(x, t, **kw)
    with torch.no_grad():
        saved = table[1].clone()
        table[1] = table[2]  # pretend the 8x8 input is the 16x16 one
    assert not torch.allclose(net(x, t, **kw), base, atol=1e-6)
    with torch.no_grad():
        table[1] = saved
    assert torch.equal(net(x, t, **kw), base)
    net.zero_grad()
    net(x, t, **kw).square().mean().backward()
    grad = table.grad
    assert grad is not None and torch.any(grad[1] != 0)  # the row of size 8 (index 1 of (4, 8, 16))
    assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0)


def test_dit_position_embedding_is_resampled():
    net = make("dit_multi")
    stored = net.pos_embed
    assert net.position_embedding(net.grid) is stored  # the trained grid: exactly the stored buffer
    for grid in (2, 4):
        pe = net.position_embedding(grid)
        assert pe.shape == (1, grid * grid, 32) and torch.isfinite(pe).all()
        # Bicubic on the 2-D grid (channels as maps), as for pretrained ViTs.
        as_maps = stored.reshape(1, net.grid, net.grid, 32).permute(0, 3, 1, 2)
        expected = torch.nn.functional.interpolate(as_maps, size=(grid, grid), mode="bicubic", antialias=True)
        assert torch.allclose(pe, expected.permute(0, 2, 3, 1).reshape(1, grid * grid, 32))
    # A token grid's embedding depends on the relative position: the corners stay distinct.
    pe = net.position_embedding(2)[0]
    assert torch.cdist(pe, pe).fill_diagonal_(1).min() > 0.1
    # The forward pass adds the resampled embedding to the patch tokens of a smaller input.
    seen = []
    net.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        net(x, torch.rand(2))
        tokens = net.patch(x).flatten(2).transpose(1, 2)
    assert torch.equal(seen[0], tokens + net.position_embedding(4))
    # The fixed-size DiT uses the stored buffer as before.
    fixed = make("dit16")
    assert fixed.position_embedding(fixed.grid) is fixed.pos_embed


@pytest.mark.parametrize("name", MULTI)
@pytest.mark.parametrize("res", [4, 8])
def test_jvp_through_multi_resolution_net(name, res):
    """torch.func.jvp at a non-reference size (resampled DiT position embedding, resolution row) equals FD."""
    net = perturb(make(name, **FULL), std=0.05).double().eval()
    x, t, kw = inputs(net, batch=2, dtype=torch.float64, res=res)
    kw["class_labels"] = kw["class_labels"][:2]
    g = torch.Generator().manual_seed(3)
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    ds = torch.randn(2, generator=g, dtype=torch.float64)

    def f(x_, t_, s_):
        return net(x_, t_, **{**kw, "s_labels": s_})

    eps = 1e-5
    s = kw["s_labels"]
    out, tangent = torch.func.jvp(f, (x, t, s), (dx, dt, ds))
    with torch.no_grad():
        fd = (f(x + eps * dx, t + eps * dt, s + eps * ds) - f(x - eps * dx, t - eps * dt, s - eps * ds)) / (2 * eps)
        assert torch.allclose(out, f(x, t, s))
    assert tangent.abs().max() > 1e-3
    rel = (tangent - fd).norm() / fd.norm()
    assert rel < 1e-6, f"{name}@{res}: relative JVP error {rel:.2e}"


@pytest.mark.parametrize("name", ["mlp", "unet8", "dit16", "unet_multi", "dit_multi"])
def test_optional_inputs_only_when_built_for_them(name):
    """s, guidance and extra change the output of a net built for them and are refused by one built without."""
    for option, key, value in (
        ({"second_time": True}, "s_labels", lambda x, t: t + 0.5),
        ({"guidance_embed": True}, "guidance", lambda x, t: torch.full_like(t, 3.0)),
        ({"extra_channels": 1}, "extra", lambda x, t: torch.randn_like(x[:, :1])),
    ):
        plain = make(name)
        x, t, _ = inputs(plain)
        with pytest.raises(ValueError, match=f"{key} was given but the network was built with"):
            plain(x, t, **{key: value(x, t)})
        built = perturb(make(name, **option)).eval()
        assert state_fingerprint(built) != state_fingerprint(plain)
        default = {"s_labels": t, "guidance": torch.ones_like(t), "extra": None}[key]
        assert not torch.allclose(built(x, t, **{key: value(x, t)}), built(x, t, **{key: default}), atol=1e-6)
