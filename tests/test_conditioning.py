"""Conditioning as one structure: batches of every shape split into (x, Conditioning), per-sample guidance and
the other fields reach sample(), and nothing is silently dropped."""

import pytest
import torch

from conftest import ROOT
from lit_fewstep.conditioning import Conditioning, split_batch
from lit_fewstep.utils.checkpoint import load_module

TEACHER = ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"


def test_split_batch_shapes():
    x, y = torch.zeros(4, 2), torch.arange(4)
    assert split_batch(x)[1] == Conditioning()
    assert torch.equal(split_batch((x, y))[1].class_labels, y)
    s = torch.rand(4)
    cond = split_batch((x, {"class_labels": y, "s": s}))[1]
    assert torch.equal(cond.s, s) and torch.equal(cond.class_labels, y)
    with pytest.raises(ValueError, match=r"unknown conditioning field\(s\) \['t2'\]"):
        split_batch((x, {"t2": s}))
    with pytest.raises(ValueError, match="one entry per sample"):
        Conditioning(class_labels=y, s=torch.rand(3))
    with pytest.raises(ValueError, match="class_labels must be integers"):
        Conditioning(class_labels=torch.rand(4))


def test_select_cat_round_trip():
    cond = Conditioning(class_labels=torch.arange(6), guidance_scale=torch.linspace(1, 3, 6))
    halves = cond.select(slice(0, 3)).cat(cond.select(slice(3, 6)))
    assert torch.equal(halves.class_labels, cond.class_labels) and torch.equal(halves.guidance_scale, cond.guidance_scale)


def test_sample_takes_conditioning():
    teacher = load_module(TEACHER)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    labels = torch.tensor([0, 1, 1, 0])
    a = teacher.sample(4, 5, class_labels=labels, generator=g(), guidance_scale=2.0)
    b = teacher.sample(4, 5, generator=g(), cond=Conditioning(class_labels=labels))
    assert not torch.equal(a.x, b.x)  # guided vs not
    c = teacher.sample(4, 5, generator=g(), cond=Conditioning(class_labels=labels), guidance_scale=2.0)
    assert torch.equal(a.x, c.x) and torch.equal(c.labels, labels)
    with pytest.raises(ValueError, match="given both as an argument and in cond"):
        teacher.sample(4, 5, class_labels=labels, cond=Conditioning(class_labels=labels))
    with pytest.raises(ValueError, match="conditioning for 4 samples, but n = 3"):
        teacher.sample(3, 5, cond=Conditioning(class_labels=labels))
    # a field the method cannot use is refused, not dropped
    with pytest.raises(ValueError, match=r"^cond: EDMDiffusion takes no 'cond' option"):
        teacher.sample(4, 5, cond=Conditioning(class_labels=labels, s=torch.zeros(4)))


def test_network_inputs_use_the_networks_keywords():
    from lit_fewstep.nets import MLP

    net = MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=3, guidance_embed=True, extra_channels=4)
    cond = Conditioning(class_labels=torch.tensor([0, 2]), guidance_scale=torch.tensor([1.0, 3.0]),
                        low_res=torch.ones(2, 2), self_cond=torch.zeros(2, 2))
    inputs = cond.network_inputs()
    assert sorted(inputs) == ["class_labels", "extra", "guidance"]
    assert torch.equal(inputs["extra"], torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    out = net(torch.zeros(2, 2), torch.zeros(2), **inputs)
    assert out.shape == (2, 2)


def test_per_sample_guidance_scales_equal_each_sample_alone():
    """One batch with guidance scales [1, 2, 3] per sample gives what three runs at each scalar scale give."""
    teacher = load_module(TEACHER)
    labels, scales = torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 3.0])
    noise_seed = 0
    batch = teacher.sample(3, 6, generator=torch.Generator().manual_seed(noise_seed),
                           cond=Conditioning(class_labels=labels, guidance_scale=scales))
    assert batch.nfe == 12  # guided samples cost two evaluations per step
    for i, scale in enumerate(scales.tolist()):
        alone = teacher.sample(3, 6, class_labels=labels, generator=torch.Generator().manual_seed(noise_seed),
                               guidance_scale=scale)
        torch.testing.assert_close(batch.x[i], alone.x[i], rtol=1e-5, atol=1e-5)


def test_sample_command_takes_one_guidance_scale_per_sample(tmp_path):
    import numpy as np

    from lit_fewstep.cli import main

    common = ["sample", "--ckpt", str(TEACHER), "--nfe", "4", "--num", "3", "--class_labels", "0", "1", "1"]
    main([*common, "--guidance_scale", "1", "2", "3", "--out", str(tmp_path / "per.npz")])
    per = np.load(tmp_path / "per.npz")
    assert int(per["nfe"]) == 8
    for i, scale in enumerate(["1", "2", "3"]):
        main([*common, "--guidance_scale", scale, "--out", str(tmp_path / f"s{i}.npz")])
        np.testing.assert_allclose(per["samples"][i], np.load(tmp_path / f"s{i}.npz")["samples"][i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^--guidance_scale: one value or --num=3 values, got 2"):
        main([*common, "--guidance_scale", "1", "2", "--out", str(tmp_path / "bad.npz")])
