"""Guided distillation (Meng et al. 2023): the progressive-distillation target, the guidance-weight convention, the
stage-1 target at w = 0 (and a student trained on 1-D Gaussians against their closed-form denoisers), the halving
schedule, stage hand-over, export and the two samplers."""

from __future__ import annotations

import math

import pytest
import torch

from conformance_methods import fit
from lit_fewstep.diffusion.guidance import guided_x0, scale_from_cfg_w
from lit_fewstep.diffusion.paths import VPCosinePath
from lit_fewstep.diffusion.solvers import DDIMHeunStep, DDIMStep, SamplerState, cosine_sigmas
from lit_fewstep.methods import GuidedDistillation
from lit_fewstep.methods.guided_distillation import halving_schedule, pd_target, vp_time
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module

TREE = "lit_fewstep/assets/edm_tree.pt"

pytestmark = pytest.mark.usefixtures("float32_default_dtype")


def tree_module(**kw) -> GuidedDistillation:
    torch.manual_seed(0)
    args = dict(guidance_iterations=4, teacher_steps=8, halving_iterations=3, ema_decay=0.0)
    return GuidedDistillation(TREE, **{**args, **kw})


def _nonlinear_x0(x, t):
    """A data predictor that changes along the trajectory (so DDIM steps do not compose trivially)."""
    return torch.tanh(1.3 * x + 0.7 * t[:, None]) - 0.2 * x**2


# --------------------------------------------------------------------------------------------- the x̃ target
def test_one_student_step_on_the_target_lands_on_two_teacher_steps():
    path = VPCosinePath()
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(64, 3, generator=g, dtype=torch.float64)
    grid = torch.linspace(0.99, 0.0, 5, dtype=torch.float64)  # includes the step that lands on t = 0
    i = torch.randint(0, 4, (64,), generator=g)
    t, t_end = grid[i], grid[i + 1]
    t_mid = 0.5 * (t + t_end)
    step = DDIMStep(path)
    teacher = step(_nonlinear_x0, step(_nonlinear_x0, SamplerState.start(z_t, t), t_mid), t_end).x
    target = pd_target(z_t, t, teacher, t_end, path)
    student = step(lambda x, tt: target, SamplerState.start(z_t, t), t_end).x
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-12)
    # a target made with the times swapped (t' and t'' exchanged, the classic bug) misses
    swapped = step(_nonlinear_x0, step(_nonlinear_x0, SamplerState.start(z_t, t), t_end), t_mid).x
    assert (pd_target(z_t, t, swapped, t_mid, path) - target).abs().max() > 1e-3


def _record_times(module: GuidedDistillation) -> list:
    """Wrap the module's `model_x0` so every evaluation appends its times to the returned list."""
    seen, original = [], module.model_x0

    def recording(net, z, tt, labels, s):
        seen.append(tt.clone())
        return original(net, z, tt, labels, s)

    module.model_x0 = recording
    return seen


def test_module_target_makes_the_student_step_land_on_the_previous_models_two_steps():
    module = tree_module()
    module._enter_stages(4)  # the first halving: previous = the stage-1 model, 8 -> 4 steps
    assert module.current_steps(4) == 4 and module.previous is not None
    x = torch.randn(16, 2)
    y = torch.randint(0, 2, (16,))
    scale = torch.linspace(1.0, 5.0, 16)
    grid = module.grid(4).float()
    i = torch.arange(16) % 4
    t, t_end = grid[i], grid[i + 1]
    seen = _record_times(module)
    z_t = module.path.noise(x, torch.randn_like(x), t)
    z_end = module.two_teacher_steps(z_t, t, 0.5 * (t + t_end), t_end, y, scale)
    assert len(seen) == 2 and torch.equal(seen[0], t) and torch.allclose(seen[1], 0.5 * (t + t_end))
    target = pd_target(z_t, t, z_end, t_end, module.path)
    landed = DDIMStep(module.path)(lambda z, tt: target, SamplerState.start(z_t, t), t_end).x
    torch.testing.assert_close(landed, z_end, rtol=1e-4, atol=1e-4)


def test_first_halving_solver_heun_takes_the_stage_1_models_heun_steps_in_the_first_halving_only():
    module = tree_module(first_halving_solver="heun")
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    scale = torch.linspace(1.0, 5.0, 16)
    original = module.model_x0
    calls = _record_times(module)
    for iteration, steps, evaluations in ((4, 4, 4), (7, 2, 2)):  # the first halving (8 -> 4), then 4 -> 2
        module._enter_stages(iteration)
        module.iteration.fill_(iteration)
        assert module.current_steps() == steps
        grid = module.grid(steps).float()
        i = torch.arange(16) % steps  # includes the steps that end at t = 0
        t, t_end = grid[i], grid[i + 1]
        z_t = module.path.noise(x, torch.randn_like(x), t)
        calls.clear()
        z_end = module.two_teacher_steps(z_t, t, 0.5 * (t + t_end), t_end, y, scale)
        assert len(calls) == evaluations
        step = DDIMHeunStep(module.path) if steps == 4 else DDIMStep(module.path)
        fn = lambda z, tt: original(module.previous, z, tt, y, scale)  # noqa: E731
        expected = step(fn, step(fn, SamplerState.start(z_t, t), 0.5 * (t + t_end)), t_end).x
        torch.testing.assert_close(z_end, expected, rtol=0, atol=0)
        if steps == 4:
            ddim = DDIMStep(module.path)
            plain = ddim(fn, ddim(fn, SamplerState.start(z_t, t), 0.5 * (t + t_end)), t_end).x
            assert (z_end - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="first_halving_solver"):
        tree_module(first_halving_solver="rk4")


# --------------------------------------------------------------------------------------------- guidance weight
def test_mengs_weight_is_our_scale_plus_one():
    module = tree_module()
    teacher = module.frozen_network("teacher")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 2, generator=g)
    t = torch.rand(12, generator=g) * 0.9 + 0.05
    y = torch.randint(0, 2, (12,), generator=g)
    x_c = teacher.x0_from(z, t, module.path, class_labels=y)
    x_u = teacher.x0_from(z, t, module.path, class_labels=torch.full_like(y, teacher.num_classes))
    assert not torch.allclose(x_c, x_u)  # the teacher's guidance does something
    for w in (0.0, 0.5, 1.0, 3.0):
        meng = (1 + w) * x_c - w * x_u
        assert scale_from_cfg_w(w) == w + 1
        torch.testing.assert_close(guided_x0(teacher, z, t, y, w + 1, path=module.path), meng, rtol=1e-5, atol=1e-5)
    w = torch.tensor([0.0, 0.5, 1.0, 3.0] * 3)
    meng = (1 + w[:, None]) * x_c - w[:, None] * x_u
    torch.testing.assert_close(module.guidance_target(z, t, y, w + 1), meng, rtol=1e-5, atol=1e-5)


def test_stage1_target_at_w0_is_the_unguided_conditional_teacher():
    module = tree_module()
    teacher = module.frozen_network("teacher")
    z, t = torch.randn(8, 2), torch.full((8,), 0.4)
    y = torch.tensor([0, 1] * 4)
    conditional = teacher.x0_from(z, t, module.path, class_labels=y)
    scale = torch.tensor([1.0, 3.0] * 4)  # w = 0 beside w = 2 in one batch
    target = module.guidance_target(z, t, y, scale)
    # equal in exact arithmetic; to float32 rounding here (bit-equal on one CPU, not on another's kernels)
    torch.testing.assert_close(target[scale == 1.0], conditional[scale == 1.0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(target[scale != 1.0], conditional[scale != 1.0])
    # the student starts as the conditional teacher at every w (teacher weights, guidance embedding at zero)
    for s in (1.0, 2.0, 5.0):
        student = module.model_x0(module.student, z, t, y, torch.full((8,), s))
        torch.testing.assert_close(student, conditional, rtol=1e-5, atol=1e-6)


def test_unguided_fraction_trains_that_share_at_exactly_scale_1_and_the_rest_uniformly():
    like = torch.zeros(1)  # tree_module seeds the global generator, so both draws start from the same state
    plain = tree_module().draw_scales(20000, like)
    mixed = tree_module(unguided_fraction=0.25).draw_scales(20000, like)
    assert (plain == 1.0).sum() == 0  # the paper's uniform draw never lands on w = 0 exactly
    at_one = mixed == 1.0
    assert abs(at_one.float().mean().item() - 0.25) < 0.015
    # the rest are the same uniform draw over guidance_range (1, 5): unchanged where not replaced
    torch.testing.assert_close(mixed[~at_one], plain[~at_one], rtol=0, atol=0)
    assert abs(mixed[~at_one].mean().item() - 3.0) < 0.05
    with pytest.raises(ValueError, match="unguided_fraction"):
        tree_module(unguided_fraction=1.0)


def _student_scales(module: GuidedDistillation, loss: str, n: int = 4000) -> torch.Tensor:
    """The per-sample scales one `loss` evaluation hands the student."""
    seen = []
    original = module.model_x0

    def recording(net, z, t, labels, scale):
        if net is module.student:
            seen.append(scale.clone())
        return original(net, z, t, labels, scale)

    module.model_x0 = recording
    getattr(module, loss)((torch.randn(n, 2), torch.randint(0, 2, (n,))))
    module.model_x0 = original
    return seen[0]


def test_halving_unguided_fraction_sets_the_share_of_the_halvings_alone():
    module = tree_module(unguided_fraction=0.5, halving_unguided_fraction=0.0)
    stage1 = _student_scales(module, "guidance_loss")
    assert abs((stage1 == 1.0).float().mean().item() - 0.5) < 0.03
    module._enter_stages(4)  # the first halving
    module.iteration.fill_(4)
    halving = _student_scales(module, "progressive_loss")
    assert (halving == 1.0).sum() == 0 and abs(halving.mean().item() - 3.0) < 0.1  # the paper's uniform draw
    # default: the halvings take stage 1's share
    module = tree_module(unguided_fraction=0.5)
    module._enter_stages(4)
    module.iteration.fill_(4)
    assert abs((_student_scales(module, "progressive_loss") == 1.0).float().mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="halving_unguided_fraction"):
        tree_module(halving_unguided_fraction=-0.1)


# --------------------------------------------------------------------------------------------- schedule
def test_stage_schedule_halves_n_as_configured():
    assert halving_schedule(16) == [8, 4, 2, 1]
    assert halving_schedule(8, final_steps=2) == [4, 2]
    for bad in ((12, 1), (8, 8), (8, 3), (0, 1)):
        with pytest.raises(ValueError, match="powers of two"):
            halving_schedule(*bad)
    module = tree_module(guidance_iterations=10, teacher_steps=16, halving_iterations=5)
    assert [(s.name, s.start, s.stop) for s in module.stages] == [
        ("guidance", 0, 10), ("steps_8", 10, 15), ("steps_4", 15, 20), ("steps_2", 20, 25), ("steps_1", 25, None)]
    assert [module.current_steps(k) for k in (0, 9, 10, 14, 15, 20, 25, 1000)] == [None, None, 8, 8, 4, 2, 1, 1]
    for k in (0, 10, 17, 24, 30):
        active = [p.name for p in module.phases if p.active(k)]
        assert len(active) == 1, (k, active)
    assert [p.name for p in module.phases if p.active(17)] == ["steps_4"]
    # the grid of an N-step student: uniform in VP time from t(sigma_max) down to 0
    grid = module.grid(4)
    assert grid[0] == pytest.approx(vp_time(80.0)) and grid[-1] == 0 and torch.allclose(grid.diff(), grid.diff()[0])
    only_stage1 = tree_module(teacher_steps=0)
    assert [(s.name, s.stop) for s in only_stage1.stages] == [("guidance", None)]
    # the grid in EDM noise levels is the teachers' cosine grid (sample_edm_heun(grid="cosine")): one grid, two units
    assert torch.allclose(torch.tan(0.5 * math.pi * module.grid(8)), cosine_sigmas(8, 80.0), rtol=1e-12, atol=1e-12)


def test_lr_decay_restarts_in_every_stage():
    """lr_decay_after: EDM2's inverse-square-root decay counted from each stage's own start (a fresh optimizer per
    halving, as in progressive distillation), so every halving begins at the full lr."""
    module = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3, lr_decay_after=10)
    stage1, halving = module.phases[0], module.phases[1]
    assert stage1.scheduled and halving.scheduled
    lr_at = lambda phase, iteration: phase.lr_at(module._phase_steps_before(phase, iteration))  # noqa: E731
    assert lr_at(stage1, 39) == pytest.approx(1e-3 / math.sqrt(40 / 10))
    assert lr_at(halving, 40) == pytest.approx(1e-3)  # the halving's first step
    assert lr_at(halving, 79) == pytest.approx(1e-3 / math.sqrt(40 / 10))
    assert not tree_module().phases[0].scheduled  # default: constant lr


def test_lr_anneal_takes_every_halving_linearly_to_zero_and_leaves_stage_1_alone():
    """lr_anneal: the progressive-distillation code's linear decay to zero over each halving, restarted at the full
    lr by the next one; stage 1 keeps its own schedule."""
    module = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3, lr_anneal=True)
    stage1, first, last = module.phases[0], module.phases[1], module.phases[-1]
    lr_at = lambda phase, iteration: phase.lr_at(module._phase_steps_before(phase, iteration))  # noqa: E731
    assert not stage1.scheduled
    assert [lr_at(first, i) for i in (40, 50, 79)] == pytest.approx([1e-3, 0.75e-3, 1e-3 / 40])
    assert [lr_at(last, i) for i in (80, 119, 120)] == pytest.approx([1e-3, 1e-3 / 40, 0.0])
    assert not tree_module().phases[1].scheduled  # default: constant lr
    # a last stage planned longer than a halving anneals over its own length
    longer = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3, lr_anneal=True,
                         final_iterations=100)
    assert longer.phases[1].anneal == 40 and longer.phases[-1].anneal == 100
    last = longer.phases[-1]
    assert last.lr_at(longer._phase_steps_before(last, 130)) == pytest.approx(1e-3 * 0.5)  # 50 of 100 steps
    with pytest.raises(ValueError, match="final_iterations"):
        tree_module(final_iterations=0)
    # with an inverse-square-root decay: stage 1 keeps it, the halvings anneal instead (as the PD code's halvings)
    both = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3, lr_anneal=True,
                       lr_decay_after=10)
    stage1, first = both.phases[0], both.phases[1]
    assert stage1.lr_at(both._phase_steps_before(stage1, 39)) == pytest.approx(1e-3 / (40 / 10) ** 0.5)
    assert first.lr_at(both._phase_steps_before(first, 60)) == pytest.approx(0.5e-3) and first.decay_after == 0
    assert tree_module(lr_decay_after=10).phases[1].decay_after == 10  # without the anneal every stage decays
    # guidance_lr_anneal: stage 1 anneals over guidance_iterations too, in place of its decay
    annealed = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3,
                           lr_decay_after=10, guidance_lr_anneal=True)
    stage1 = annealed.phases[0]
    assert [stage1.lr_at(annealed._phase_steps_before(stage1, i)) for i in (0, 30, 39)] == pytest.approx(
        [1e-3, 0.25e-3, 1e-3 / 40])
    assert annealed.phases[1].decay_after == 10 and not annealed.phases[1].anneal  # the halvings as before
    # guidance_warmup: stage 1's lr rises linearly over its first steps; the halvings start at the full lr
    warm = tree_module(guidance_iterations=40, teacher_steps=4, halving_iterations=40, lr=1e-3, guidance_warmup=10)
    stage1 = warm.phases[0]
    assert [stage1.lr_at(warm._phase_steps_before(stage1, i)) for i in (0, 4, 9, 30)] == pytest.approx(
        [1e-4, 5e-4, 1e-3, 1e-3])
    assert warm.phases[1].warmup == 0 and not tree_module().phases[0].warmup
    with pytest.raises(ValueError, match="guidance_warmup"):
        tree_module(guidance_warmup=-1)


# --------------------------------------------------------------------------------------------- stages in a fit
def test_stages_hand_over_and_export_keeps_only_the_student(tmp_path):
    from conformance_methods import build

    module, _ = fit(lambda: build("guided_distillation"), tmp_path / "fit", 9)  # stages [0,4) [4,8) [8,12) [12,..)
    assert int(module.iteration) == 9 and module.current_steps() == 2
    assert module.previous is not None and not any(p.requires_grad for p in module.previous.parameters())
    assert not module.previous.training and "previous" in module.frozen_names
    path = tmp_path / "model.pt"
    module.export(str(path))
    keys = load_checkpoint(path)["state_dict"].keys()
    assert not any(k.startswith(("previous.", "teacher.")) for k in keys) and "stage_entered" not in keys
    loaded = load_module(path)
    assert loaded.previous is None
    for nfe in (1, 2, 4):
        a = module.sample(8, nfe, generator=torch.Generator().manual_seed(3), guidance_scale=3.0)
        b = loaded.sample(8, nfe, generator=torch.Generator().manual_seed(3), guidance_scale=3.0)
        assert torch.equal(a.x, b.x) and a.nfe == nfe


def test_pin_unguided_keeps_the_students_w0_prediction_off_the_guidance_embedding(tmp_path):
    """pin_unguided builds the student with guidance_null = 1 (scale 1 = Meng's w = 0): it starts as the conditional
    teacher, and its unguided prediction stays so whatever the guidance embedding's weights (other scales move);
    the export records it; a given net without the pin is refused by name."""
    from lit_fewstep.nets import MLP

    module = tree_module(pin_unguided=True)
    module.prepare()
    assert module.student.net.cond.guidance_null == 1.0
    x, t = torch.randn(16, 2), torch.full((16,), 0.7)
    labels = torch.randint(0, module.student.num_classes, (16,))
    conditional = module.teacher(x, t, class_labels=labels)
    def unguided():
        return module.student(x, t, class_labels=labels, guidance=torch.ones(16))
    assert torch.equal(unguided(), conditional)
    with torch.no_grad():
        for p in module.student.net.cond.guidance.parameters():
            p.normal_()
    assert torch.allclose(unguided(), conditional, atol=1e-6)
    assert not torch.allclose(module.student(x, t, class_labels=labels, guidance=torch.full((16,), 3.0)), conditional,
                              atol=1e-3)
    path = tmp_path / "model.pt"
    module.export(str(path))
    assert load_module(path).student.net.cond.guidance_null == 1.0
    with pytest.raises(ValueError, match="pin_unguided.*guidance_null=1.0"):
        unpinned = MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=module.student.num_classes, guidance_embed=True)
        tree_module(pin_unguided=True, net=unpinned)


def test_guidance_trains_embedding_keeps_stage_1_the_teacher_at_w0_and_the_halvings_train_all(tmp_path):
    """guidance_trains="embedding" with pin_unguided: stage 1 steps the guidance embedding alone, so every weight the
    student shares with the teacher is the teacher's at the end of stage 1 and the unguided prediction is the
    conditional teacher's exactly, while w > 0 has moved; the first halving then trains the whole student. Fails if
    stage 1's optimizer holds any shared weight, or if the halvings keep the base frozen."""
    from conformance_methods import build, teacher_path

    def make():
        return GuidedDistillation(teacher_path(), guidance_iterations=4, teacher_steps=8, halving_iterations=4,
                                  lr=1e-2, ema_decay=0.0, pin_unguided=True, guidance_trains="embedding")

    module, _ = fit(make, tmp_path / "stage1", 4)  # stage 1 is [0, 4)
    teacher = module.teacher.state_dict()
    shared = {k: v for k, v in module.student.state_dict().items() if ".cond.guidance." not in k}
    assert shared and all(torch.equal(v, teacher[k]) for k, v in shared.items())
    x, t = torch.randn(16, 2), torch.full((16,), 0.7)
    labels = torch.randint(0, module.student.num_classes, (16,))
    with torch.no_grad():
        conditional = module.teacher(x, t, class_labels=labels)
        assert torch.equal(module.student(x, t, class_labels=labels, guidance=torch.ones(16)), conditional)
        assert not torch.allclose(module.student(x, t, class_labels=labels, guidance=torch.full((16,), 3.0)),
                                  conditional, atol=1e-4)
    halved, _ = fit(make, tmp_path / "halving", 6)
    assert any(not torch.equal(v, teacher[k]) for k, v in halved.student.state_dict().items()
               if ".cond.guidance." not in k)
    assert build("guided_distillation").phases[0].network_paths == ("student",)  # the paper's default
    with pytest.raises(ValueError, match="guidance_trains.*embedding.*adapter"):
        tree_module(guidance_trains="guidance")


def test_guidance_trains_adapter_keeps_stage_1_the_teacher_at_w0_and_learns_w_in_the_adapters():
    """guidance_trains="adapter" (UNet students): stage 1's optimizer holds the guidance embedding and the per-block
    guidance adapters and nothing else; after steps of it the shared weights are the teacher's, the s = 1 prediction
    is the conditional teacher's bit for bit and s = 3 has moved. Fails if stage 1 holds a shared weight or the
    adapters leak into the unguided prediction."""
    torch.manual_seed(0)
    module = GuidedDistillation("lit_fewstep/assets/edm_digits.pt", guidance_iterations=4, teacher_steps=8, lr=1e-2,
                                pin_unguided=True, guidance_trains="adapter", guidance_rank=4)
    module.prepare()
    paths = module.stages[0].phases[0].network_paths
    trained = {id(p) for path in paths for p in module.get_submodule(path).parameters()}
    guidance_parameters = {n for n, p in module.student.named_parameters() if id(p) in trained}
    assert guidance_parameters == {n for n, _ in module.student.named_parameters()
                                   if ".cond.guidance." in n or ".guidance_affine." in n or ".guidance_branch." in n}
    assert any(".guidance_branch." in n for n in guidance_parameters)
    optimizer = torch.optim.Adam([p for n, p in module.student.named_parameters() if n in guidance_parameters],
                                 lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (16,), generator=g)
    for _ in range(3):
        optimizer.zero_grad()
        module.guidance_loss((x, y)).backward()
        optimizer.step()
    teacher = module.teacher.state_dict()
    shared = {k: v for k, v in module.student.state_dict().items() if k in teacher}
    assert len(shared) == len(teacher) and all(torch.equal(v, teacher[k]) for k, v in shared.items())
    z, t = torch.randn(16, 1, 8, 8, generator=g), torch.full((16,), 0.5)
    with torch.no_grad():
        conditional = module.teacher.x0_from(z, t, module.path, class_labels=y)
        assert torch.equal(module.model_x0(module.student, z, t, y, torch.ones(16)), conditional)
        assert not torch.allclose(module.model_x0(module.student, z, t, y, torch.full((16,), 3.0)), conditional,
                                  atol=1e-4)
    assert all(p.abs().max() > 0 for n, p in module.student.named_parameters()  # moved from their zero start
               if n.endswith(("guidance_affine.weight", "conv_b.weight")))
    with pytest.raises(ValueError, match="guidance_trains.*pin_unguided"):
        tree_module(guidance_trains="adapter")
    with pytest.raises(ValueError, match="guidance_trains.*guidance_adapter=True"):
        tree_module(guidance_trains="adapter", pin_unguided=True)


# --------------------------------------------------------------------------------------------- sampling
def test_deterministic_and_stochastic_sampling():
    module = tree_module()
    labels = torch.tensor([0, 1] * 8)

    def draw(nfe, **kw):
        return module.sample(16, nfe, class_labels=labels, generator=torch.Generator().manual_seed(5), **kw)

    for nfe in (1, 2, 4):
        det, sto = draw(nfe), draw(nfe, stochastic=True)
        assert det.nfe == sto.nfe == nfe and torch.isfinite(sto.x).all()
        assert torch.equal(sto.x, draw(nfe, stochastic=True).x)  # reproducible from the generator
        if nfe == 1:
            assert torch.equal(det.x, sto.x)  # a single step ends at t = 0: no re-noising
        else:
            assert not torch.allclose(det.x, sto.x)
    # per-sample guidance scales, and the guidance scale changes the samples
    mixed = draw(2, guidance_scale=torch.linspace(1.0, 5.0, 16))
    assert mixed.x.shape == (16, 2)
    with pytest.raises(ValueError, match="solver"):
        draw(2, solver="heun")


def test_clip_x0_bounds_the_data_prediction_at_sampling_only():
    """The progressive-distillation code's `clip_x`: at sampling every data prediction is clipped (a 1-step sample is
    the clipped unclipped one), a bound no sample reaches changes nothing, and training never clips."""
    labels = torch.tensor([0, 1] * 8)
    free, clipped, loose = tree_module(), tree_module(clip_x0=0.5), tree_module(clip_x0=1e6)

    def draw(module, nfe, **kw):
        return module.sample(16, nfe, class_labels=labels, generator=torch.Generator().manual_seed(5), **kw).x

    one_step = draw(free, 1)
    assert one_step.abs().max() > 0.5  # the tree's data reach beyond the bound
    assert torch.equal(draw(clipped, 1), one_step.clamp(-0.5, 0.5))
    for nfe in (2, 4):
        for kw in ({}, {"stochastic": True}):
            assert torch.equal(draw(loose, nfe, **kw), draw(free, nfe, **kw))
            assert draw(clipped, nfe, **kw).abs().max() <= 0.5 + 1e-6
            assert not torch.allclose(draw(clipped, nfe, **kw), draw(free, nfe, **kw))
    batch = (torch.randn(16, 2), labels)
    losses = []
    for module in (free, clipped):
        torch.manual_seed(3)
        losses.append(module.guidance_loss(batch))
    assert torch.equal(losses[0], losses[1])
    with pytest.raises(ValueError, match="^clip_x0: a positive bound"):
        tree_module(clip_x0=0.0)


# --------------------------------------------------------------------------------------------- 1-D closed form
class GaussianClassTeacher(torch.nn.Module):
    """The exact denoiser of 1-D class-conditional Gaussians x | c ~ N(mu_c, v_c) on the VP path: the conditional
    posterior mean for labels 0..K-1 and the mixture's (equal class weights) for the null label K."""

    def __init__(self, means, variances):
        super().__init__()
        self.register_buffer("mu", torch.tensor(means))
        self.register_buffer("v", torch.tensor(variances))
        self.num_classes = len(means)

    def _per_class(self, z, a, b):  # [B, K] posterior means and log evidences
        mu, v = self.mu[None], self.v[None]
        var_z = a**2 * v + b**2
        mean = mu + a * v / var_z * (z - a * mu)
        log_ev = -0.5 * (z - a * mu) ** 2 / var_z - 0.5 * torch.log(var_z)
        return mean, log_ev

    def x0_from(self, z, t, path, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0])[:, None]
        mean, log_ev = self._per_class(z, path.a(t), path.b(t))
        mixture = (torch.softmax(log_ev, dim=1) * mean).sum(1, keepdim=True)
        labels = class_labels.clamp_max(self.num_classes - 1)[:, None]
        conditional = mean.gather(1, labels)
        return torch.where(class_labels[:, None] == self.num_classes, mixture, conditional)


def test_trained_student_at_w0_is_the_conditional_model_on_1d_gaussians():
    from lit_fewstep.nets import MLP

    torch.manual_seed(0)
    net = MLP(dim=1, hidden=64, depth=2, emb_dim=32, num_classes=2, guidance_embed=True)
    module = GuidedDistillation("unused.pt", net=net, preconditioning="vp_v", sigma_data=1.0, teacher_steps=0,
                                guidance_range=(1.0, 3.0), sigma_min=0.1, sigma_max=10.0, weighting="constant",
                                ema_decay=0.0)
    teacher = GaussianClassTeacher([-1.0, 1.0], [0.3**2, 0.5**2])
    module._attach_teacher(teacher)
    opt = torch.optim.Adam(module.student.parameters(), lr=3e-3)
    for k in range(1500):
        y = torch.randint(0, 2, (256,))
        x = (teacher.mu[y] + teacher.v[y].sqrt() * torch.randn(256))[:, None]
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - k / 1500) + 1e-4
        loss = module.guidance_loss((x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.iteration += 1
    z = torch.linspace(-2.5, 2.5, 41).repeat(4)[:, None]
    t = torch.tensor([0.2, 0.4, 0.6, 0.8]).repeat_interleave(41)
    y = torch.arange(164) % 2
    with torch.no_grad():
        conditional = teacher.x0_from(z, t, module.path, class_labels=y)
        at_w0 = module.model_x0(module.student, z, t, y, torch.ones(164))
        guided = 2 * conditional - teacher.x0_from(z, t, module.path, class_labels=torch.full_like(y, 2))  # w = 1
        at_w1 = module.model_x0(module.student, z, t, y, torch.full((164,), 2.0))
    gap = (guided - conditional).abs().mean()
    # measured: gap 0.77, errors 0.038 (w = 0) and 0.047 (w = 1)
    assert gap > 0.3  # guidance moves the target a lot here ...
    assert (at_w0 - conditional).abs().mean() < 0.1 * gap  # ... and the student at w = 0 is the conditional model
    assert (at_w1 - guided).abs().mean() < 0.1 * gap


def test_sample_command_takes_stochastic(tmp_path, capsys):
    """`sample --stochastic true` is `sample(stochastic=True)`; a model without that sampler says so in one line."""
    import numpy as np

    from lit_fewstep.cli import main

    module = tree_module()
    path = tmp_path / "student.pt"
    module.export(str(path))
    common = ["sample", "--ckpt", str(path), "--nfe", "4", "--num", "16", "--seed", "5", "--class_labels", "1"]
    outs = {}
    for flag in ("true", "false"):
        main([*common, "--stochastic", flag, "--out", str(tmp_path / f"{flag}.npz")])
        outs[flag] = np.load(tmp_path / f"{flag}.npz")["samples"]
    main([*common, "--out", str(tmp_path / "default.npz")])
    assert np.array_equal(outs["false"], np.load(tmp_path / "default.npz")["samples"])  # DDIM by default
    assert not np.allclose(outs["true"], outs["false"])
    stochastic = module.sample(16, 4, class_labels=torch.ones(16, dtype=torch.long),
                               generator=torch.Generator().manual_seed(5), stochastic=True)
    assert stochastic.x.shape == outs["true"].shape
    with pytest.raises(ValueError, match=r"^stochastic: EDMDiffusion takes no 'stochastic' option"):
        main(["sample", "--ckpt", TREE, "--nfe", "4", "--num", "4", "--stochastic", "true",
              "--out", str(tmp_path / "t.npz")])
