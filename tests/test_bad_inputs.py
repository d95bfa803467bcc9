"""Bad input fails at the edge with one line naming the field and the fix (never a trace from deep in torch)."""

import lightning as L
import pytest
import torch

from conftest import ROOT
from lit_fewstep.cli import main
from lit_fewstep.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, Toy2DDataModule
from lit_fewstep.data.images import _OfflineDataModule, _TensorPairDataset
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.methods.base import Phase, load_teacher
from lit_fewstep.nets import MLP, UNet
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module

TEACHER = str(ROOT / "lit_fewstep" / "assets" / "edm_digits.pt")


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def _fit(module, data, tmp_path):
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)


def _toy_teacher(num_classes=8, dim=2):
    return EDMDiffusion(MLP(dim=dim, hidden=16, depth=1, emb_dim=8, num_classes=num_classes), sigma_data=1.4)


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_teacher(str(tmp_path / "teacher.pt"))
    assert _one_line(err.value).startswith("teacher_ckpt: checkpoint ") and "does not exist" in str(err.value)


def test_teacher_checkpoint_that_is_not_lit_fewstep(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError, match=r"^teacher_ckpt: .* is not a lit_fewstep checkpoint") as err:
        load_teacher(str(path))
    _one_line(err.value)


def test_corrupted_checkpoint_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(open(TEACHER, "rb").read()[:5000])  # truncated copy of a real checkpoint
    with pytest.raises(ValueError, match=r"^ckpt: .* is not a readable checkpoint \(truncated or corrupted") as err:
        load_module(path)
    _one_line(err.value)


def test_pickle_checkpoint_names_the_opt_in(tmp_path):
    import argparse

    path = tmp_path / "pickled.ckpt"
    torch.save({"args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="refused .*--trust_checkpoint true"):
        load_checkpoint(path)


def test_checkpoint_naming_foreign_class_is_refused(tmp_path):
    path = tmp_path / "foreign_class.pt"
    torch.save({"lit_fewstep": {"config": {"class_path": "os.system", "init_args": {}}}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"class_path 'os.system', which was refused: it is outside lit_fewstep; if you "
                                         r"trust the package that defines it, allow it with --allow_module os"):
        load_module(path)


def test_checkpoint_that_does_not_match_its_module(tmp_path):
    module = _toy_teacher()
    module.export(str(tmp_path / "m.pt"))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["state_dict"].pop(next(k for k in ckpt["state_dict"] if k.startswith("model.")))
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"does not match the module it describes \(missing \["):
        load_module(tmp_path / "broken.pt")


# --- network vs data -------------------------------------------------------------------------------------------
def test_network_shape_differs_from_data(tmp_path):
    net = UNet(img_resolution=16, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), num_classes=10)
    with pytest.raises(ValueError, match=r"^model: network input shape \(1, 16, 16\) does not match data shape \(1, 8, 8\)"):
        _fit(EDMDiffusion(net), DigitsDataModule(image_size=8, batch_size=16), tmp_path)


def test_network_channels_differ_from_data(tmp_path):
    net = UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), num_classes=10)
    with pytest.raises(ValueError, match=r"network input shape \(3, 8, 8\) does not match data shape \(1, 8, 8\)"):
        _fit(EDMDiffusion(net), DigitsDataModule(image_size=8, batch_size=16), tmp_path)


def test_class_count_differs_from_data(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=3 but the data has 8 classes; set the network's num_classes to 8"):
        _fit(_toy_teacher(num_classes=3), Toy2DDataModule(name="eight_gaussians", batch_size=16, num_train=64), tmp_path)


class _UnlabelledToy(_OfflineDataModule):
    data_shape, num_classes, is_image, sigma_data = (2,), 0, False, 1.0

    def __init__(self, batch_size: int = 8):
        super().__init__(batch_size, 0, 0)

    def _build_datasets(self):
        x = torch.randn(64, 2)
        return _TensorPairDataset(x, torch.zeros(64, dtype=torch.long)), _TensorPairDataset(x, torch.zeros(64, dtype=torch.long))


def test_conditional_model_with_unlabelled_data(tmp_path):
    with pytest.raises(ValueError, match="class-conditional network but the data has no labels"):
        _fit(_toy_teacher(num_classes=8), _UnlabelledToy(), tmp_path)


class _Uint8Digits(DigitsDataModule):
    def _build_datasets(self):
        train, val = super()._build_datasets()
        return _TensorPairDataset((train.x + 1) * 127.5, train.y), val


def test_images_outside_minus_one_one(tmp_path):
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), num_classes=10)
    with pytest.raises(ValueError, match=r"^data: images must be scaled to \[-1, 1\].*x / 127.5 - 1"):
        _fit(EDMDiffusion(net), _Uint8Digits(image_size=8, batch_size=16), tmp_path)


# --- sampling --------------------------------------------------------------------------------------------------
def test_unknown_class_label():
    with pytest.raises(ValueError, match=r"^class_labels: labels must be in \[0, 7\], got \[9\]"):
        _toy_teacher().sample(1, 2, class_labels=torch.tensor([9]))


def test_class_label_for_unconditional_model():
    with pytest.raises(ValueError, match="class_labels: this model is unconditional; drop --class_labels"):
        _toy_teacher(num_classes=0).sample(1, 2, class_labels=torch.tensor([0]))


def test_nfe_below_one():
    with pytest.raises(ValueError, match=r"^nfe: must be an integer >= 1, got 0"):
        _toy_teacher().sample(2, 0)


def test_nfe_above_method_limit():
    model = _toy_teacher()
    model.max_nfe = 4  # as a 4-step generator declares
    with pytest.raises(ValueError, match=r"^nfe: EDMDiffusion samples with at most 4 evaluations, got 8"):
        model.sample(2, 8)


def test_sample_cli_label_count(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", TEACHER, "--nfe", "1", "--num", "4", "--out", "x.npz", "--class_labels", "1", "2"])
    assert "--class_labels takes one label or --num=4 labels, got 2" in capsys.readouterr().err


def test_sample_cli_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^ckpt: checkpoint '.*nothing.pt' does not exist"):
        main(["sample", "--ckpt", str(tmp_path / "nothing.pt"), "--nfe", "1", "--out", str(tmp_path / "x.npz")])


# --- schedules and settings -------------------------------------------------------------------------------------
def test_impossible_schedule():
    with pytest.raises(ValueError, match=r"^schedule: phase 'generator' needs every >= 1, repeats >= 1"):
        Phase("generator", "generator_loss", ("generator",), every=5, repeats=0)


def test_ema_decay_out_of_range():
    with pytest.raises(ValueError, match=r"^ema_decay: must be in \[0, 1\), got 1.5"):
        EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), ema_decay=1.5)


def test_unknown_nonfinite_policy():
    with pytest.raises(ValueError, match=r"^nonfinite: must be 'stop' or 'skip', got 'ignore'"):
        EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), nonfinite="ignore")


# --- data ----------------------------------------------------------------------------------------------------------
def test_missing_cifar_root(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CIFAR10DataModule(root=str(tmp_path / "cifar")).setup("fit")
    text = _one_line(err.value)
    assert text.startswith("data.root:") and "never downloaded" in text


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataModule(root=str(tmp_path / "imgs")).setup("fit")
    assert _one_line(err.value).startswith("data.root:")


def test_unknown_toy_name():
    with pytest.raises(ValueError) as err:
        Toy2DDataModule(name="swissroll")
    assert "swissroll" in _one_line(err.value) and "tree" in str(err.value)


def test_batch_size_below_one():
    with pytest.raises(ValueError, match=r"^data.batch_size: 0 is not allowed; set it to an integer >= 1"):
        DigitsDataModule(batch_size=0)


def test_unknown_config_key(capsys, monkeypatch):
    from lit_fewstep.__main__ import console

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:  # the parser's own exit (status 2), before any work
        console(["fit", "--config", "configs/edm/tree.yaml", "--model.init_args.sigma_dta", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "sigma_dta" in err
    assert "Traceback" not in err


# --- issue "security and exact resume", low items: one clear line each ------------------------------------------
def test_empty_checkpoint_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.touch()
    with pytest.raises(ValueError, match=r"^ckpt: .*empty.ckpt' is empty \(0 bytes") as err:
        load_module(path)
    _one_line(err.value)


def test_directory_as_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"^ckpt: .* is a directory; give the path of a \.ckpt/\.pt file in it") as err:
        load_module(tmp_path)
    _one_line(err.value)


def test_checkpoint_with_weights_of_another_shape(tmp_path):
    _toy_teacher().export(str(tmp_path / "m.pt"))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][key] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(3, 3\) in the file but \(\d+, \d+\) in the module") as err:
        load_module(tmp_path / "reshaped.pt")
    _one_line(err.value)


def test_checkpoint_with_nan_weights(tmp_path):
    _toy_teacher().export(str(tmp_path / "m.pt"))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][key][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=rf"holds non-finite weights \(NaN/Inf in '{key}'\)") as err:
        load_module(tmp_path / "nan.pt")
    _one_line(err.value)


def test_disk_full_while_saving(tmp_path, monkeypatch):
    from lit_fewstep.utils.checkpoint import atomic_save

    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(2)}, path)

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"^could not write checkpoint .*last.ckpt' \(\[enforce fail.*is the disk full") as err:
        atomic_save({"w": torch.zeros(2)}, path)
    _one_line(err.value)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2)) and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--batch_size", "0", "expected an integer >= 1, got 0"),
    ("--batch_size", "-1", "expected an integer >= 1, got -1"),
    ("--num", "0", "expected an integer >= 1, got 0"),
    ("--guidance_scale", "nan", "expected a finite number, got 'nan'"),
    ("--solver", "rk4", "invalid choice: 'rk4'"),
    ("--solver", "Euler", "invalid choice: 'Euler'"),
    ("--grid", "linear", "invalid choice: 'linear'"),
])
def test_sample_cli_refuses_bad_values_before_loading(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", TEACHER, "--nfe", "1", "--out", str(tmp_path / "s.npz"), flag, value])
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_sample_api_refuses_unknown_options_and_nan_guidance():
    teacher = load_module(TEACHER)
    with pytest.raises(ValueError, match=r"^guidance_scale: must be a finite number, got nan"):
        teacher.sample(2, 1, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"^solver: unknown method 'rk4'; choose one of heun, euler, dpmpp_2m, unipc"):
        teacher.sample(2, 3, solver="rk4")
    with pytest.raises(ValueError, match=r"^grid: unknown grid 'linear'; choose one of karras, cosine"):
        teacher.sample(2, 3, grid="linear")
    student = load_module(ROOT / "lit_fewstep" / "assets" / "dmd2_digits.pt")
    with pytest.raises(ValueError, match=r"^solver: DMD2 takes no 'solver' option at sampling"):
        student.sample(2, 1, solver="euler")


def test_negative_sigma_data():
    with pytest.raises(ValueError, match=r"^sigma_data: the data's standard deviation must be a positive number, got -1"):
        EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data=-1.0)


def test_wrong_typed_value_is_named():
    with pytest.raises(TypeError, match=r"^sigma_data: EDMDiffusion expects float, got '0.5' \(str\)"):
        EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data="0.5")
    with pytest.raises(TypeError, match=r"^hidden: MLP expects int, got 1.5 \(float\)"):
        MLP(dim=2, hidden=1.5)


def test_unwritable_out_fails_before_sampling(tmp_path, monkeypatch):
    import lit_fewstep.cli as cli

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cli, "draw", lambda *a, **k: pytest.fail("sampled before checking --out"))
    with pytest.raises(OSError, match=r"^--out: cannot write .*; choose a writable location"):
        main(["sample", "--ckpt", TEACHER, "--nfe", "1", "--out", str(blocker / "samples.npz")])
