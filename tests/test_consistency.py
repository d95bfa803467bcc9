"""Consistency family (CD, CT, iCT, sCD, sCT): boundary conditions, curricula against hand-computed values,
JVP against finite differences, teacher path conversion, the discrete -> continuous limit, sampling options,
DDP. (Training, NFE accounting, export/reload, resume: tests/test_conformance.py.)"""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from lit_fewstep.diffusion import EDMPath, PreconditionedNet, TrigFlowPath, euler_step
from lit_fewstep.diffusion.solvers import consistency_sigmas, discrete_lognormal_probs, karras_sigmas
from lit_fewstep.methods.consistency import (CD, CT, ICT, ExponentialScales, SqrtScales, TargetRate,
                                             consistency_distance, pseudo_huber_c)
from lit_fewstep.methods.diffusion import EDMDiffusion, FlowMatching
from lit_fewstep.methods.scm import SCD, SCT, normalize_tangent, trigflow_jvp
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_module

SIGMA_D = 0.8


pytestmark = pytest.mark.usefixtures("float32_default_dtype")


def mlp(num_classes=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=2, hidden=hidden, depth=2, emb_dim=16, num_classes=num_classes)
    with torch.no_grad():  # the output layer starts at zero: give it weights so F is not trivially 0
        net.out.weight.normal_(0, 0.3)
        net.out.bias.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A small EDM teacher with non-trivial (random) weights, exported like a trained one."""
    teacher = EDMDiffusion(mlp(seed=1), sigma_data=SIGMA_D, ema_decay=0.0)
    path = tmp_path_factory.mktemp("teacher") / "edm.pt"
    teacher.export(str(path))
    return str(path)


def make(name, teacher_ckpt, **kw):
    common = dict(sigma_data=SIGMA_D, **kw)
    if name == "cd":
        return CD(mlp(), teacher_ckpt, num_scales=8, **common)
    if name == "ct":
        return CT(mlp(), s0=2, s1=10, total_steps=100, **common)
    if name == "ict":
        return ICT(mlp(), s0=2, s1=16, total_steps=100, **common)
    if name == "scd":
        return SCD(mlp(), teacher_ckpt, warmup_steps=10, **common)
    return SCT(mlp(), warmup_steps=10, **common)


METHODS = ["cd", "ct", "ict", "scd", "sct"]


# ------------------------------------------------------------------------------------------ boundary conditions
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm_consistency_function_is_exactly_identity_at_eps(dtype):
    f = PreconditionedNet(mlp(), "consistency", sigma_data=0.5, sigma_min=0.002).to(dtype)
    x = 3 * torch.randn(64, 2, dtype=dtype)
    y = torch.randint(0, 2, (64,))
    assert torch.equal(f.x0(x, torch.full((64,), 0.002, dtype=dtype), class_labels=y), x)
    # ... and only there: one grid step above eps the network already contributes
    sigma_1 = karras_sigmas(18, append_zero=False)[-2].item()
    assert (f.x0(x, torch.full((64,), sigma_1, dtype=dtype), class_labels=y) - x).abs().max() > 1e-4


def test_trigflow_consistency_function_is_identity_at_zero_and_matches_formula():
    f = PreconditionedNet(mlp(), "trigflow", sigma_data=SIGMA_D).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    assert torch.equal(f.x0(x, torch.zeros(32, dtype=torch.float64)), x)
    t = torch.full((32,), 0.7, dtype=torch.float64)
    F = f.net(x / SIGMA_D, t)
    expected = math.cos(0.7) * x - math.sin(0.7) * SIGMA_D * F  # f = cos t x_t - sin t sigma_d F(x_t/sigma_d, t)
    torch.testing.assert_close(f.x0(x, t), expected, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------ curricula
# docs/consistency.md#curriculum-values (hand-computed from the official code)
CT_TABLE = [  # (s0, s1, K, mu0, k, N, mu_code, mu_paper)
    (2, 150, 800_000, 0.9, 0, 2, 0.810000, 0.900000),
    (2, 150, 800_000, 0.9, 1_000, 6, 0.958732, 0.965489),
    (2, 150, 800_000, 0.9, 100_000, 54, 0.996032, 0.996105),
    (2, 150, 800_000, 0.9, 400_000, 107, 0.998014, 0.998033),
    (2, 150, 800_000, 0.9, 800_000, 151, 0.998596, 0.998605),
    (2, 200, 800_000, 0.95, 0, 2, 0.902500, 0.950000),
    (2, 200, 800_000, 0.95, 100_000, 72, 0.998556, 0.998576),
    (2, 200, 800_000, 0.95, 400_000, 143, 0.999278, 0.999283),
    (2, 200, 800_000, 0.95, 800_000, 201, 0.999487, 0.999490),
]


@pytest.mark.parametrize("s0,s1,K,mu0,k,N,mu_code,mu_paper", CT_TABLE)
def test_ct_curriculum_matches_hand_computed_values(s0, s1, K, mu0, k, N, mu_code, mu_paper):
    scales = SqrtScales(s0, s1, K)
    assert scales(k) == N
    assert TargetRate("adaptive", mu0=mu0, s0=s0, formula="code")(k, scales(k)) == pytest.approx(mu_code, abs=1e-6)
    assert TargetRate("adaptive", mu0=mu0, s0=s0, formula="paper")(k, scales(k)) == pytest.approx(mu_paper, abs=1e-6)


def test_ct_module_uses_the_code_formula_by_default():
    model = CT(mlp(), s0=2, s1=150, total_steps=800_000)
    assert model.scales(1_000) == 6 and model.target_rate(1_000, 6) == pytest.approx(0.958732, abs=1e-6)
    assert CT(mlp(), mu_formula="paper").target_rate(0, 2) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="mu_formula: must be 'code' or 'paper'"):
        CT(mlp(), mu_formula="Paper")


def test_ict_exponential_curriculum_lognormal_draws_and_huber_c():
    scales = ExponentialScales(10, 1280, 400_000)
    assert scales.K_prime == 50_000
    assert [scales(k) for k in range(0, 400_000, 50_000)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert scales(49_999) == 11 and scales(10**7) == 1281
    grid = karras_sigmas(11, append_zero=False).flip(0)  # index 0 = sigma_min
    p = discrete_lognormal_probs(grid, -1.1, 2.0)
    expected = [.063, .182, .246, .214, .142, .081, .041, .020, .009, .004]  # notes, Sec. 2.1 item 4
    assert p.tolist() == pytest.approx(expected, abs=6e-4)
    assert pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.0299, abs=1e-4)
    assert pseudo_huber_c(64) == pytest.approx(0.0043, abs=1e-4)
    # iCT's changes to CT are in force in the module
    model = ICT(mlp(), s0=10, s1=1280, total_steps=400_000)
    assert model.target is None and model.target_rate.stopgrad and model.distance == "pseudo_huber"
    assert model.huber_c == pytest.approx(0.00054 * math.sqrt(2))
    s = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert model.weight(s[:1], s[1:]).item() == pytest.approx(0.5)
    draws = model.draw_index(torch.rand(20000, generator=torch.Generator().manual_seed(0)), grid)
    freq = torch.bincount(draws, minlength=10).double() / 20000
    assert freq.tolist() == pytest.approx(p.tolist(), abs=0.015)


def test_pseudo_huber_distance():
    a, b = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    assert consistency_distance(a, b, "pseudo_huber", c=0.0).item() == pytest.approx(5.0)
    assert consistency_distance(a, b, "pseudo_huber", c=1.0).item() == pytest.approx(math.sqrt(26) - 1)
    assert consistency_distance(a, b, "l2").item() == pytest.approx(12.5)
    assert consistency_distance(a, b, "l1").item() == pytest.approx(3.5)


def test_target_network_roles(teacher_ckpt):
    assert CD(mlp(), teacher_ckpt).target is None  # mu = 0: stop-gradient, no copy (official CIFAR-10)
    cd = CD(mlp(), teacher_ckpt, target_mu=0.95)
    assert cd.target is not None and cd.target is not cd.ema
    ct = CT(mlp())
    before = [p.clone() for p in ct.target.parameters()]
    with torch.no_grad():
        for p in ct.student.parameters():
            p.add_(1.0)
    ct.update_target(0.81)
    for b, p_t, p in zip(before, ct.target.parameters(), ct.student.parameters()):
        torch.testing.assert_close(p_t, 0.81 * b + 0.19 * p)
    assert any(k.startswith("target.") for k in ct.state_dict_to_save())  # theta- travels in checkpoints


# ------------------------------------------------------------------------------------------ sCM math
def test_jvp_equals_central_finite_difference():
    torch.manual_seed(0)
    F = PreconditionedNet(mlp(), "trigflow", SIGMA_D).double()
    F_fn = lambda x, t: F(x, t) / SIGMA_D  # noqa: E731
    x_t, v = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 1.4 + 0.05
    out, jvp = trigflow_jvp(F_fn, x_t, t, v)
    cs, h = torch.cos(t) * torch.sin(t), 1e-5
    fd = (F_fn(x_t + h * cs[:, None] * v, t + h * cs) - F_fn(x_t - h * cs[:, None] * v, t - h * cs)) / (2 * h)
    torch.testing.assert_close(out, F_fn(x_t, t), rtol=0, atol=1e-14)
    torch.testing.assert_close(jvp, fd, rtol=1e-7, atol=1e-9)
    assert jvp.abs().max() > 1e-3  # not trivially zero


def test_tangent_normalization():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_tangent(g, "l2", 0.1), g / torch.tensor([[5.1], [0.1]]))
    torch.testing.assert_close(normalize_tangent(g, "rms", 0.1), g / (5 / math.sqrt(2) + 0.1) * torch.tensor([[1.], [0.]]))
    assert normalize_tangent(g, "none") is g
    mixed = torch.tensor([[3.0, -0.5], [-2.0, 0.25]])  # clipping: only the elements outside [-1, 1] move
    torch.testing.assert_close(normalize_tangent(mixed, "clip"), torch.tensor([[1.0, -0.5], [-1.0, 0.25]]))


@pytest.mark.parametrize("teacher_cls", [EDMDiffusion, FlowMatching])
def test_teacher_on_trigflow_gives_the_same_x0_and_the_chain_rule_velocity(teacher_cls, tmp_path):
    """An EDM (or flow-matching) teacher serving a TrigFlow method: same denoised x0 for the same noisy input,
    and dx_trig/dt = d/dt [cos t x_edm(sigma_d tan t)] with dx_edm/dsigma = (x_edm - D) / sigma."""
    teacher = teacher_cls(mlp(seed=3), sigma_data=SIGMA_D, ema_decay=0.0).double()
    path = str(tmp_path / "t.pt")
    teacher.export(path)
    scd = SCD(mlp(), path, sigma_data=SIGMA_D).double()
    net = scd._teacher()
    x0, z = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    sigma = torch.exp(torch.linspace(-3, 3, 8, dtype=torch.float64))
    x_edm = x0 + sigma[:, None] * z
    t = torch.atan(sigma / SIGMA_D)
    x_trig = torch.cos(t)[:, None] * x_edm  # same noisy point on TrigFlow
    torch.testing.assert_close(TrigFlowPath(SIGMA_D).noise(x0, z, t), x_trig)
    D = net.x0_from(x_edm, sigma, EDMPath(), class_labels=y)
    torch.testing.assert_close(net.x0_from(x_trig, t, TrigFlowPath(SIGMA_D), class_labels=y), D, rtol=1e-10, atol=1e-12)
    chain = (-torch.sin(t)[:, None] * x_edm
             + torch.cos(t)[:, None] * (x_edm - D) / sigma[:, None] * (SIGMA_D / torch.cos(t) ** 2)[:, None])
    torch.testing.assert_close(scd.dxdt(x0, z, x_trig, t, y), chain, rtol=1e-9, atol=1e-10)


def test_scd_init_from_teacher_starts_as_the_teachers_denoiser(teacher_ckpt):
    """With "trigflow_edm" the EDM teacher's weights are a TrigFlow student: after setup the student (and its
    EMA) is the teacher's denoiser on TrigFlow, so sCD starts where CD does; without it the flag is refused."""
    model = SCD(mlp(seed=5), teacher_ckpt, sigma_data=SIGMA_D, preconditioning="trigflow_edm",
                init_from_teacher=True, warmup_steps=10).double()
    teacher = model._teacher()
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,))
    t = torch.linspace(0.01, 1.55, 8, dtype=torch.float64)
    assert not torch.allclose(model.student.x0(x, t, class_labels=y), teacher.x0_from(x, t, model.path, class_labels=y))
    model.prepare_teacher(initialize=True)
    for net in (model.student, model.ema):
        torch.testing.assert_close(net.x0(x, t, class_labels=y), teacher.x0_from(x, t, model.path, class_labels=y),
                                   rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="init_from_teacher.*preconditioning: trigflow_edm"):
        SCD(mlp(), teacher_ckpt, sigma_data=SIGMA_D, init_from_teacher=True)
    with pytest.raises(ValueError, match="preconditioning: sCM lives on TrigFlow"):
        SCD(mlp(), teacher_ckpt, sigma_data=SIGMA_D, preconditioning="edm")


def test_discrete_cd_gradient_over_step_approaches_scd_gradient(teacher_ckpt):
    """(1/Delta) grad ||f(x_t, t) - sg f(x_t - Delta dx/dt, t - Delta)||^2 / (sigma_d tan t)  ->  grad of the sCD
    surrogate ||F - F- - g||^2 (r = 1, no normalization, unit weight); the error shrinks like Delta."""
    model = SCD(mlp(), teacher_ckpt, sigma_data=SIGMA_D, tangent_norm="none", warmup_steps=0,
                adaptive_weighting=False).double()
    model.prepare_teacher()
    teacher, path = model._teacher(), model.path
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    t = 0.2 + 1.1 * torch.rand(8, generator=gen, dtype=torch.float64)
    x_t = path.noise(x, z, t)
    params = list(model.student.parameters())

    def grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    dxdt = model.dxdt(x, z, x_t, t, y)
    g_cont = grad(model.continuous_loss(x_t, t, dxdt, y, r=1.0).mean() * 2)  # D = 2: undo the 1/D
    errors = []
    for delta in (1e-2, 1e-3, 1e-4):
        x_prev = euler_step(lambda a, s: teacher.x0_from(a, s, path, class_labels=y), x_t, t, t - delta, path)
        f = model.student.x0(x_t, t, class_labels=y)
        with torch.no_grad():
            f_minus = model.student.x0(x_prev, t - delta, class_labels=y)
        L_delta = ((f - f_minus) ** 2).sum(1) / (SIGMA_D * torch.tan(t))
        g_disc = grad(L_delta.mean()) / delta
        errors.append(((g_disc - g_cont).norm() / g_cont.norm()).item())
    print("discrete->continuous relative errors", errors)
    assert errors[2] < 2e-4, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert 5 < coarse / fine < 20, errors  # first order in Delta


# ------------------------------------------------------------------------------------------ sampling
# Every NFE spends exactly that many network calls: tests/test_conformance.py.
@pytest.mark.parametrize("name", METHODS)
def test_multistep_sampling_takes_intermediate_sigmas_and_refuses_guidance(name, teacher_ckpt):
    model = make(name, teacher_ckpt, ema_decay=0.0)
    calls = []
    model.student.net.register_forward_hook(lambda *_: calls.append(1))
    a = model.sample(16, 2, generator=torch.Generator().manual_seed(0), sigmas=[0.5])
    b = model.sample(16, 2, generator=torch.Generator().manual_seed(0), sigmas=[5.0])
    assert len(calls) == 4 and not torch.allclose(a.x, b.x)
    with pytest.raises(ValueError, match="sigmas: 3 NFE need 2 intermediate noise levels, got 1"):
        model.sample(4, 3, sigmas=[1.0])
    with pytest.raises(ValueError, match=r"sample: .* takes no option\(s\) \['guidance_scale'\]"):
        model.sample(4, 1, guidance_scale=2.0)


def test_default_intermediate_levels():
    assert consistency_sigmas(1).tolist() == [80.0]
    assert consistency_sigmas(2).tolist() == pytest.approx([80.0, 2.5152], abs=1e-4)
    assert consistency_sigmas(3, sigmas=[10.0, 1.0]).tolist() == [80.0, 10.0, 1.0]


def test_sigmas_option_of_sample_and_evaluate(tmp_path, capsys):
    """`--sigmas` samples what `module.sample(..., sigmas=...)` does; the default levels given by hand change nothing;
    a count that does not fit --nfe, or levels out of order, are refused before any sampling, naming the flag."""
    import numpy as np

    from lit_fewstep.cli import main
    from lit_fewstep.methods.sampling import draw

    model = make("ct", None, ema_decay=0.0)
    ckpt = str(tmp_path / "ct.pt")
    model.export(ckpt)
    default = [str(s) for s in consistency_sigmas(3, model.sigma_min, model.sigma_max)[1:].tolist()]
    args = ["sample", "--ckpt", ckpt, "--nfe", "3", "--num", "16", "--seed", "2"]
    main([*args, "--out", str(tmp_path / "default.npz")])
    main([*args, "--sigmas", *default, "--out", str(tmp_path / "by_hand.npz")])
    main([*args, "--sigmas", "20", "0.5", "--out", str(tmp_path / "tuned.npz")])
    by_hand, tuned = np.load(tmp_path / "by_hand.npz")["samples"], np.load(tmp_path / "tuned.npz")["samples"]
    assert np.array_equal(np.load(tmp_path / "default.npz")["samples"], by_hand)
    expected = draw(load_module(ckpt), 16, 3, 2, sigmas=[20.0, 0.5])[0].numpy()
    assert np.allclose(tuned, expected, atol=1e-6) and not np.allclose(tuned, by_hand, atol=1e-3)
    with pytest.raises(SystemExit):
        main([*args, "--sigmas", "1.0", "--out", str(tmp_path / "x.npz")])
    assert "--sigmas: 1 intermediate noise levels make 2 NFE, but --nfe is 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", ckpt, "--nfe", "3", "--sigmas", "0.5", "20", "--out", str(tmp_path / "e.json")])
    assert "--sigmas: sigmas: intermediate levels must decrease" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "e.json").exists()


# ------------------------------------------------------------------------------------------ training / checkpoints
# Training 3 iterations, export (no teacher inside) and reload without the teacher giving identical samples:
# tests/test_conformance.py.


def test_cd_starts_from_the_teacher_weights(teacher_ckpt, tmp_path):
    model = CD(mlp(seed=5), teacher_ckpt, sigma_data=SIGMA_D, target_mu=0.9)
    model.prepare_teacher(initialize=True)
    for name, p in model.teacher.net.state_dict().items():
        assert torch.equal(model.student.net.state_dict()[name], p)
        assert torch.equal(model.ema.net.state_dict()[name], p) and torch.equal(model.target.net.state_dict()[name], p)


def test_config_errors_name_the_field(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="lpips_weights: distance 'lpips' needs a local"):
        CD(mlp(), teacher_ckpt, distance="lpips")
    with pytest.raises(ValueError, match="tangent_norm: choose one of"):
        SCT(mlp(), tangent_norm="L2")
    model = SCD(mlp(num_classes=0), teacher_ckpt)
    with pytest.raises(ValueError, match="teacher_ckpt: teacher has num_classes=2 but the student net has num_classes=0"):
        model.prepare_teacher()
    with pytest.raises(FileNotFoundError, match="teacher_ckpt: checkpoint .* does not exist"):
        CD(mlp(), str(tmp_path / "missing.pt")).prepare_teacher()


@pytest.mark.slow
def test_ddp_two_processes_run_scd(teacher_ckpt, tmp_path):
    """Forward-mode AD (torch.func.jvp) inside training_step under 2-process gloo DDP, from configs/scd/tree.yaml."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "tests/_consistency_ddp.py", "--config", "configs/scd/tree.yaml", "--teacher", teacher_ckpt,
           "--devices", "2", "--steps", "3", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes" in result.stdout
    model = load_module(out)
    assert type(model) is SCD and int(model.iteration) == 3


def test_features_distance_is_the_digits_classifiers_squared_feature_difference():
    from lit_fewstep.methods.consistency import digits_features
    net = digits_features()
    torch.manual_seed(0)
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    d = consistency_distance(a, b, "features", features=net)
    assert torch.allclose(d, (net.features(a) - net.features(b)).pow(2).mean(1))
    assert (d > 0).all() and consistency_distance(a, a, "features", features=net).abs().max() == 0
    a.requires_grad_(True)
    consistency_distance(a, b, "features", features=net).sum().backward()
    assert a.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())  # frozen, input differentiable
    with pytest.raises(ValueError, match="distance: 'features' is the shipped digits classifier's"):
        consistency_distance(torch.zeros(2, 2), torch.ones(2, 2), "features", features=net)


def test_cd_with_the_features_distance_trains_and_never_saves_the_classifier():
    from lit_fewstep.data import DigitsDataModule
    from lit_fewstep.nets import UNet
    net = UNet(img_resolution=8, in_channels=1, model_channels=32, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[4], num_classes=10)
    cd = CD(net, str(ROOT / "lit_fewstep/assets/edm_digits.pt"), sigma_data=0.5, init_from_teacher=True,
            distance="features")
    data = DigitsDataModule(image_size=8, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    loss = cd.consistency_loss(batch)
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in cd.student.parameters())
    assert cd.feature_net is not None and not any(k.startswith("feature_net.") for k in cd.state_dict_to_save())
