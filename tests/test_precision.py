"""Mixed precision and torch.compile (FewStepModule's policy, docs/precision.md), beyond the per-method bf16 check of
the conformance suite: JVP tangents in float32, fp16 loss scaling with clipping on true gradients, compiled networks
training like eager ones."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from conformance_methods import build, fit, teacher_path
from lit_fewstep.methods.base import float32_jvp
from lit_fewstep.methods.scm import trigflow_jvp

pytestmark = [
    pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`"),
    pytest.mark.usefixtures("float32_default_dtype"),
]


def _fp16_cpu() -> MixedPrecision:
    """Lightning turns precision="16-mixed" on CPU into bf16; the plugin itself runs fp16 autocast with a loss scaler
    on CPU too, which is what a 16-mixed GPU run does."""
    return MixedPrecision("16-mixed", "cpu")


def test_jvp_runs_in_float32_under_autocast(tmp_path):
    """sCD's JVP under bf16 autocast gives exactly the full-precision (F-, cos sin dF/dt), while the plain forward pass
    of the same network does run in bfloat16."""
    module, _ = fit(lambda: build("scd"), tmp_path, 1, precision="bf16-mixed")  # setup marks the network boundaries
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 2, generator=gen) * 1.4
    t = torch.rand(64, generator=gen) * 1.4 + 0.05
    dxdt = torch.randn(64, 2, generator=gen)
    F_fn = lambda x_, t_: module.F(x_, t_, None)  # noqa: E731
    with torch.no_grad():
        F32, dF32 = trigflow_jvp(F_fn, x_t, t, dxdt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F16, dF16 = trigflow_jvp(F_fn, x_t, t, dxdt)
            forward16 = F_fn(x_t, t)
    assert F16.dtype == dF16.dtype == forward16.dtype == torch.float32
    assert torch.equal(F16, F32) and torch.equal(dF16, dF32)
    assert not torch.equal(forward16, F32) and torch.allclose(forward16, F32, rtol=3e-2, atol=3e-2)


def test_jvp_of_a_convolutional_network_under_autocast():
    """Forward-mode AD of a convolution under autocast fails in torch (a float32 tangent meets a bfloat16 weight);
    `float32_jvp` runs it, and matches the JVP outside autocast and a central finite difference."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 2, 3, padding=1))
    x, v = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        out, tangent = float32_jvp(net, (x,), (v,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError):
                torch.func.jvp(net, (x,), (v,))
            out16, tangent16 = float32_jvp(net, (x,), (v,))
        h = 1e-3
        finite_difference = (net(x + h * v) - net(x - h * v)) / (2 * h)
    assert torch.equal(out16, out) and torch.equal(tangent16, tangent)
    torch.testing.assert_close(tangent, finite_difference, rtol=1e-2, atol=1e-3)


class _ClipSpy:
    """Wraps `clip_gradients` of a module: records the gradient norm it is asked to clip."""

    def __init__(self, module):
        self.norms: list[float] = []
        original = module.clip_gradients

        def spied(optimizer, *args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
            return original(optimizer, *args, **kwargs)

        module.clip_gradients = spied


def test_fp16_loss_scaling_clips_the_true_gradient_norm(tmp_path):
    """With a loss scaler (scale 65,536 at the start) the clip must see unscaled gradients: the norm at the first step
    agrees with the float32 run's, not 65,536 times it."""
    norms = {}
    for precision, kwargs in (("32", {}), ("fp16", {"plugins": [_fp16_cpu()]})):
        spies = []

        def make():
            module = build("edm")
            spies.append(_ClipSpy(module))
            return module

        module, run = fit(make, tmp_path / precision, 2, **kwargs)
        assert module.grad_clip > 0 and int(module.iteration) == 2
        norms[precision] = spies[0].norms[0]
        if precision == "fp16":
            assert run.precision_plugin.scaler is not None and module._grad_scaler is run.precision_plugin.scaler
    assert 0.8 < norms["fp16"] / norms["32"] < 1.25, norms


def test_fp16_skipped_step_keeps_the_schedule(tmp_path):
    """nonfinite: skip under a loss scaler (which refuses a step without gradients): the skipped iteration is counted
    and the run still ends at its scheduled iteration."""

    def make():
        module = build("edm")
        module.nonfinite = "skip"
        original = module.denoising_loss

        def loss(batch, *args, **kwargs):
            value = original(batch, *args, **kwargs)
            return value * float("nan") if module.training and int(module.iteration) == 1 else value

        module.denoising_loss = loss
        return module

    module, run = fit(make, tmp_path, 3, plugins=[_fp16_cpu()])
    assert int(module.iteration) == 3 and int(module.skipped_steps) == 1
    assert run.global_step == module.optimizer_steps_for(3)


def test_compiled_networks_train_like_eager_ones(tmp_path):
    """`compile_networks` compiles the student and the teacher of CD in place (checkpoint keys unchanged); three
    iterations give the eager run's weights."""
    pytest.importorskip("torch._inductor")
    runs = {}
    for compiled in (False, True):
        def make():
            module = build("cd", teacher_path())
            if compiled:
                runs["names"] = module.compile_networks()
            return module

        module, _ = fit(make, tmp_path / str(compiled), 3)
        runs[compiled] = module.state_dict()
    assert {"student", "target", "ema"} <= set(runs["names"]), runs["names"]
    assert runs[True].keys() == runs[False].keys()
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_jvp_networks_stay_eager_under_compile():
    module = build("scd", teacher_path())
    names = module.compile_networks()
    assert "student" not in names and not any(n.startswith("student.") for n in names)
    assert module.student._compiled_call_impl is None
    assert module.ema._compiled_call_impl is not None  # sampled only: compiled


def test_cli_compile_option_compiles_before_fit(tmp_path, monkeypatch):
    """`fit --compile true` calls `compile_networks` before training (what compiling does is tested above); without
    the option nothing is compiled."""
    from conftest import ROOT
    from lit_fewstep.cli import main
    from lit_fewstep.methods.base import FewStepModule

    calls = []
    monkeypatch.setattr(FewStepModule, "compile_networks", lambda self, **kw: calls.append(int(self.iteration)) or [])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "edm" / "tree.yaml"), "--trainer.max_steps", "1",
            "--trainer.callbacks", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    main(args)
    assert calls == []
    cli = main(args + ["--compile", "true"])
    assert calls == [0] and int(cli.model.iteration) == 1


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_naming_the_field(precision, tmp_path):
    with pytest.raises(ValueError, match="trainer.precision.*bf16-mixed"):
        fit(lambda: build("edm"), tmp_path, 1, precision=precision)


def test_gan_head_on_vector_features_has_finite_gradients_under_bf16():
    """The GAN head on vector features (the toys'), under bf16 autocast: its padded 1x1-map conv in torch's bf16 CPU
    kernel gave a NaN weight gradient in about 1 of 30-40 draws (it is now a linear layer); 40 draws, all finite."""
    from lit_fewstep.nets.heads import DiscriminatorHead

    for seed in range(40):
        torch.manual_seed(seed)
        head = DiscriminatorHead(32)
        features = torch.randn(64, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)
        logits.float().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None), seed
