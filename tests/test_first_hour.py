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
