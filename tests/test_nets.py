"""Contract tests for lit_fewstep.nets: shapes, conditioning, input errors, forward-mode AD, gradient flow."""

import inspect

import pytest
import torch

from lit_fewstep.nets import DiT, DiscriminatorHead, MLP, UNet

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
}
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


def inputs(net, batch=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    if net.img_resolution is None:
        shape, extra_shape = (batch, net.in_channels), (batch, net.extra_channels)
    else:
        r = net.img_resolution
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
