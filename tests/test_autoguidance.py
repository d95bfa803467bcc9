"""Autoguidance end to end: `sample(guide=...)` and `sample --guide PATH` on the teachers, NFE counting both
networks, the guide's identity (scale 1 = the model alone; a guide equal to the model = no change)."""

import numpy as np
import pytest
import torch

from conftest import ROOT
from lit_fewstep.cli import main
from lit_fewstep.methods import EDMDiffusion, FlowMatching
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_module

TEACHER = ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"


def _g():
    return torch.Generator().manual_seed(0)


def _randomized(module):
    """Untrained nets start with a zero output layer (every model the same denoiser): give them random weights."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    module.init_ema()
    return module


@pytest.mark.parametrize("cls", [EDMDiffusion, FlowMatching])
def test_autoguidance_identities_and_nfe(cls):
    torch.manual_seed(0)
    model = _randomized(cls(MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=2), sigma_data=1.0))
    guide = _randomized(cls(MLP(dim=2, hidden=8, depth=1, emb_dim=8, num_classes=2), sigma_data=1.0))
    labels = torch.tensor([0, 1, 1, 0])
    plain = model.sample(4, 5, class_labels=labels, generator=_g())
    at_one = model.sample(4, 5, class_labels=labels, generator=_g(), guide=guide, guidance_scale=1.0)
    assert torch.equal(plain.x, at_one.x) and at_one.nfe == 5  # scale 1: the model alone, one evaluation per step
    guided = model.sample(4, 5, class_labels=labels, generator=_g(), guide=guide, guidance_scale=2.5)
    assert guided.nfe == 10 and not torch.allclose(guided.x, plain.x)
    # a guide equal to the model changes nothing at any scale: D_w + s (D - D_w) = D
    self_guided = model.sample(4, 5, class_labels=labels, generator=_g(), guide=model, guidance_scale=2.5)
    torch.testing.assert_close(self_guided.x, plain.x)


def test_autoguidance_of_an_unconditional_model():
    torch.manual_seed(0)
    model = _randomized(EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8), sigma_data=1.0))
    guide = _randomized(EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data=1.0))
    plain = model.sample(4, 3, generator=_g())
    out = model.sample(4, 3, generator=_g(), guide=guide, guidance_scale=2.0)
    assert out.nfe == 6 and torch.isfinite(out.x).all() and not torch.allclose(out.x, plain.x)
    # without class labels too, a guide equal to the model changes nothing: D_w + s (D - D_w) = D
    torch.testing.assert_close(model.sample(4, 3, generator=_g(), guide=model, guidance_scale=2.0).x, plain.x)


def test_guide_of_another_task_is_refused():
    teacher = load_module(TEACHER)
    wrong = EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8, num_classes=5), sigma_data=1.0)
    with pytest.raises(ValueError, match=r"^guide: the guide has num_classes=5 but the model 2"):
        teacher.sample(4, 3, guide=wrong, guidance_scale=2.0)


def test_sample_command_takes_a_guide(tmp_path):
    guide_path = tmp_path / "guide.pt"
    torch.manual_seed(1)
    _randomized(EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=2), sigma_data=1.062)).export(
        str(guide_path))
    common = ["sample", "--ckpt", str(TEACHER), "--nfe", "6", "--num", "16", "--class_labels", "0"]
    main([*common, "--out", str(tmp_path / "plain.npz")])
    main([*common, "--guide", str(guide_path), "--guidance_scale", "2", "--out", str(tmp_path / "auto.npz")])
    plain, auto = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "auto.npz")
    assert int(plain["nfe"]) == 6 and int(auto["nfe"]) == 12
    assert not np.allclose(plain["samples"], auto["samples"])
    with pytest.raises(FileNotFoundError, match=r"^--guide: checkpoint .* does not exist"):
        main([*common, "--guide", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.npz")])


def test_sample_grid_callback_draws_with_the_guide(tmp_path):
    from lit_fewstep.callbacks import SampleGridCallback

    guide_path = tmp_path / "guide.pt"
    guide = _randomized(EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8, num_classes=2), sigma_data=1.062))
    guide.export(str(guide_path))
    callback = SampleGridCallback(nfe=(3,), num=8, guidance_scale=2.0, guide=str(guide_path))
    teacher = load_module(TEACHER)
    options = callback.sample_options(teacher)
    assert options["guidance_scale"] == 2.0 and callback.sample_options(teacher)["guide"] is options["guide"]  # once
    guided = teacher.sample(8, 3, generator=_g(), **options)
    assert guided.nfe == 6
    with pytest.raises(ValueError, match="give the autoguidance scale with guide"):
        SampleGridCallback(guide=str(guide_path))
