"""The shared core of FewStepModule: frozen-network registry, schedules (Phase.stop, stages, optimizer classes,
learning-rate warm-up, one optimizer per network) and named EMAs."""

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import StopAtIteration
from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import MSD, EDMDiffusion, FewStepModule, Phase
from lit_fewstep.methods.base import Stage
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module


def _teacher_file(tmp_path, **net):
    path = tmp_path / "teacher.pt"
    EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8, **net), sigma_data=1.4).export(str(path))
    return str(path)


def _data(num_train=320):
    return Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=num_train, num_val=64)


def _trainer(root, steps, **kw):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
                     **kw)


class Regress(FewStepModule):
    """A minimal method: a generator regresses the data with one-step 'sampling', plus a frozen guide."""

    generator_name = "student"
    data_shape = (2,)

    def __init__(self, guide_ckpt: str | None = None, phases: str = "plain", ema_decay: float = 0.5):
        super().__init__(ema_decay=ema_decay)
        self.student = nn.Linear(2, 2)
        self.other = nn.Linear(2, 2)
        self.entered: list[str] = []
        if guide_ckpt is not None:
            self.register_frozen("guide", path=guide_ckpt, field="guide_ckpt")
        if phases == "plain":
            self.phases = [Phase("gen", "gen_loss", ("student",), lr=0.1, updates_ema=True)]
        elif phases == "stages":
            self.set_stages([
                Stage("first", 0, 3, [Phase("gen", "gen_loss", ("student",), lr=0.1, updates_ema=True)]),
                Stage("second", 3, None, [Phase("other", "other_loss", ("other",), lr=0.1, every=2)],
                      on_enter="start_second"),
            ])
        self.init_ema()

    def start_second(self):
        self.entered.append(f"second@{int(self.iteration)}")
        self.register_frozen("previous", module=copy.deepcopy(self.student))

    def gen_loss(self, batch):
        x, _ = batch
        return (self.student(self.randn(x.shape, x)) - x).pow(2).mean()

    def other_loss(self, batch):
        x, _ = batch
        return (self.other(x) - x.flip(1)).pow(2).mean()

    def _sample(self, noise, class_labels, nfe, net):
        return net(noise), 1


# --- frozen networks --------------------------------------------------------------------------------------------
def test_frozen_network_stays_in_eval_and_out_of_checkpoints(tmp_path):
    module = Regress(_teacher_file(tmp_path, dropout=0.5))
    assert module.guide is None  # loaded on first use
    guide = module.frozen_network("guide")
    assert module.frozen_network("guide") is guide and not any(p.requires_grad for p in guide.parameters())
    module.train()
    assert module.training and not guide.training  # train() cannot flip a frozen network
    module.sample(4, 1)  # sample() ends with self.train(was_training)
    assert not guide.training
    assert not any(k.startswith("guide.") for k in module.state_dict_to_save())
    module.export(str(tmp_path / "m.pt"))
    assert not any(k.startswith("guide.") for k in load_checkpoint(tmp_path / "m.pt")["state_dict"])


def test_cd_teacher_stays_in_eval_through_fit_and_sampling(tmp_path):
    """The bug the registry fixes: sample() during a fit put the CD teacher into training mode."""
    from lit_fewstep.methods import CD

    module = CD(MLP(dim=2, hidden=16, depth=1, emb_dim=8), _teacher_file(tmp_path), num_scales=8, sigma_data=1.4)

    class SampleDuringFit(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.sample(4, 2)
            assert pl_module.training and not pl_module.teacher.training

    _trainer(tmp_path, 3, callbacks=[SampleDuringFit()]).fit(module, _data())
    assert not module.teacher.training


def test_in_memory_frozen_network_is_saved_and_restored(tmp_path):
    module = Regress(phases="stages")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=1, save_top_k=-1,
                                               filename="{step}")
    _trainer(tmp_path, 5, callbacks=[ckpt]).fit(module, _data())
    assert module.entered == ["second@3"] and not module.previous.training
    state = module.state_dict()
    assert any(k.startswith("previous.") for k in state)  # made in memory: saved
    assert int(state["stage_entered"]) == 1


# --- schedules --------------------------------------------------------------------------------------------------
def test_phase_stop_and_stage_ranges():
    assert [k for k in range(10) if Phase("p", "l", ("g",), start=2, stop=7, every=2).active(k)] == [2, 4, 6]
    module = Regress(phases="stages")
    gen, other = module.phases
    assert (gen.start, gen.stop, other.start, other.stop) == (0, 3, 3, None)
    assert [k for k in range(9) if other.active(k)] == [3, 5, 7]
    with pytest.raises(ValueError, match="stops at 2, not after its start 2"):
        Phase("p", "l", ("g",), start=2, stop=2)
    with pytest.raises(ValueError, match="optimizer 'sgd'; choose one of"):
        Phase("p", "l", ("g",), optimizer="sgd")
    with pytest.raises(ValueError, match="overlaps the previous"):
        module.set_stages([Stage("a", 0, 5, []), Stage("b", 4, None, [])])
    with pytest.raises(ValueError, match="names on_enter 'nope'"):
        module.set_stages([Stage("a", 0, None, [], on_enter="nope")])


def _fit_stages(root, iterations, ckpt_path=None, every_step=False):
    L.seed_everything(0)
    module = Regress(phases="stages")
    callbacks = [StopAtIteration(iterations)]
    if every_step:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "c", every_n_train_steps=1, save_top_k=-1,
                                                             filename="{step}"))
    _trainer(root, -1, callbacks=callbacks).fit(module, _data(), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("cut", [2, 6])  # before the second stage begins (at 3), and inside it
def test_stage_hook_runs_once_and_resume_across_or_inside_a_stage_is_exact(tmp_path, cut):
    full = _fit_stages(tmp_path / "full", 9)
    assert full.entered == ["second@3"]
    _fit_stages(tmp_path / "cut", 7, every_step=True)
    path = next(p for p in sorted((tmp_path / "cut" / "c").glob("*.ckpt"))
                if int(load_checkpoint(p)["state_dict"]["iteration"]) == cut)
    resumed = _fit_stages(tmp_path / "resumed", 9, ckpt_path=path)
    # inside the stage: the hook rebuilt the saved structure at load (then the file's weights replaced its copy)
    assert resumed.entered == ["second@3"] if cut < 3 else ["second@0"]
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    resumed.export(str(tmp_path / "m.pt"))
    # an export holds the in-memory frozen network; the test's own class loads once its module is allowed
    assert load_module(tmp_path / "m.pt", allow_modules=["test_core"]).previous is not None


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("radam", torch.optim.RAdam),
                                      ("adamw", torch.optim.AdamW)])
def test_phase_optimizer_class(name, cls, tmp_path):
    module = Regress()
    module.phases = [Phase("gen", "gen_loss", ("student",), optimizer=name, lr=0.01)]
    (opt,) = module.configure_optimizers()
    assert type(opt) is cls


def _learning_rates_seen(phase: Phase, tmp_path, iterations: int) -> list[float]:
    """The optimizer's lr after each of `iterations` iterations of a one-phase module."""
    module = Regress()
    module.phases = [phase]
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, -1, max_epochs=1, limit_train_batches=iterations, callbacks=[Record()]).fit(module, _data())
    return seen


def test_learning_rate_warmup_is_linear_in_the_phases_steps(tmp_path):
    phase = Phase("gen", "gen_loss", ("student",), lr=0.3, warmup=3, every=2, start=1)
    assert [phase.lr_at(s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    seen = _learning_rates_seen(phase, tmp_path, iterations=7)
    # active at iterations 1, 3, 5: the lr is set when the phase steps and kept until its next step
    assert seen == pytest.approx([0.3, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3])


def test_msd_students_have_their_own_optimizers(tmp_path):
    """Each student's optimizer changes only that student: freeze all but one student's gradient by hand and the
    other students stay put, their optimizer states untouched."""
    teacher = _teacher_file(tmp_path, num_classes=8)
    module = MSD(teacher, num_students=2, generator_every=1, gan_generator_weight=0.0, lr=1e-3)
    opts = module.configure_optimizers()
    assert len(opts) == 4  # generator and critic optimizer per student
    members = module.G.members
    gen_opts = opts[:2]
    assert {id(p) for p in gen_opts[0].param_groups[0]["params"]} == {id(p) for p in members[0].parameters()}
    assert {id(p) for p in gen_opts[1].param_groups[0]["params"]} == {id(p) for p in members[1].parameters()}
    before = [p.detach().clone() for p in members[1].parameters()]
    for p in members[0].parameters():
        p.grad = torch.ones_like(p)
    gen_opts[0].step()
    gen_opts[1].step()  # no gradient: no change
    assert all(torch.equal(a, b) for a, b in zip(before, members[1].parameters()))
    assert not gen_opts[1].state


# --- EMAs -------------------------------------------------------------------------------------------------------
def test_named_emas_constant_and_power_profile():
    module = Regress(ema_decay=0.5)
    module.add_ema("slow", decay=0.9)
    module.add_ema("edm2", gamma=1.0)
    values = []
    for step in range(1, 4):
        with torch.no_grad():
            module.generator.weight.fill_(float(step))
        module.update_ema()
        values.append((module.ema.weight[0, 0].item(), module.ema_slow.weight[0, 0].item(),
                       module.ema_edm2.weight[0, 0].item()))
    # power profile, gamma = 1: decay (1 - 1/n)^2 = 0, 1/4, 4/9 at n = 1, 2, 3
    assert values[0][2] == pytest.approx(1.0)  # n = 1: decay 0, a copy
    assert values[1][2] == pytest.approx(0.25 * 1.0 + 0.75 * 2.0)
    assert values[2][2] == pytest.approx((4 / 9) * 1.75 + (5 / 9) * 3.0)
    slow0 = values[0][1]
    assert values[1][1] == pytest.approx(0.9 * slow0 + 0.1 * 2.0)
    assert module.sampling_network("slow") is module.ema_slow
    with pytest.raises(ValueError, match="no EMA named 'fast'"):
        module.sampling_network("fast")
    with pytest.raises(ValueError, match="exactly one of decay"):
        module.add_ema("bad", decay=0.9, gamma=1.0)


def test_named_emas_round_trip_through_export(tmp_path):
    module = Regress()
    module.add_ema("slow", decay=0.9)
    module.update_ema()
    module.export(str(tmp_path / "m.pt"))
    assert not any(k.startswith("ema_slow.") for k in load_checkpoint(tmp_path / "m.pt")["state_dict"])


def test_power_ema_matches_the_weighted_average_it_defines():
    """With decay (1 - 1/n)^(gamma+1) the EMA after N updates weighs w_n by (n^(gamma+1) - (n-1)^(gamma+1)) / N^(gamma+1):
    the discrete form of EDM2's power-function profile, weights growing as n^gamma."""
    gamma, weights = 2.0, [0.3, -1.0, 2.5, 4.0, 0.7]
    module = Regress()
    module.add_ema("p", gamma=gamma)
    for w in weights:
        with torch.no_grad():
            module.generator.bias.fill_(w)
        module.update_ema()
    N = len(weights)
    expected = sum(((n + 1) ** (gamma + 1) - n ** (gamma + 1)) * w for n, w in enumerate(weights)) / N ** (gamma + 1)
    assert module.ema_p.bias[0].item() == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(expected)


def test_optimizer_steps_for_matches_what_lightning_counts(tmp_path):
    """max_steps = optimizer_steps_for(N) ends the run after exactly N iterations, for TTUR and separate phases."""
    teacher = _teacher_file(tmp_path, num_classes=8)
    module = MSD(teacher, num_students=2, generator_every=3, tsm_iterations=2, lr=1e-4)
    steps = module.optimizer_steps_for(7)
    assert steps == 2 * 2 + 2 * (5 + 2)  # TSM at 0, 1; critic at 2..6; generator at 2, 5 — two students each
    _trainer(tmp_path, steps).fit(module, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=640))
    assert int(module.iteration) == 7


def test_learning_rate_decay_is_edm2_inverse_square_root_after_decay_after(tmp_path):
    phase = Phase("gen", "gen_loss", ("student",), lr=0.4, decay_after=2)
    # lr / sqrt(max((step + 1) / decay_after, 1)): constant for 2 steps, then 0.4 / sqrt(3/2), 0.4 / sqrt(2), ...
    assert [phase.lr_at(s) for s in range(4)] == pytest.approx([0.4, 0.4, 0.4 / 1.5 ** 0.5, 0.2 * 2 ** 0.5])
    warm = Phase("gen", "gen_loss", ("student",), lr=0.4, warmup=2, decay_after=4)
    assert [warm.lr_at(s) for s in (0, 1, 3, 15)] == pytest.approx([0.2, 0.4, 0.4, 0.2])
    assert _learning_rates_seen(phase, tmp_path, iterations=4) == pytest.approx([phase.lr_at(s) for s in range(4)])
    with pytest.raises(ValueError, match="decay_after"):
        Phase("gen", "gen_loss", ("student",), decay_after=-1)


def test_learning_rate_anneal_is_linear_to_zero_and_stays_there(tmp_path):
    """anneal: lr (1 - step / anneal), then 0 (the progressive-distillation code's schedule within a halving)."""
    phase = Phase("gen", "gen_loss", ("student",), lr=0.4, anneal=4)
    assert [phase.lr_at(s) for s in range(6)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    assert phase.scheduled
    # with the inverse-square-root decay the two multiply
    both = Phase("gen", "gen_loss", ("student",), lr=0.4, decay_after=2, anneal=4)
    assert both.lr_at(2) == pytest.approx(0.4 / 1.5 ** 0.5 * 0.5)
    assert _learning_rates_seen(phase, tmp_path, iterations=5) == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    with pytest.raises(ValueError, match="anneal"):
        Phase("gen", "gen_loss", ("student",), anneal=-1)


def test_export_puts_the_chosen_named_ema_in_the_generator_slot(tmp_path):
    """`export(ema=name)`: the file samples with that EMA (an averaging length picked after training); the default
    keeps the sampling EMA."""
    module = Regress(ema_decay=0.5)
    module.add_ema("slow", decay=0.9)
    for step in range(1, 4):
        with torch.no_grad():
            module.student.weight.fill_(float(step))
        module.update_ema()
    assert not torch.equal(module.ema.weight, module.ema_slow.weight)
    module.export(str(tmp_path / "slow.pt"), ema="slow")
    module.export(str(tmp_path / "default.pt"))
    assert torch.equal(load_checkpoint(tmp_path / "slow.pt")["state_dict"]["student.weight"], module.ema_slow.weight)
    assert torch.equal(load_checkpoint(tmp_path / "default.pt")["state_dict"]["student.weight"], module.ema.weight)
    with pytest.raises(ValueError, match="no EMA named 'fast'"):
        module.export(str(tmp_path / "x.pt"), ema="fast")
    with pytest.raises(ValueError, match="ema_only=True"):
        module.export(str(tmp_path / "x.pt"), ema_only=False, ema="slow")
