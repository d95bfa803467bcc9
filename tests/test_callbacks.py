"""Training callbacks: what reaches TensorBoard, when, and whether the numbers are the ones they claim to be."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_fewstep.data import DigitsDataModule, Toy2DDataModule
from lit_fewstep.evaluation import Evaluator, proportional_labels
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.methods.sampling import draw
from lit_fewstep.metrics import NFESweepCallback, SampleGridCallback, ThroughputCallback
from lit_fewstep.nets import MLP, UNet


def tiny_toy_teacher():
    return EDMDiffusion(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=2), sigma_data=1.062, lr=2e-3,
                        ema_decay=0.9)


def fit(model, data, tmp_path, callbacks, steps=4, **kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        logger=TensorBoardLogger(str(tmp_path), name="tb", version="v"), callbacks=callbacks,
                        **({"limit_val_batches": 0, "num_sanity_val_steps": 0} | kw))
    trainer.fit(model, data)
    return trainer


def events(tmp_path) -> EventAccumulator:
    files = sorted(Path(tmp_path, "tb", "v").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file written"
    acc = EventAccumulator(str(files[-1]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_toy_callbacks_write_scatter_plots_sweep_and_throughput(tmp_path):
    L.seed_everything(0)
    model = tiny_toy_teacher()
    data = Toy2DDataModule(name="tree", batch_size=64, num_train=640)
    sweep = NFESweepCallback(nfe=(1, 2), num=300, every_n_iterations=2, num_reference=600, seed=3)
    throughput = ThroughputCallback()
    trainer = fit(model, data, tmp_path, [SampleGridCallback(every_n_iterations=2, nfe=(1, 2), num=32), sweep,
                                          throughput])
    acc = events(tmp_path)
    tags = acc.Tags()

    # pictures: one per NFE after iterations 2 and 4 (global_step = iteration for a one-phase teacher)
    for nfe in (1, 2):
        assert [e.step for e in acc.Images(f"samples/nfe{nfe}")] == [2, 4]
    # the sweep: every metric of the toy evaluator, at every NFE, at the same two steps
    for name in ("sw2", "mmd", "nll", "precision", "recall"):
        for nfe in (1, 2):
            assert [e.step for e in acc.Scalars(f"val/{name}@{nfe}")] == [2, 4], (name, nfe, tags["scalars"])
    # ... and its last values are the Evaluator's score of the final model's samples, recomputed here
    evaluator = Evaluator(data, num_reference=600, seed=3)
    for nfe in (1, 2):
        x, labels, spent, _ = draw(model, 300, nfe, 3, evaluator.class_labels(model, 300, 3))
        assert torch.bincount(labels).tolist() == (torch.bincount(evaluator.real_labels) / 2).round().long().tolist()
        assert spent == nfe
        for name, value in evaluator.score(x).items():
            logged = acc.Scalars(f"val/{name}@{nfe}")[-1].value
            assert logged == pytest.approx(value, rel=1e-5, abs=1e-6), (name, nfe)
            assert sweep.last[f"val/{name}@{nfe}"] == pytest.approx(value, rel=1e-9, abs=1e-12)
    # throughput: every step logged, samples/s = batch / step time, step time within the fit's wall time
    steps = acc.Scalars("perf/step_time_s")
    rates = acc.Scalars("perf/samples_per_s")
    assert [e.step for e in steps] == [e.step for e in rates] and len(steps) >= 3
    for s, r in zip(steps, rates):
        assert s.value > 0 and r.value == pytest.approx(64 / s.value, rel=1e-5)
    assert trainer.global_step == 4 and int(model.iteration) == 4


def test_image_grid_goes_to_tensorboard_sorted_by_class(tmp_path):
    L.seed_everything(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
               num_classes=10)
    model = EDMDiffusion(net, sigma_data=0.5, lr=1e-3, ema_decay=0.9)
    grid_cb = SampleGridCallback(every_n_iterations=1, nfe=(1,), num=16)
    fit(model, DigitsDataModule(image_size=8, batch_size=32), tmp_path, [grid_cb], steps=2)
    images = events(tmp_path).Images("samples/nfe1")
    assert [e.step for e in images] == [1, 2]
    # 16 images of 8x8 with 1 px padding on a 4x4 grid: 4 * 9 + 1 = 37 px square
    assert (images[-1].width, images[-1].height) == (37, 37)


def test_sweep_on_validation_end_is_monitorable(tmp_path):
    """Without every_n_iterations the sweep runs at validation epoch end and lands in callback_metrics."""
    L.seed_everything(0)
    model = tiny_toy_teacher()
    data = Toy2DDataModule(name="tree", batch_size=64, num_train=128, num_val=64)  # 2 batches per epoch
    sweep = NFESweepCallback(nfe=(1,), num=200, num_reference=400)
    trainer = fit(model, data, tmp_path, [sweep], steps=4, limit_val_batches=1, num_sanity_val_steps=1)
    assert set(sweep.last) == {f"val/{m}@1" for m in ("sw2", "mmd", "nll", "precision", "recall")}
    assert trainer.callback_metrics["val/sw2@1"].item() == pytest.approx(sweep.last["val/sw2@1"], rel=1e-6)
    assert len(events(tmp_path).Scalars("val/sw2@1")) == 2  # epochs 0 and 1, sanity check skipped


@pytest.mark.parametrize("bad", [{"nfe": []}, {"nfe": [0]}, {"every_n_iterations": 0}, {"num": 1.5}])
def test_constructor_arguments_are_checked(bad):
    with pytest.raises(ValueError, match="NFESweepCallback"):
        NFESweepCallback(**bad)


def test_callbacks_build_from_yaml(repo_root):
    """The teacher configs list the callbacks by class_path; they must build with the configured values."""
    import yaml

    from lit_fewstep.utils.config import instantiate

    for config in ("configs/edm/tree.yaml", "configs/flow_matching/digits.yaml"):
        callbacks = yaml.safe_load((repo_root / config).read_text())["trainer"]["callbacks"]
        built = [instantiate(c) for c in callbacks if c["class_path"].startswith("lit_fewstep.")]
        assert {type(c) for c in built} == {SampleGridCallback, NFESweepCallback, ThroughputCallback}, config


def test_proportional_labels_are_the_closest_counts_shuffled_by_seed():
    """Counts floor(num p_c) plus the leftovers to the largest remainders: the closest integers to num p_c
    summing to num; the order is a permutation fixed by the seed."""
    reference = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)  # p = 0.6, 0.3, 0.1
    assert torch.bincount(proportional_labels(reference, 7, 0), minlength=3).tolist() == [4, 2, 1]  # 4.2 2.1 0.7
    assert torch.bincount(proportional_labels(reference, 4, 0), minlength=3).tolist() == [3, 1, 0]  # 2.4 1.2 0.4
    tie = torch.tensor([0, 1])
    assert torch.bincount(proportional_labels(tie, 3, 0)).tolist() == [2, 1]  # 1.5 / 1.5: the tie to class 0
    a, b = proportional_labels(reference, 1000, 1), proportional_labels(reference, 1000, 1)
    assert torch.equal(a, b) and not torch.equal(a, proportional_labels(reference, 1000, 2))
    assert torch.equal(a.sort().values, proportional_labels(reference, 1000, 2).sort().values)
    assert (a[:500] == 0).sum().item() not in (0, 500)  # shuffled, not sorted by class


def test_evaluator_labels_follow_the_reference_only_for_class_conditional_models():
    data = Toy2DDataModule(name="tree", batch_size=64, num_train=128)
    evaluator = Evaluator(data, num_reference=1000, seed=0)
    conditional, unconditional = tiny_toy_teacher(), EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8))
    counts = torch.bincount(evaluator.real_labels, minlength=2)
    labels = evaluator.class_labels(conditional, 500, seed=0)
    assert ((torch.bincount(labels, minlength=2) - counts * 500 / 1000).abs() < 1).all() and len(labels) == 500
    assert evaluator.class_labels(unconditional, 500, seed=0) is None
    assert evaluator.class_labels(conditional, 500, seed=0, draw="uniform") is None  # the model's own draws
    with pytest.raises(ValueError, match="class labels: unknown draw"):
        evaluator.class_labels(conditional, 500, seed=0, draw="balanced")
    ten_classes = EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8, num_classes=10))
    assert evaluator.class_labels(ten_classes, 10, seed=0).max() <= 1  # a model with more classes: the data's only
    one_class = EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8, num_classes=1))
    with pytest.raises(ValueError, match="has class 1 but the model takes 1 classes"):
        evaluator.class_labels(one_class, 10, seed=0)
