"""Teachers and the FewStepModule machinery they share: training, EMA, sampling API, export/load."""

import lightning as L
import pytest
import torch

from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import EDMDiffusion, FlowMatching
from lit_fewstep.methods.base import Phase
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module


def tiny_trainer(steps: int, tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def tiny_teacher(cls=EDMDiffusion, num_classes=8, **kw):
    return cls(MLP(dim=2, hidden=64, depth=2, emb_dim=32, num_classes=num_classes), sigma_data=1.422, lr=2e-3, **kw)


@pytest.mark.parametrize("cls", [EDMDiffusion, FlowMatching])
def test_training_runs_schedule_and_ema(cls, tmp_path):
    L.seed_everything(0)
    model = tiny_teacher(cls, ema_decay=0.9)
    before = [p.clone() for p in model.ema.parameters()]
    data = Toy2DDataModule(name="eight_gaussians", batch_size=64, num_train=640)
    tiny_trainer(5, tmp_path).fit(model, data)
    assert int(model.iteration) == 5
    # EMA moved, and is a convex combination: never past the live weights from the start point
    moved = [not torch.equal(a, p) for a, p in zip(before, model.ema.parameters())]
    assert all(moved)
    for p0, pe, p in zip(before, model.ema.parameters(), model.model.parameters()):
        assert torch.all((pe - p0).abs() <= (p - p0).abs() + (p - pe).abs() + 1e-6)


def test_teacher_learns_the_denoiser(tmp_path):
    """A few hundred steps cut the fixed-noise validation loss well below the untrained model's."""
    L.seed_everything(0)
    data = Toy2DDataModule(name="eight_gaussians", batch_size=256, num_train=4096)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    model = tiny_teacher(ema_decay=0.0)
    model.eval()

    def val_loss():
        with torch.no_grad():
            return model.denoising_loss(batch, generator=torch.Generator().manual_seed(0)).item()

    untrained = val_loss()
    model.train()
    tiny_trainer(300, tmp_path).fit(model, data)
    model.eval()
    assert val_loss() < 0.6 * untrained


# Unguided sampling spends exactly the requested NFE: tests/test_conformance.py.
@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_guidance_doubles_the_nfe(nfe):
    model = tiny_teacher()
    guided = model.sample(16, nfe, generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert guided.x.shape == (16, 2) and guided.nfe == 2 * nfe


def test_sample_is_seeded_and_labels_respected():
    model = tiny_teacher()
    a = model.sample(8, 3, class_labels=torch.arange(8), generator=torch.Generator().manual_seed(1))
    b = model.sample(8, 3, class_labels=torch.arange(8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, torch.arange(8))


def test_sample_rejects_bad_class_labels():  # bad NFE: tests/test_conformance.py
    model = tiny_teacher()
    with pytest.raises(ValueError, match=r"class_labels: labels must be in \[0, 7\]"):
        model.sample(2, 1, class_labels=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="class_labels: this model is unconditional"):
        tiny_teacher(num_classes=0).sample(2, 1, class_labels=torch.tensor([0, 1]))


def test_export_holds_config_and_weights_only(tmp_path):  # identical samples after reload: tests/test_conformance.py
    model = tiny_teacher(FlowMatching)
    path = tmp_path / "teacher.pt"
    model.export(str(path))
    loaded = load_module(path)
    assert type(loaded) is FlowMatching and loaded.sigma_data == model.sigma_data
    ckpt = load_checkpoint(path)  # weights_only=True
    assert set(ckpt) == {"lit_fewstep", "state_dict"}


def test_pickle_checkpoint_refused_without_opt_in(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(x=1)}, path)  # an arbitrary Python object
    assert load_checkpoint(path, trust=True)["payload"].x == 1
    with pytest.raises(ValueError, match="contains pickled Python objects and was refused.*--trust_checkpoint true"):
        load_checkpoint(path)


def test_corrupted_and_missing_checkpoints_are_named(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"teacher_ckpt: .*bad.ckpt' is not a readable checkpoint"):
        load_checkpoint(bad, field="teacher_ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt: checkpoint '.*nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_phase_schedule_rules():
    p = Phase("critic", "loss", ("net",), every=5, start=2)
    assert [k for k in range(15) if p.active(k)] == [2, 7, 12]
    with pytest.raises(ValueError, match="schedule: phase 'g' needs every >= 1"):
        Phase("g", "loss", ("net",), every=0)


def test_shape_mismatch_between_net_and_data_is_named(tmp_path):
    from lit_fewstep.data import DigitsDataModule

    model = tiny_teacher(num_classes=10)
    with pytest.raises(ValueError, match=r"model: network input shape \(2,\) does not match data shape \(1, 8, 8\)"):
        tiny_trainer(1, tmp_path).fit(model, DigitsDataModule(image_size=8, batch_size=8))
