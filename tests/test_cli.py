"""The command line: subcommands, every shipped config parses, `sample` output format."""

from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from lit_fewstep.cli import FewStepCLI, main

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts
                 and "metrics" not in p.parts)


def test_help_lists_subcommands():
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    for sub in ("fit", "validate", "test", "sample", "evaluate", "pairs"):
        assert sub in result.stdout


def _machine_overrides(config: str, tmp_path: Path) -> list[str]:
    """GPU-scale configs name GPUs and a user's CIFAR-10 folder: parse them here on CPU against an empty stub folder
    (the data module checks only that the batch files exist at construction)."""
    import yaml

    cfg = yaml.safe_load((ROOT / config).read_text())
    args = []
    if (cfg.get("trainer") or {}).get("accelerator") == "gpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    if "CIFAR10DataModule" in str((cfg.get("data") or {}).get("class_path")):
        stub = tmp_path / "cifar-10-batches-py"
        stub.mkdir()
        (stub / "data_batch_1").touch()
        (stub / "test_batch").touch()
        args += ["--data.root", str(tmp_path)]
    if "ImageFolderDataModule" in str((cfg.get("data") or {}).get("class_path")):
        from PIL import Image

        (tmp_path / "images" / "class0").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "class0" / "0.png")
        args += ["--data.root", str(tmp_path / "images")]
    return args


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    from lightning.pytorch import LightningDataModule

    from lit_fewstep.cli import FewStepTrainer
    from lit_fewstep.methods.base import FewStepModule

    cli = FewStepCLI(FewStepModule, LightningDataModule, trainer_class=FewStepTrainer, subclass_mode_model=True,
                     subclass_mode_data=True, auto_configure_optimizers=False, run=False,
                     args=["--config", config, "--trainer.logger", "false", *_machine_overrides(config, tmp_path)])
    assert isinstance(cli.model, FewStepModule)
    cli.model.init_config  # every constructor argument is recordable in a checkpoint


def test_print_config_works(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:  # the parser prints the config and exits
        main(["fit", "--config", "configs/edm/tree.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "lit_fewstep.methods.EDMDiffusion" in capsys.readouterr().out


# An unknown config key is named in the error: tests/test_bad_inputs.py::test_unknown_config_key


@pytest.mark.parametrize("asset", ["edm_tree.pt", "fm_digits.pt"])
def test_sample_writes_npz(asset, tmp_path):
    ckpt = ROOT / "lit_fewstep" / "assets" / asset
    out = tmp_path / "s.npz"
    main(["sample", "--ckpt", str(ckpt), "--nfe", "35", "--num", "12", "--seed", "1", "--out", str(out),
          "--class_labels", "1"])
    data = np.load(out)
    assert data["samples"].dtype == np.float32 and data["samples"].shape[0] == 12
    assert data["labels"].dtype == np.int64 and (data["labels"] == 1).all()
    assert int(data["nfe"]) == 35
    if data["samples"].ndim == 4:
        assert data["samples"].min() >= -1.5 and data["samples"].max() <= 1.5
    png = main(["sample", "--ckpt", str(ckpt), "--nfe", "3", "--num", "12", "--out", str(tmp_path / "s.png")])
    assert Path(png).stat().st_size > 1000


def test_sample_grid_option_reaches_the_teacher(tmp_path):
    """`--grid cosine` samples what `module.sample(..., grid="cosine")` does, and not what the Karras grid does."""
    from lit_fewstep.methods.sampling import draw
    from lit_fewstep.utils.checkpoint import load_module

    ckpt = ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"
    args = ["sample", "--ckpt", str(ckpt), "--nfe", "4", "--num", "16", "--solver", "unipc", "--seed", "3"]
    main([*args, "--grid", "cosine", "--out", str(tmp_path / "cosine.npz")])
    main([*args, "--out", str(tmp_path / "karras.npz")])
    cosine, karras = np.load(tmp_path / "cosine.npz"), np.load(tmp_path / "karras.npz")
    expected = draw(load_module(str(ckpt)), 16, 4, 3, solver="unipc", grid="cosine")[0].numpy()
    assert int(cosine["nfe"]) == 4 and np.allclose(cosine["samples"], expected, atol=1e-6)
    assert not np.allclose(cosine["samples"], karras["samples"], atol=1e-3)


def test_shipped_assets_record_no_absolute_paths():
    """A shipped student must find its teacher on any machine: recorded paths are relative to the repository root."""
    import json

    import torch

    from lit_fewstep.utils.checkpoint import FORMAT_KEY

    for asset in sorted((ROOT / "lit_fewstep" / "assets").glob("*.pt")):
        meta = torch.load(asset, map_location="cpu", weights_only=True).get(FORMAT_KEY)
        text = json.dumps(meta, default=str)
        assert '"/' not in text and str(ROOT) not in text, f"{asset.name} records an absolute path"
