"""What a Lightning user takes for granted: the finished run is in last.ckpt, the method's hyper-parameters are
recorded."""

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint


def test_last_checkpoint_holds_the_end_of_fit_and_hparams_record_the_method(tmp_path):
    module = EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8), sigma_data=1.4, lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=4, save_last=True)
    logger = TensorBoardLogger(tmp_path, name="run", version="v")
    L.Trainer(accelerator="cpu", max_steps=10, logger=logger, callbacks=[ckpt], enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(
        module, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=320))
    # 10 steps with saves every 4: the periodic save stopped at 8; the end of fit is saved too
    assert int(load_checkpoint(tmp_path / "ckpts" / "last.ckpt")["state_dict"]["iteration"]) == 10
    hparams = yaml.safe_load((tmp_path / "run" / "v" / "hparams.yaml").read_text())
    assert hparams["model"]["class_path"] == "lit_fewstep.methods.diffusion.EDMDiffusion"
    assert hparams["model"]["init_args"]["lr"] == 3e-3 and hparams["model"]["init_args"]["sigma_data"] == 1.4
    assert hparams["name"] == "eight_gaussians"  # the data module's are still there


def test_a_subclass_without_init_exports_reloads_and_samples(tmp_path, monkeypatch):
    """The design card's "subclassing modules for new methods": a DMD2 variant that only overrides a loss."""
    import sys

    import torch

    from lit_fewstep.methods import DMD2
    from lit_fewstep.utils.checkpoint import load_module

    source = tmp_path / "mylab_hinge.py"
    source.write_text(
        "import torch.nn.functional as F\n"
        "from lit_fewstep.methods import DMD2\n\n"
        "class HingeDMD2(DMD2):\n"
        "    def gan_generator_loss(self, x, y):\n"
        "        return -self.gan_logits(x, y).mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylab_hinge

    teacher = tmp_path / "teacher.pt"
    EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=8), sigma_data=1.4).export(str(teacher))
    model = mylab_hinge.HingeDMD2(str(teacher), generator_sigmas=(80.0, 1.0), generator_every=2, lr=1e-3)
    assert model.init_config["class_path"] == "mylab_hinge.HingeDMD2"
    assert model.init_config["init_args"]["generator_sigmas"] == [80.0, 1.0]  # a non-required argument survives
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(
        model, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=320))
    model.export(str(tmp_path / "hinge.pt"))
    loaded = load_module(tmp_path / "hinge.pt", allow_modules=["mylab_hinge"])
    assert type(loaded) is mylab_hinge.HingeDMD2 and isinstance(loaded, DMD2)
    assert loaded.generator_sigmas == (80.0, 1.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.sample(8, 2, generator=g()).x, model.sample(8, 2, generator=g()).x)
    sys.modules.pop("mylab_hinge", None)
