"""Multi-Student Distillation (issue 20): per-student optimizers and clipping during real training, routing at
sampling (also after a reload without the teacher), and the k-means partition of the classes.
(Construction, TSM warm-up and error messages: tests/test_dmd.py; the conformance suite covers MSD too.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import MSD, EDMDiffusion
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.methods.msd import kmeans_partition, teacher_class_means
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module

from conftest import ROOT


@pytest.fixture(scope="module")
def eight_class_teacher(tmp_path_factory) -> str:
    torch.manual_seed(1)
    teacher = EDMDiffusion(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8), sigma_data=1.0, ema_decay=0.0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("teachers") / "eight.pt"
    teacher.export(str(path))
    return str(path)


def trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))


def student_parameters(model: MSD, k: int) -> set[int]:
    """Everything student k owns: its generator, fake score and GAN head."""
    nets = [model.G.members[k], model.fake_score.members[k], model.head.members[k]]
    return {id(p) for net in nets for p in net.parameters()}


def test_each_students_optimizer_only_changes_that_student(eight_class_teacher, tmp_path):
    """Through a real fit (mixed-class batches, TTUR, GAN): every optimizer step moves parameters of one student
    only, every student is moved, each optimizer's Adam state covers exactly one student's parameters, and the
    gradient clip is per student: with a tiny clip each student's clipped gradient has norm exactly `grad_clip`
    (one joint clip over K students would leave each student a share, sum of squares = clip^2)."""
    clip = 1e-6
    model = MSD(eight_class_teacher, num_students=2, generator_every=2, gan_generator_weight=0.1, lr=1e-3,
                grad_clip=clip, ema_decay=0.0)
    owners = [student_parameters(model, k) for k in range(2)]
    everything = [p for net in (model.G, model.fake_score, model.head) for p in net.parameters()]
    steps, norms = [], []

    class Watch(L.Callback):
        def on_train_start(self, trainer, module):
            for opt in trainer.optimizers:
                opt.register_step_pre_hook(self.before)
                opt.register_step_post_hook(self.after)

        def before(self, opt, args, kwargs):
            self.snapshot = [p.detach().clone() for p in everything]

        def after(self, opt, args, kwargs):
            changed = {id(p) for p, old in zip(everything, self.snapshot) if not torch.equal(p, old)}
            steps.append(changed)

    clip_gradients = model.on_before_optimizer_step

    def clipped(optimizer):  # the module clips here, inside opt.step, just before the update
        clip_gradients(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    model.on_before_optimizer_step = clipped
    data = Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=640)
    iterations = 6  # critic every iteration, generator at 0, 2, 4; one optimizer per student each
    trainer(tmp_path, model.optimizer_steps_for(iterations), [Watch()]).fit(model, data)
    assert int(model.iteration) == iterations and len(steps) == 2 * (6 + 3)
    moved = [0, 0]
    for changed in steps:
        assert changed, "an optimizer step changed nothing"
        owner = [k for k in range(2) if changed & owners[k]]
        assert len(owner) == 1 and changed <= owners[owner[0]], "one optimizer step changed two students"
        moved[owner[0]] += 1
    assert moved == [9, 9]
    for opt in model.trainer.optimizers:
        state = {id(p) for p in opt.state}
        assert any(state <= owners[k] for k in range(2)) and state
    assert norms == pytest.approx([clip] * len(norms), rel=1e-3)


def test_kmeans_partition_groups_nearby_classes():
    # classes c sit near cluster c % 3: the groups are {0, 3, 6}, {1, 4, 7}, {2, 5}, whatever the seed
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centers[torch.arange(8) % 3] + 0.1 * torch.randn(8, 2, generator=g)
    for seed in range(5):
        assert kmeans_partition(points, 3, seed=seed) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    # duplicated points still give K non-empty groups
    groups = kmeans_partition(torch.zeros(5, 3), 3)
    assert len(groups) == 3 and all(groups) and sorted(c for grp in groups for c in grp) == list(range(5))
    with pytest.raises(ValueError, match="num_students: k-means needs 1..5 groups"):
        kmeans_partition(torch.zeros(5, 3), 6)


def test_teacher_class_means_are_the_data_class_means():
    """At sigma = 80 the shipped tree teacher's denoiser returns E[x0 | c]: its class means match the data's."""
    teacher = load_teacher(str(ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"))
    means = teacher_class_means(teacher, 2, (2,), draws=256)
    data = Toy2DDataModule(name="tree", batch_size=256)
    data.setup("fit")
    x, y = data.reference_samples(20000, seed=0)
    truth = torch.stack([x[y == c].mean(0) for c in range(2)])
    assert (means - truth).norm(dim=1).max() < 0.1 * truth.norm(dim=1).min() + 0.05
    assert (truth[0] - truth[1]).norm() > 0.3  # the check separates the classes


def test_kmeans_students_route_every_class_to_their_student_after_reload(eight_class_teacher, tmp_path):
    model = MSD(eight_class_teacher, num_students=3, partition="kmeans", ema_decay=0.0)
    teacher = load_teacher(eight_class_teacher)
    expected = kmeans_partition(teacher_class_means(teacher, 8, (2,)), 3)
    assert sorted(model.partition) == expected
    path = tmp_path / "msd.pt"
    model.export(str(path))
    assert load_checkpoint(path)["lit_fewstep"]["config"]["init_args"]["partition"] == model.partition
    # the recorded groups, not the teacher, define the routing of a reloaded student
    teacher_file = tmp_path / "moved_teacher.pt"
    import shutil
    shutil.move(eight_class_teacher, teacher_file)
    try:
        loaded = load_module(path)
    finally:
        shutil.move(teacher_file, eight_class_teacher)
    assert torch.equal(loaded.G.route, model.G.route)
    seen = {k: [] for k in range(3)}
    for k, student in enumerate(loaded.G.members):
        student.register_forward_hook(lambda mod, args, kwargs, out, k=k: seen[k].append(kwargs["class_labels"]),
                                      with_kwargs=True)
    labels = torch.arange(8).repeat(4)
    out = loaded.sample(32, 1, class_labels=labels, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 1
    for k, group in enumerate(loaded.partition):
        assert len(seen[k]) == 1  # one forward per student per step
        assert sorted(seen[k][0].tolist()) == sorted(c for c in labels.tolist() if c in group)
    with pytest.raises(ValueError, match="partition: give K lists of class labels or 'kmeans'"):
        MSD(eight_class_teacher, num_students=2, partition="kmean")


def test_every_ema_starts_from_the_teacher_when_the_teacher_loads_late(eight_class_teacher):
    """With the student's net, preconditioning and sigma_data given, the teacher loads at `prepare` (Lightning's
    configure_model), after any `add_ema`: the named EMAs must start from the teacher-initialised students as the
    sampling EMA does, not from the random weights the students were built with."""
    torch.manual_seed(7)
    net = MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8)
    model = MSD(eight_class_teacher, num_students=2, student_net=net, preconditioning="edm", sigma_data=1.0,
                ema_decay=0.9)
    model.add_ema("slow", decay=0.999)
    random_init = [p.clone() for p in model.ema_slow.parameters()]
    model.prepare()
    teacher = model.frozen_network("teacher")
    for average in (model.ema, model.ema_slow):
        for member in average.members:
            assert all(torch.equal(a, b) for a, b in zip(member.parameters(), teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(random_init, model.ema_slow.parameters()))


def test_emas_restart_when_distillation_follows_the_warm_up(eight_class_teacher, tmp_path):
    """TSM then DMD2 are two stages: on entering DMD2 every EMA restarts from the warmed-up students and the power
    profile counts from there, so no average carries the warm-up's weights. After the first DMD2 generator step a
    power-profile EMA (decay 0 at its first update) equals the students and a constant one is
    lerp(students before, students after, 1 - decay); carried over, both would still hold the TSM-phase weights."""
    small = MLP(dim=2, hidden=16, depth=2, emb_dim=16, num_classes=8)
    model = MSD(eight_class_teacher, num_students=2, student_net=small, tsm_iterations=3, generator_every=2,
                lr=1e-3, ema_decay=0.9)
    model.add_ema("slow", decay=0.99)
    model.add_ema("power", gamma=4.0)
    assert [stage.name for stage in model.stages] == ["tsm", "dmd2"]
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if int(module.iteration) == 3:
                seen["before"] = [p.detach().clone() for p in module.G.parameters()]
                seen["updates"] = int(module.ema_updates)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if int(module.iteration) == 4:
                seen["after"] = [p.detach().clone() for p in module.G.parameters()]
                seen["slow"] = [p.detach().clone() for p in module.ema_slow.parameters()]
                seen["power"] = [p.detach().clone() for p in module.ema_power.parameters()]
                seen["updates_after"] = int(module.ema_updates)

    L.seed_everything(0)
    trainer(tmp_path, model.optimizer_steps_for(4), [Watch()]).fit(
        model, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=640))
    assert seen["updates"] == 3 and seen["updates_after"] == 1
    assert all(torch.equal(p, q) for p, q in zip(seen["power"], seen["after"]))
    for slow, before, after in zip(seen["slow"], seen["before"], seen["after"]):
        assert torch.allclose(slow, torch.lerp(before, after, 0.01), atol=1e-7)
    assert not all(torch.equal(p, q) for p, q in zip(seen["before"], seen["after"]))


def test_regression_pairs_train_each_student_on_its_own_classes(eight_class_teacher):
    """DMD's regression loss in MSD (`reg_pairs`): L_reg is the mean over pairs of ||G_k(z) - y||^2 with G_k the
    student owning the pair's class (recomputed here member by member on the same draw); with only student 0's
    pairs left, student 1's parameters get no gradient from it and student 0's do."""
    model = MSD(eight_class_teacher, num_students=2, reg_pairs=32, reg_pairs_nfe=3, reg_weight=1.0, reg_batch_size=16,
                ema_decay=0.0)
    assert model.uses_regression
    model.prepare()
    torch.manual_seed(0)
    for member in model.G.members:  # students that differ from the teacher and from each other
        with torch.no_grad():
            for p in member.parameters():
                p.add_(0.05 * torch.randn_like(p))
    draws = model._draws
    loss = model.regression_loss()
    model._draws = draws  # the same pairs again
    z, target, labels = model.random_pairs(16)
    owner = model.G.route[labels]
    assert set(owner.tolist()) == {0, 1}
    sigma = torch.full((16,), model.generator_sigmas[0])
    expected = torch.zeros(())
    for k, member in enumerate(model.G.members):
        i = owner == k
        x = member.x0_from(sigma[i, None] * z[i], sigma[i], model.edm, class_labels=labels[i])
        expected = expected + ((x - target[i]) ** 2).mean(dim=1).sum()
    torch.testing.assert_close(loss, expected / 16)

    keep = model.G.route[model.pair_labels] == 0
    model.pair_noise, model.pair_x, model.pair_labels = (model.pair_noise[keep], model.pair_x[keep],
                                                         model.pair_labels[keep])
    model.regression_loss().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.G.members[1].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.G.members[0].parameters())


def test_shared_critic_is_dmd2s_critic_over_all_students(eight_class_teacher):
    """`shared_critic`: one class-conditional fake score and one head judge every student's samples. With students
    still equal to the teacher (so routed samples equal one student's), its critic loss and the fake score's gradient
    equal DMD2's on the same batch and draws, bit for bit: the shared fake score steps on the whole batch, where a
    per-student one sees its share only. The generators keep one optimizer each, the critic has one."""
    from lit_fewstep.methods import DMD2

    settings = dict(gan_generator_weight=0.1, generator_sigmas=(80.0, 1.0), ema_decay=0.0)
    shared = MSD(eight_class_teacher, num_students=2, shared_critic=True, **settings)
    single = DMD2(eight_class_teacher, **settings)
    single.head.load_state_dict(shared.head.state_dict())
    assert not hasattr(shared.fake_score, "members") and not hasattr(shared.head, "members")
    assert len(shared.configure_optimizers()) == 2 + 1
    critic_parameters = {id(p) for net in (shared.fake_score, shared.head) for p in net.parameters()}
    assert {id(p) for p in shared.configure_optimizers()[-1].param_groups[0]["params"]} == critic_parameters

    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(32, 2, generator=g), torch.arange(8).repeat(4))
    losses = []
    for model in (shared, single):
        model._draws = 0
        loss = model.critic_loss(batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(shared.fake_score.parameters(), single.fake_score.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert sum(float(p.grad.abs().sum()) for p in shared.head.parameters()) > 0

    assert len(MSD(eight_class_teacher, num_students=2, **settings).configure_optimizers()) == 2 + 2  # the paper's
