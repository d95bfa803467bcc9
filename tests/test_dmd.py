"""DMD / DMD2: the math of the distribution-matching gradient, gradient isolation between generator and critic,
the TTUR schedule, backward simulation, NFE accounting, export/re-load, regression pairs, DDP."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import ROOT
from lit_fewstep.cli import pairs_main
from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.data.pairs import load_pairs, make_pairs
from lit_fewstep.diffusion.paths import EDMPath
from lit_fewstep.diffusion.predictions import convert_prediction
from lit_fewstep.methods import DMD, DMD2, EDMDiffusion
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.nets import MLP, UNet
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> str:
    """A class-conditional 2-D EDM teacher with non-trivial (random) weights, exported once."""
    torch.manual_seed(0)
    teacher = EDMDiffusion(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=2), sigma_data=1.0, ema_decay=0.0)
    perturb(teacher.model, 0.2)
    path = tmp_path_factory.mktemp("teachers") / "toy.pt"
    teacher.export(str(path))
    return str(path)


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(), num_classes=3)
    teacher = EDMDiffusion(net, sigma_data=0.5, ema_decay=0.0)
    perturb(teacher.model, 0.05)
    path = tmp_path_factory.mktemp("teachers") / "image.pt"
    teacher.export(str(path))
    return str(path)


def toy_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g)


def image_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.randint(0, 3, (n,), generator=g)


def tiny_trainer(tmp_path, max_steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def record_draws(model):
    """Keep every N(0, I) draw the module makes (through FewStepModule.randn)."""
    draws, randn = [], model.randn

    def recording(shape, like, generator=None):
        draws.append(randn(shape, like, generator))
        return draws[-1]

    model.randn = recording
    return draws


# ------------------------------------------------------------------------------------------------ DM gradient
@pytest.mark.parametrize("reduction", ["mean", "per_sample"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_surrogate_gradient_is_the_normalized_score_difference(toy_teacher, reduction, guidance):
    """dL_DM/dx = w (s_fake - s_real)(x_t) / (B D or B), w = sigma^2 / mean|mu_real - x|, with scores from
    the denoisers through diffusion.predictions (the paper's form, independent of the code's shortcut)."""
    model = DMD2(toy_teacher, dm_reduction=reduction, real_guidance_scale=guidance)
    perturb(model.fake_score, 0.1, seed=1)  # otherwise mu_fake == mu_real and the gradient is 0
    x, y = toy_batch(16)
    x = x.requires_grad_(True)
    sigma = torch.linspace(0.05, 20.0, 16)
    model.grid_sigmas = lambda n, fraction_range=None: sigma  # fixed noise levels
    draws = record_draws(model)
    model.distribution_matching_loss(x, y).backward()

    eps, = draws  # the forward-noising noise inside dm_gradient
    edm = EDMPath()
    with torch.no_grad():
        x_t = x + sigma[:, None] * eps
        mu_real = model.teacher.x0_from(x_t, sigma, edm, class_labels=y)
        if guidance != 1.0:
            uncond = model.teacher.x0_from(x_t, sigma, edm, class_labels=torch.full_like(y, 2))
            mu_real = uncond + guidance * (mu_real - uncond)
        mu_fake = model.fake_score.x0_from(x_t, sigma, edm, class_labels=y)
        s_real = convert_prediction(mu_real, "x0", "score", x_t, sigma, edm)
        s_fake = convert_prediction(mu_fake, "x0", "score", x_t, sigma, edm)
        w = sigma[:, None] ** 2 / (mu_real - x).abs().mean(dim=1, keepdim=True)
        expected = w * (s_fake - s_real)
    scale = x.numel() if reduction == "mean" else x.shape[0]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(x.grad * scale, expected, rtol=1e-4, atol=1e-5)


def test_dm_gradient_vanishes_when_fake_equals_real(toy_teacher):
    model = DMD2(toy_teacher)
    x, y = toy_batch(8)
    assert torch.equal(model.dm_gradient(x, y), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------ isolation
def grads(module):
    return [p.grad for p in module.parameters()]


def test_critic_loss_gives_no_gradient_to_the_generator(image_teacher):
    model = DMD2(image_teacher, gan_generator_weight=0.1, generator_sigmas=(80.0, 1.0))
    model.critic_loss(image_batch()).backward()
    assert all(g is None for g in grads(model.G))
    assert all(g is not None for g in grads(model.fake_score)) and all(g is not None for g in grads(model.head))
    assert any(g.abs().sum() > 0 for g in grads(model.head))


def test_generator_loss_gives_no_gradient_to_fake_score_or_head(image_teacher):
    model = DMD2(image_teacher, gan_generator_weight=0.1, generator_sigmas=(80.0, 1.0))
    perturb(model.fake_score, 0.05, seed=2)
    model.generator_loss(image_batch()).backward()
    assert all(g is None for g in grads(model.fake_score)) and all(g is None for g in grads(model.head))
    assert sum(float(g.abs().sum()) for g in grads(model.G) if g is not None) > 0
    # the critic is trainable again after the generator's loss
    assert all(p.requires_grad for p in model.fake_score.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_gan_generator_gradient_reaches_the_generator_through_the_critic(image_teacher):
    """Without DM (fake == real) the generator's gradient is exactly the GAN term's."""
    model = DMD2(image_teacher, gan_generator_weight=1.0)
    model.generator_loss(image_batch()).backward()
    assert sum(float(g.abs().sum()) for g in grads(model.G) if g is not None) > 0
    plain = DMD2(image_teacher, gan_generator_weight=0.0)
    assert plain.head is None
    plain.generator_loss(image_batch()).backward()
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads(plain.G))


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("cls,every,expected", [(DMD2, 5, {"generator": 2, "critic": 10}),
                                                (DMD2, 3, {"generator": 4, "critic": 10}),
                                                (DMD, 1, {"generator": 10, "fake_score": 10})])
def test_optimizer_steps_per_phase_follow_the_schedule(toy_teacher, tmp_path, cls, every, expected):
    kwargs = {"generator_every": every} if cls is DMD2 else {}
    model = cls(toy_teacher, lr=1e-4, **kwargs)
    data = Toy2DDataModule(name="tree", batch_size=32, num_train=640)
    counts = {p.name: 0 for p in model.phases}

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for phase, (opt,) in zip(pl_module.phases, pl_module._optimizers_by_phase()):
                if not hasattr(opt, "_counted"):
                    opt._counted = True
                    original = opt.optimizer.step

                    def step(*a, _name=phase.name, _orig=original, **k):
                        counts[_name] += 1
                        return _orig(*a, **k)

                    opt.optimizer.step = step

    tiny_trainer(tmp_path, sum(expected.values()), callbacks=[Count()]).fit(model, data)
    assert int(model.iteration) == 10
    assert counts == expected


def test_critic_lr_sets_the_critics_step_size_only(toy_teacher, tmp_path):
    """Two learning rates: Adam's first step moves every parameter with a gradient by about its lr (m / sqrt(v) =
    sign g), so after one iteration (generator and critic both step) the largest change of the fake score is
    critic_lr and that of the generator lr."""
    model = DMD2(toy_teacher, lr=1e-4, critic_lr=1e-2, weight_decay=0.0, gan_generator_weight=0.0, grad_clip=0.0)
    model.prepare()
    perturb(model.fake_score, 0.2, seed=1)  # mu_fake != mu_real: the DM gradient is non-zero from the start
    before = {name: [p.detach().clone() for p in getattr(model, name).parameters()] for name in ("G", "fake_score")}
    tiny_trainer(tmp_path, 2).fit(model, Toy2DDataModule(name="tree", batch_size=32, num_train=640))
    assert int(model.iteration) == 1
    moved = {name: max(float((p - q).abs().max()) for p, q in zip(getattr(model, name).parameters(), before[name]))
             for name in before}
    assert moved["fake_score"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["G"] == pytest.approx(1e-4, rel=1e-3)
    assert DMD2(toy_teacher, lr=3e-4).phases[1].lr == 3e-4  # default: the paper's single learning rate


# ------------------------------------------------------------------------------------------------ multi-step
SIGMAS = (80.0, 2.0, 0.5)


def record_generator_calls(model):
    calls = []
    model.G.register_forward_hook(lambda mod, args, kwargs, out: calls.append((args[0].clone(), out.detach().clone())),
                                  with_kwargs=True)
    return calls


@pytest.mark.parametrize("backward_simulation", [True, False])
def test_backward_simulation_feeds_the_generator_its_own_outputs(toy_teacher, backward_simulation):
    model = DMD2(toy_teacher, generator_sigmas=SIGMAS, backward_simulation=backward_simulation)
    perturb(model.G, 0.2, seed=3)
    model.draw_step = lambda: 2  # train the last step
    model._noise_like = lambda x, generator=None: torch.zeros_like(x)  # re-noising adds nothing: inputs are visible
    calls = record_generator_calls(model)
    x_real, y = toy_batch(8)
    x0, _ = model.generate((x_real, y), grad=True)
    if backward_simulation:
        assert len(calls) == 3  # two no-grad steps of its own chain, then the trained step
        torch.testing.assert_close(calls[1][0], calls[0][1])
        torch.testing.assert_close(calls[2][0], calls[1][1])
    else:
        assert len(calls) == 1  # the ablation feeds forward-noised real data
        torch.testing.assert_close(calls[0][0], x_real)
    assert x0.requires_grad


def test_renoising_uses_the_scheduled_sigma(toy_teacher):
    model = DMD2(toy_teacher, generator_sigmas=SIGMAS)
    model.draw_step = lambda: 1
    calls = record_generator_calls(model)
    model.generate(toy_batch(4096), grad=False)
    residual = calls[1][0] - calls[0][1]  # = sigma_1 eps
    assert abs(float(residual.std()) - SIGMAS[1]) < 0.05 * SIGMAS[1]


# NFE accounting (every NFE up to len(generator_sigmas)) and the refusal of more: tests/test_conformance.py.
def test_sampling_starts_at_sigma_max_times_noise(toy_teacher):
    model = DMD2(toy_teacher, generator_sigmas=SIGMAS, ema_decay=0.0)
    calls = record_generator_calls(model)
    model.sample(10, 3, generator=torch.Generator().manual_seed(0))
    assert calls[0][0].abs().mean() > 20


# ------------------------------------------------------------------------------------------------ round trip
# Training, export without the teacher, reload without the teacher file and identical samples at every NFE:
# tests/test_conformance.py. Here: what the export leaves out.
def test_export_keeps_the_generator_only(toy_teacher, tmp_path):
    model = DMD2(toy_teacher, generator_sigmas=SIGMAS, gan_generator_weight=0.1)
    assert model.head is not None
    path = tmp_path / "student.pt"
    model.export(str(path))
    keys = load_checkpoint(path)["state_dict"].keys()  # weights_only=True
    assert not any(k.startswith(("teacher.", "fake_score.", "head.")) for k in keys)
    loaded = load_module(path)
    assert type(loaded) is DMD2 and loaded.generator_sigmas == SIGMAS


def test_generator_starts_as_the_teacher_at_sigma_max(toy_teacher):
    model = DMD2(toy_teacher, ema_decay=0.0)
    teacher = load_teacher(toy_teacher)
    z = torch.randn(8, 2)
    y = torch.randint(0, 2, (8,))
    sigma = torch.full((8,), 80.0)
    torch.testing.assert_close(model.G.x0(80.0 * z, sigma, y), teacher.x0(80.0 * z, sigma, y))


# ------------------------------------------------------------------------------------------------ DMD regression
def test_pairs_command_and_regression_loss(toy_teacher, tmp_path):
    out = tmp_path / "pairs.pt"
    pairs_main(["--teacher", toy_teacher, "--num", "40", "--nfe", "5", "--out", str(out), "--batch_size", "16"])
    pairs = load_pairs(out)  # weights_only
    assert pairs["noise"].shape == pairs["x"].shape == (40, 2) and pairs["labels"].shape == (40,)
    assert pairs["nfe"] == 5 and pairs["sigma_max"] == 80.0
    # the stored sample is the teacher's ODE solution from sigma_max * noise
    again = make_pairs(load_teacher(toy_teacher), 40, nfe=5, seed=0, batch_size=16)
    torch.testing.assert_close(again["x"], pairs["x"])

    model = DMD(toy_teacher, pairs_path=str(out), reg_batch_size=40)
    model.prepare()
    index = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    model.randint = lambda low, high, shape, like, generator=None, shared=False: index  # the pairs drawn
    reg = model.regression_loss()
    del model.randint
    with torch.no_grad():
        x = model.G.x0(80.0 * pairs["noise"][index], torch.full((40,), 80.0), pairs["labels"][index])
    torch.testing.assert_close(reg, ((x - pairs["x"][index]) ** 2).mean())
    loss = model.generator_loss(toy_batch(8))
    assert torch.isfinite(loss) and loss > 0


def test_dmd2_regression_adds_lambda_reg_times_dmds_loss(toy_teacher, tmp_path):
    """DMD2 with pairs_path: L_G = L_DM + lambda_G L_GAN + lambda_reg L_reg, the first two terms unchanged (same
    weights and noise as without pairs); the pairs must start at generator_sigmas[0]."""
    out = tmp_path / "pairs.pt"
    pairs_main(["--teacher", toy_teacher, "--num", "40", "--nfe", "5", "--out", str(out), "--batch_size", "16"])
    models = []
    for pairs in (None, str(out)):
        torch.manual_seed(0)  # the same GAN head
        model = DMD2(toy_teacher, gan_generator_weight=0.1, pairs_path=pairs, reg_weight=0.5, reg_batch_size=40)
        model.prepare()
        perturb(model.G, 0.2, seed=1)
        perturb(model.fake_score, 0.2, seed=2)
        models.append(model)
    plain, regressed = models
    assert not plain.uses_regression and regressed.uses_regression
    logged = {}
    regressed._log = lambda name, value: logged.setdefault(name, value)
    loss, expected = regressed.generator_loss(toy_batch(8)), plain.generator_loss(toy_batch(8))
    assert float(logged["reg_loss"]) > 0
    torch.testing.assert_close(loss, expected + 0.5 * logged["reg_loss"])
    with pytest.raises(ValueError, match=r"pairs start at sigma_max=80.0 but generator_sigmas\[0\]=40.0"):
        DMD2(toy_teacher, generator_sigmas=(40.0,), pairs_path=str(out)).prepare()


def test_dmd2_reg_pairs_are_the_teachers_ode_from_the_generators_input(toy_teacher, tmp_path):
    """reg_pairs: the pairs are made when training starts, from generator_sigmas[0] * z (here 2.5, not 80), so the
    regression target of G(2.5 z) is the teacher's ODE solution from that same point."""
    model = DMD2(toy_teacher, generator_sigmas=(2.5,), reg_pairs=24, reg_pairs_nfe=5)
    assert model.uses_regression
    model.prepare()
    expected = make_pairs(load_teacher(toy_teacher), 24, nfe=5, sigma_max=2.5)
    torch.testing.assert_close(model.pair_noise, expected["noise"])
    torch.testing.assert_close(model.pair_x, expected["x"])
    assert not torch.allclose(expected["x"], make_pairs(load_teacher(toy_teacher), 24, nfe=5)["x"])  # 80 differs
    with pytest.raises(ValueError, match="pairs_path, reg_pairs: give a pairs file or a number"):
        DMD2(toy_teacher, pairs_path=str(tmp_path / "p.pt"), reg_pairs=8)


def test_lpips_regression_is_the_papers_distance_and_trains_the_generator(image_teacher, tmp_path):
    """DMD Eq. 9 with d = LPIPS (reg_distance="lpips", a local VGG16 file): L_reg = mean_i LPIPS(G(z_i), y_i), and its
    gradient reaches the generator only."""
    from torchvision.models import vgg16

    from lit_fewstep.metrics.lpips import LPIPS

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()},
               tmp_path / "vgg16.pth")
    out = tmp_path / "pairs.pt"
    pairs_main(["--teacher", image_teacher, "--num", "6", "--nfe", "3", "--out", str(out)])
    with pytest.raises(ValueError, match="lpips_weights: reg_distance 'lpips' needs"):
        DMD(image_teacher, pairs_path=str(out), reg_distance="lpips")
    model = DMD(image_teacher, pairs_path=str(out), reg_batch_size=6, reg_distance="lpips",
                lpips_weights=str(tmp_path / "vgg16.pth"))
    model.prepare()
    model.lpips.resolution = 32  # 224 in the paper; small here for CPU time
    pairs = load_pairs(out)
    index = torch.arange(6)
    model.randint = lambda low, high, shape, like, generator=None, shared=False: index
    reg = model.regression_loss()
    with torch.no_grad():
        x = model.G.x0(80.0 * pairs["noise"], torch.full((6,), 80.0), pairs["labels"])
        reference = LPIPS(str(tmp_path / "vgg16.pth"), resolution=32)(x, pairs["x"]).mean()
    torch.testing.assert_close(reg, reference)
    assert reg > 0
    reg.backward()
    assert all(p.grad is not None for p in model.G.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.lpips.parameters()) and not any(
        k.startswith("lpips.") for k in model.state_dict_to_save())


def test_pairs_must_match_the_generator(toy_teacher, tmp_path):
    out = tmp_path / "pairs.pt"
    pairs_main(["--teacher", toy_teacher, "--num", "4", "--nfe", "3", "--out", str(out)])
    model = DMD(toy_teacher, pairs_path=str(out), conditioning_sigma=40.0)
    with pytest.raises(ValueError, match="pairs_path: pairs start at sigma_max=80.0 but conditioning_sigma=40.0"):
        model.prepare()


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_field(toy_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_ckpt: checkpoint .*missing.pt' does not exist"):
        DMD2(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="dm_reduction: choose one of"):
        DMD2(toy_teacher, dm_reduction="sum")
    with pytest.raises(ValueError, match="generator_sigmas: need positive, strictly decreasing"):
        DMD2(toy_teacher, generator_sigmas=(1.0, 2.0))
    with pytest.raises(ValueError, match="generator_every: must be >= 1"):
        DMD2(toy_teacher, generator_every=0)
    with pytest.raises(ValueError, match="critic_lr: must be > 0"):
        DMD2(toy_teacher, critic_lr=0.0)
    with pytest.raises(ValueError, match="net: the generator has num_classes=0 but the teacher"):
        DMD2(toy_teacher, net=MLP(dim=2, hidden=32, depth=2, emb_dim=16), preconditioning="edm",
             sigma_data=1.0).prepare()


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_processes_run_a_dmd2_config(toy_teacher, tmp_path):
    """configs/dmd2/tree.yaml under 2-process gloo DDP: both ranks step, and their weights stay identical
    (the gradients of both phases are all-reduced)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_dmd2.py"), toy_teacher, str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DDP OK" in result.stdout, result.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ MSD
from lit_fewstep.methods import MSD  # noqa: E402
from lit_fewstep.methods.msd import contiguous_partition  # noqa: E402


@pytest.fixture(scope="module")
def eight_class_teacher(tmp_path_factory) -> str:
    torch.manual_seed(1)
    teacher = EDMDiffusion(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8), sigma_data=1.0, ema_decay=0.0)
    perturb(teacher.model, 0.2, seed=4)
    path = tmp_path_factory.mktemp("teachers") / "eight.pt"
    teacher.export(str(path))
    return str(path)


def record_student_labels(model):
    seen = {k: [] for k in range(len(model.G.members))}
    for k, student in enumerate(model.G.members):
        student.register_forward_hook(lambda mod, args, kwargs, out, k=k: seen[k].append(kwargs["class_labels"].clone()),
                                      with_kwargs=True)
    return seen


@pytest.mark.parametrize("partition", [None, [[3, 7], [0, 2, 4], [1, 5, 6]]])
def test_msd_routes_each_class_to_its_student(eight_class_teacher, partition):
    K = 4 if partition is None else 3
    model = MSD(eight_class_teacher, num_students=K, partition=partition, generator_sigmas=(80.0, 1.0), ema_decay=0.0)
    groups = partition or contiguous_partition(8, K)
    seen = record_student_labels(model)
    labels = torch.arange(8).repeat(3)
    out = model.sample(24, 2, class_labels=labels, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2
    for k, group in enumerate(groups):
        assert len(seen[k]) == 2  # one forward per step
        for step_labels in seen[k]:
            assert sorted(step_labels.tolist()) == sorted(c for c in labels.tolist() if c in group)
    # routed outputs equal each student's own output on its samples
    x = torch.randn(24, 2)
    sigma = torch.full((24,), 80.0)
    routed = model.G.x0(x, sigma, class_labels=labels)
    for k, group in enumerate(groups):
        mask = torch.isin(labels, torch.tensor(group))
        torch.testing.assert_close(routed[mask], model.G.members[k].x0(x[mask], sigma[mask], class_labels=labels[mask]))


def test_msd_students_train_only_on_their_classes(eight_class_teacher):
    model = MSD(eight_class_teacher, num_students=2, gan_generator_weight=0.1)
    perturb(model.fake_score, 0.1, seed=5)
    x, _ = toy_batch(16)
    y = torch.tensor([0, 1, 2, 3] * 4)  # classes of student 0 only
    model.generator_loss((x, y)).backward()
    assert sum(float(p.grad.abs().sum()) for p in model.G.members[0].parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.G.members[1].parameters())
    assert all(p.grad is None for p in model.fake_score.parameters())
    model.zero_grad(set_to_none=True)
    model.critic_loss((x, y)).backward()
    assert all(p.grad is None for p in model.fake_score.members[1].parameters())
    assert all(p.grad is None for p in model.head.members[1].parameters())
    assert any(p.grad is not None for p in model.head.members[0].parameters())


def test_msd_half_width_students_warm_up_with_teacher_score_matching(eight_class_teacher, tmp_path):
    small = MLP(dim=2, hidden=16, depth=2, emb_dim=16, num_classes=8)
    model = MSD(eight_class_teacher, num_students=2, student_net=small, tsm_iterations=4, generator_every=2, lr=1e-3)
    assert [p.name for p in model.phases] == ["tsm", "generator", "critic"]
    assert [k for k in range(10) if model.phases[0].active(k)] == [0, 1, 2, 3]
    assert [k for k in range(10) if model.phases[1].active(k)] == [4, 6, 8]
    assert [k for k in range(10) if model.phases[2].active(k)] == [4, 5, 6, 7, 8, 9]
    # TSM regresses the teacher's denoiser: zero for a student equal to the teacher
    same = MSD(eight_class_teacher, num_students=2)
    x, _ = toy_batch(32)
    batch = (x, torch.arange(8).repeat(4))
    assert float(same.tsm_loss(batch).detach()) < 1e-10
    assert float(model.tsm_loss(batch).detach()) > 1e-3
    # trains, exports, reloads without the teacher; routing and width survive
    L.seed_everything(0)
    # optimizer steps, one optimizer per student: 4 TSM iterations x 2, then 6 critic + 3 generator steps x 2
    tiny_trainer(tmp_path, 2 * (4 + 6 + 3)).fit(model, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=640))
    assert int(model.iteration) == 10
    path = tmp_path / "msd.pt"
    model.export(str(path))
    loaded = load_module(path)
    assert loaded.G.members[0].net.feature_channels == 16 and torch.equal(loaded.G.route, model.G.route)
    a = model.sample(12, 1, generator=torch.Generator().manual_seed(2))
    b = loaded.sample(12, 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.x, b.x)


def test_msd_errors_name_the_field(eight_class_teacher, toy_teacher):
    with pytest.raises(ValueError, match="num_students: 9 students for 8 classes"):
        MSD(eight_class_teacher, num_students=9)
    with pytest.raises(ValueError, match="partition: need 2 non-empty groups"):
        MSD(eight_class_teacher, num_students=2, partition=[[0, 1, 2, 3], [3, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match="class_labels: MSD routes samples"):
        MSD(toy_teacher, num_students=2).G.x0(torch.randn(3, 2), torch.ones(3))


def test_evaluate_prints_student_beside_its_teacher(tmp_path, capsys, monkeypatch):
    """The README's main command: `evaluate --teacher_nfe` scores the teacher recorded in a distilled checkpoint in
    the same table. At equal (2) NFE the one-step DMD2 student must beat its 35-NFE-trained teacher's 2-step Heun
    sampler by far (teacher ~295 FID at 2 NFE in benchmarks/results/teachers.md, student ~13 at 1)."""
    import json

    from lit_fewstep.__main__ import console

    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval.json"
    code = console(["evaluate", "--ckpt", "lit_fewstep/assets/dmd2_digits.pt", "--nfe", "1", "--num", "500",
                    "--teacher_nfe", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "| student | 1 | 1 |" in printed.out and "| teacher | 2 | 2 |" in printed.out
    report = json.loads(out.read_text())
    assert report["teacher"] == "lit_fewstep/assets/edm_digits.pt"
    student, teacher = report["rows"]
    assert (student["model"], teacher["model"]) == ("student", "teacher")
    assert student["fid"] < 0.25 * teacher["fid"], (student, teacher)


def test_evaluate_teacher_nfe_needs_a_teacher(capsys, monkeypatch):
    from lit_fewstep.__main__ import console

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:  # the parser's own exit, before any work
        console(["evaluate", "--ckpt", "lit_fewstep/assets/edm_digits.pt", "--nfe", "1", "--num", "10",
                 "--teacher_nfe", "35"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--teacher_nfe" in err and "--teacher PATH" in err
    assert "Traceback" not in err


def test_distribution_matching_draws_the_official_grid_indices(toy_teacher):
    """DMD2's code draws index 20..980 inclusive on the 1000-point Karras grid counted from sigma_min
    (int(0.02 * 1000), int(0.98 * 1000)); the full range stays every level."""
    from lit_fewstep.diffusion.solvers import karras_sigmas

    model = DMD2(toy_teacher)
    from_min = karras_sigmas(1000, append_zero=False).float().flip(0)
    drawn = set(model.grid_sigmas(100_000, (0.02, 0.98)).unique().tolist())
    assert drawn == set(from_min[20:981].tolist())
    assert set(model.grid_sigmas(100_000).unique().tolist()) == set(from_min.tolist())


def test_features_regression_is_the_digits_classifiers_distance_and_is_refused_off_digits(image_teacher, toy_teacher,
                                                                                          tmp_path):
    """reg_distance="features" (the shared `PerceptualDistance`): L_reg = mean_i ||phi(G(z_i)) - phi(y_i)||^2 / F with
    phi the shipped digits classifier, frozen and never saved; a 2-D teacher is refused naming the field."""
    from lit_fewstep.methods.consistency import digits_features

    torch.manual_seed(0)
    out = tmp_path / "pairs.pt"
    pairs_main(["--teacher", image_teacher, "--num", "6", "--nfe", "3", "--out", str(out)])
    model = DMD(image_teacher, pairs_path=str(out), reg_batch_size=6, reg_distance="features")
    model.prepare()
    pairs = load_pairs(out)
    model.randint = lambda low, high, shape, like, generator=None, shared=False: torch.arange(6)
    reg = model.regression_loss()
    with torch.no_grad():
        x = model.G.x0(80.0 * pairs["noise"], torch.full((6,), 80.0), pairs["labels"])
        phi = digits_features()
        reference = (phi.features(x) - phi.features(pairs["x"])).pow(2).mean(1).mean()
    torch.testing.assert_close(reg, reference)
    reg.backward()
    assert all(p.grad is not None for p in model.G.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.feature_net.parameters())
    assert not any(k.startswith("feature_net.") for k in model.state_dict_to_save())
    toy_pairs = tmp_path / "toy_pairs.pt"
    pairs_main(["--teacher", toy_teacher, "--num", "4", "--nfe", "3", "--out", str(toy_pairs)])
    with pytest.raises(ValueError, match="reg_distance: 'features' is the shipped digits classifier's"):
        DMD(toy_teacher, pairs_path=str(toy_pairs), reg_distance="features").prepare()
