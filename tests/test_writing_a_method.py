"""README "Writing a method": its code block, run as written, gives a method that fits, samples, exports,
reloads and resumes bit-exactly (the worked example is documentation that cannot rot)."""

import re
import sys
import types

import lightning as L
import pytest
import torch

from conftest import ROOT, StopAtIteration
from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module

TEACHER = str(ROOT / "lit_fewstep" / "assets" / "edm_tree.pt")


@pytest.fixture(scope="module")
def readme_example():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_example")
    sys.modules["readme_example"] = module
    exec(compile(code, "README.md", "exec"), module.__dict__)
    yield module
    sys.modules.pop("readme_example", None)


def _method(example):
    # the shipped tree teacher's architecture (MLP 128 x 3, 2 classes), so the student starts from its weights
    net = MLP(dim=2, hidden=128, depth=3, emb_dim=64, num_classes=2)
    return example.KnowledgeDistillation(net, TEACHER, sigma_data=1.062, teacher_nfe=5, lr=1e-3, ema_decay=0.9)


def _data():
    return Toy2DDataModule(name="tree", batch_size=64, num_train=640, num_val=64)  # 10 batches per epoch


def _fit(example, root, iterations, ckpt_path=None, every_step=False):
    L.seed_everything(0)
    module = _method(example)
    callbacks = [StopAtIteration(iterations)]
    if every_step:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "c", every_n_train_steps=1,
                                                             save_top_k=-1, filename="{step}"))
    L.Trainer(accelerator="cpu", max_steps=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=root, limit_val_batches=0, callbacks=callbacks).fit(module, _data(), ckpt_path=ckpt_path)
    return module


def _teacher_gap(module, n=512):
    """Mean squared distance of the student's one-step samples to its regression target: the teacher's ODE solution
    (with the method's teacher_nfe) from the same noise."""
    g = torch.Generator().manual_seed(7)
    z, labels = torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g)
    with torch.no_grad():
        student = module.one_step(module.sampling_network(True), z, labels)
        target = _teacher_solution(module, module.frozen_network("teacher"), z, labels)
    return float((student - target).pow(2).mean())


def _teacher_solution(module, teacher, z, labels):
    from lit_fewstep.diffusion.solvers import sample_edm_heun

    return sample_edm_heun(lambda x_t, t: teacher.x0_from(x_t, t, module.edm, class_labels=labels), z,
                           module.teacher_nfe)


def test_the_readme_method_fits_samples_exports_and_resumes(readme_example, tmp_path):
    fresh = _method(readme_example)
    fresh.setup("fit")  # starts from the teacher's weights, as at the start of a fit
    before = _teacher_gap(fresh)
    trained = _fit(readme_example, tmp_path / "full", 30)
    assert _teacher_gap(trained) < 0.5 * before  # it learned its objective

    out = trained.sample(16, 1, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 1 and torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="at most 1 evaluations"):
        trained.sample(4, 2)

    path = tmp_path / "student.pt"
    trained.export(str(path))
    assert not any(k.startswith("teacher.") for k in load_checkpoint(path)["state_dict"])
    reloaded = load_module(path, allow_modules=["readme_example"])  # the constructor runs again: no teacher load
    again = reloaded.sample(16, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x, out.x)

    _fit(readme_example, tmp_path / "cut", 15, every_step=True)
    ckpt = next(p for p in sorted((tmp_path / "cut" / "c").glob("*.ckpt"))
                if int(load_checkpoint(p)["state_dict"]["iteration"]) == 15)  # inside the second epoch
    resumed = _fit(readme_example, tmp_path / "resumed", 30, ckpt_path=ckpt)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert not resumed.teacher.training  # the frozen teacher stayed in eval mode through fit and sampling
