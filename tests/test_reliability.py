"""Nothing a user trained is lost: exact resume, preemption, atomic saves, NaN guard."""

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import StopAtIteration
from lit_fewstep.cli import FewStepTrainer
from lit_fewstep.data import Toy2DDataModule
from conformance_methods import build
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.methods.base import NonFiniteError
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import atomic_save, load_checkpoint

def _edm():
    """The conformance suite's tiny EDM teacher (tests/conformance_methods.py)."""
    return build("edm")


def _data():
    # 10 batches per epoch: resuming at iteration 5 is mid-epoch
    return Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=320, num_val=64)


def _trainer(root, steps, callbacks=(), **kw):
    return FewStepTrainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                          check_val_every_n_epoch=1, limit_val_batches=1, callbacks=list(callbacks), **kw)


def _fit(factory, root, iterations, ckpt_path=None, callbacks=()):
    L.seed_everything(0)
    module = factory()
    ckpts = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _trainer(root, -1, [ckpts, StopAtIteration(iterations), *callbacks]).fit(module, _data(), ckpt_path=ckpt_path)
    return module


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


# Bit-exact resume of every method, cut inside epoch 0, at the epoch boundary and inside epoch 1:
# tests/test_conformance.py.


class _SigtermAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if int(pl_module.iteration) == self.iteration:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_and_resume_is_exact(tmp_path):
    factory = _edm
    full = _fit(factory, tmp_path / "full", 9)
    with pytest.raises(SystemExit):
        _fit(factory, tmp_path / "cut", 9, callbacks=[_SigtermAt(4)])
    preempted = tmp_path / "cut" / "ckpts" / "preempted.ckpt"
    assert preempted.is_file()
    assert load_checkpoint(preempted)["state_dict"]["iteration"] == 5  # saved after the interrupted batch
    module = factory()
    _trainer(tmp_path / "cut", -1, [StopAtIteration(9)]).fit(module, _data(), ckpt_path=preempted)
    _assert_same_state(full, module)


# SLURM requeue (SIGUSR1 -> hpc checkpoint -> scontrol requeue -> rerun resumes): tests/test_slurm.py


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)

    def dying_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# A NaN loss in each phase of every method stops naming the phase: tests/test_conformance.py.


def test_nonfinite_skip_still_ends_at_max_steps(tmp_path):
    """A skipped step counts as a scheduled optimizer step: the run ends at max_steps, not never."""
    module = EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8), sigma_data=1.4, nonfinite="skip")
    module.denoising_loss = lambda batch, generator=None: torch.tensor(float("nan"), requires_grad=True)
    before = [p.detach().clone() for p in module.parameters()]
    # max_epochs bounds the run in case max_steps is never reached (it was not, before the fix: 20 iterations)
    _trainer(tmp_path, 4, enable_checkpointing=False, max_epochs=2).fit(module, _data())
    assert int(module.iteration) == 4 and int(module.skipped_steps) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # nothing was learned from NaN


def test_nonfinite_skip_stops_after_consecutive_skips_and_says_what_is_saved(tmp_path):
    module = EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8), sigma_data=1.4, nonfinite="skip",
                          max_consecutive_skips=4)
    module.denoising_loss = lambda batch, generator=None: torch.tensor(float("inf"), requires_grad=True)
    with pytest.raises(NonFiniteError, match=r"4 iterations in a row \(up to iteration 3\).*no checkpoint has been "
                                             r"written in this run yet.*max_consecutive_skips"):
        _trainer(tmp_path, -1, enable_checkpointing=False, max_epochs=1).fit(module, _data())


def test_nonfinite_stop_names_the_checkpoint_that_exists(tmp_path):
    module = _edm()
    loss = module.denoising_loss
    module.denoising_loss = lambda batch, generator=None: (
        loss(batch) if int(module.iteration) < 3 else torch.tensor(float("nan"), requires_grad=True))
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_last=True)
    with pytest.raises(NonFiniteError, match=r"at iteration 3 .*Stopped; the last checkpoint written is .*last\.ckpt"):
        _trainer(tmp_path, 10, [ckpts]).fit(module, _data())
    assert int(load_checkpoint(tmp_path / "ckpts" / "last.ckpt")["state_dict"]["iteration"]) == 2


def test_stale_temporaries_are_removed_and_checkpoints_follow_the_umask(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    stale = folder / ".last.ckpt.k2_x9a0b.tmp"  # what a kill -9 during atomic_save leaves
    stale.write_bytes(b"x" * 100)
    keep = [folder / "notes.tmp", folder / ".hidden.tmp", folder / "last.ckpt.tmp"]  # not our pattern: kept
    for path in keep:
        path.write_bytes(b"user file")
    ckpts = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True)
    old = os.umask(0o027)
    try:
        _trainer(tmp_path, 2, [ckpts]).fit(_edm(), _data())
    finally:
        os.umask(old)
    assert not stale.exists() and all(p.exists() for p in keep)
    assert (folder / "last.ckpt").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_resume_is_bit_exact_with_dropout(tmp_path):
    """Dropout draws from torch's global RNG, which a checkpoint does not hold: each iteration runs on a global
    RNG keyed by (seed, iteration, rank). A DMD2 whose generator and fake score inherit the teacher's dropout."""
    from conformance_methods import teacher_path

    from lit_fewstep.methods import DMD2

    def factory():
        return DMD2(teacher_path(dropout=0.3), generator_sigmas=(80.0, 1.0), generator_every=3, lr=1e-3,
                    ema_decay=0.9)

    full = _fit(factory, tmp_path / "full", 9)
    _fit(factory, tmp_path / "cut", 5)
    L.seed_everything(123)
    module = factory()
    path = next(p for p in sorted((tmp_path / "cut" / "ckpts").glob("step=*.ckpt"))
                if int(load_checkpoint(p)["state_dict"]["iteration"]) == 5)
    _trainer(tmp_path / "cut", -1, [StopAtIteration(9)]).fit(module, _data(), ckpt_path=path)
    _assert_same_state(full, module)
    assert module.G.net.blocks[0].drop.p == 0.3  # the trained networks do use dropout
