"""A checkpoint is data: it cannot run code, and it cannot rewrite the user's config.

A weights-only file can still name a "class" in its recorded config. These tests write files whose config names
`lit_fewstep.utils.checkpoint.os.system` (a function reached through a module attribute) with a command that would
create a marker file, and load them through every entry point that reads a checkpoint.
"""

import argparse

import pytest
import torch

from conftest import ROOT
from lit_fewstep.cli import main, pairs_main
from lit_fewstep.methods import DMD2, EDMDiffusion, FewStepModule
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module
from lit_fewstep.utils.config import Configurable, UnsafeClassPathError, instantiate, resolve_class

EVIL = "lit_fewstep.utils.checkpoint.os.system"


def _system_call(marker):
    return {"class_path": EVIL, "init_args": {"command": f"touch {marker}"}}


def _evil_files(tmp_path):
    """(top-level, nested as the network, in the data config) checkpoints, and the marker they would create."""
    marker = tmp_path / "PWNED"
    top = tmp_path / "top.pt"
    torch.save({"lit_fewstep": {"config": _system_call(marker)}, "state_dict": {}}, top)
    nested = tmp_path / "nested.pt"
    config = {"class_path": "lit_fewstep.methods.diffusion.EDMDiffusion", "init_args": {"net": _system_call(marker)}}
    torch.save({"lit_fewstep": {"config": config}, "state_dict": {}}, nested)
    data = tmp_path / "data.pt"
    EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data=1.0).export(str(data))
    ckpt = torch.load(data, weights_only=True)
    ckpt["lit_fewstep"]["data"] = _system_call(marker)
    torch.save(ckpt, data)
    return top, nested, data, marker


def _refused(call, marker, error=UnsafeClassPathError, one_line=True):
    with pytest.raises(error) as err:
        call()
    assert EVIL in str(err.value) and (not one_line or "\n" not in str(err.value))
    assert not marker.exists(), "the checkpoint ran a command"
    return str(err.value)


def test_python_loaders_refuse_a_function_reached_through_a_module(tmp_path):
    top, nested, _, marker = _evil_files(tmp_path)
    for path in (top, nested):
        message = _refused(lambda: load_module(path), marker)
        assert message.startswith("ckpt: ") and "'os' is a module, not a class" in message
        message = _refused(lambda: load_teacher(str(path)), marker)
        assert message.startswith("teacher_ckpt: ")
        # even trust (pickle allowed) never builds a function: only classes are constructed
        _refused(lambda: load_module(path, trust=True), marker)


@pytest.mark.parametrize("which", ["top", "nested"])
def test_sample_evaluate_and_pairs_refuse_it(tmp_path, which):
    top, nested, _, marker = _evil_files(tmp_path)
    path = str(top if which == "top" else nested)
    _refused(lambda: main(["sample", "--ckpt", path, "--nfe", "1", "--num", "2", "--out", str(tmp_path / "s.npz")]), marker)
    _refused(lambda: main(["evaluate", "--ckpt", path, "--nfe", "1", "--num", "2"]), marker)
    _refused(lambda: pairs_main(["--teacher", path, "--num", "2", "--out", str(tmp_path / "p.pt")]), marker)


def test_fit_refuses_it_as_teacher(tmp_path):
    top, nested, _, marker = _evil_files(tmp_path)
    for path in (top, nested):
        _refused(lambda: DMD2(str(path)), marker)
        # jsonargparse reports the refusal inside its own (multi-line) message when it builds the model
        _refused(lambda: main(["fit", "--config", "configs/dmd2/tree.yaml", "--model.init_args.teacher_ckpt", str(path),
                               "--trainer.max_steps", "1", "--trainer.logger", "false",
                               "--trainer.default_root_dir", str(tmp_path)]), marker, ValueError, one_line=False)


def test_evaluate_refuses_it_in_the_recorded_data_config(tmp_path):
    _, _, data, marker = _evil_files(tmp_path)
    message = _refused(lambda: main(["evaluate", "--ckpt", str(data), "--nfe", "1", "--num", "2"]), marker)
    assert "its data config" in message


def test_resolve_class_rules():
    assert resolve_class("lit_fewstep.methods.EDMDiffusion", FewStepModule) is EDMDiffusion  # re-exported name
    assert resolve_class("lit_fewstep.nets.mlp.MLP") is MLP
    refused = {
        "os.system": "outside lit_fewstep",
        "lit_fewstep.nets.mlp.nn.Bilinear": "'nn' is a module, not a class",
        "lit_fewstep.utils.checkpoint.torch.load": "'torch' is a module",
        "lit_fewstep.utils.config.instantiate": "'instantiate' is a function, not a class",
        "lit_fewstep.methods.diffusion.Tensor": "not defined in lit_fewstep",  # a torch class imported into our module
        "lit_fewstep.nowhere.Thing": "'nowhere' does not exist",
        "lit_fewstep.nets.MLP; rm -rf": "not a dotted Python name",
    }
    for path, why in refused.items():
        with pytest.raises(UnsafeClassPathError, match=why):
            resolve_class(path)
    with pytest.raises(UnsafeClassPathError, match="MLP is not a FewStepModule"):
        resolve_class("lit_fewstep.nets.MLP", FewStepModule)
    with pytest.raises(UnsafeClassPathError, match="Phase is not a configurable lit_fewstep module"):
        resolve_class("lit_fewstep.methods.base.Phase", Configurable)  # ours, but not what a checkpoint nests
    with pytest.raises(UnsafeClassPathError, match="Bilinear is not a configurable lit_fewstep module"):
        resolve_class("torch.nn.Bilinear", Configurable, trust=True)  # trust lifts the module rule, not the base
    with pytest.raises(UnsafeClassPathError, match="init_args are not a mapping"):
        instantiate({"class_path": "lit_fewstep.nets.MLP", "init_args": ["dim", 2]})


# --- fit --ckpt_path: the config decides the model, the checkpoint gives state ----------------------------------
def _tree_fit(tmp_path, *extra):
    return main(["fit", "--config", "configs/edm/tree.yaml", "--trainer.logger", "false", "--trainer.callbacks", "null",
                 "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size", "64", *extra])


def _checkpoint_after_two_steps(tmp_path, **additions):
    cli = _tree_fit(tmp_path / "first", "--trainer.max_steps", "2")
    path = tmp_path / "two_steps.ckpt"
    cli.trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(additions)
    torch.save(ckpt, path)
    return path


def test_checkpoint_hyperparameters_do_not_override_the_config(tmp_path):
    bilinear = {"class_path": "torch.nn.Bilinear", "init_args": {"in1_features": 2, "in2_features": 2, "out_features": 2}}
    path = _checkpoint_after_two_steps(
        tmp_path, hyper_parameters={"_class_path": "lit_fewstep.methods.FlowMatching", "net": bilinear})
    cli = _tree_fit(tmp_path / "resumed", "--trainer.max_steps", "3", "--ckpt_path", str(path))
    assert type(cli.model) is EDMDiffusion and type(cli.model.model.net) is MLP
    assert int(cli.model.iteration) == 3  # the state came from the file


def test_fit_pickle_opt_in_works_and_its_refusal_is_one_line(tmp_path):
    path = _checkpoint_after_two_steps(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["note"] = argparse.Namespace(written_by="an old script")  # needs pickle
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as err:
        _tree_fit(tmp_path / "refused", "--trainer.max_steps", "3", "--ckpt_path", str(path))
    message = str(err.value)
    assert message.startswith("ckpt_path: ") and "pickled" in message and "--weights_only false" in message
    assert "\n" not in message
    cli = _tree_fit(tmp_path / "trusted", "--trainer.max_steps", "3", "--ckpt_path", str(path), "--weights_only", "false")
    assert int(cli.model.iteration) == 3


def _pickled_teacher(tmp_path):
    """A teacher export that only a pickle load can read (an argparse.Namespace beside its weights)."""
    teacher = tmp_path / "teacher.pt"
    EDMDiffusion(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data=1.0).export(str(teacher))
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["note"] = argparse.Namespace(a=1)
    torch.save(ckpt, teacher)
    return teacher


def test_pairs_pickle_opt_in_is_offered_and_works(tmp_path):
    teacher = _pickled_teacher(tmp_path)
    with pytest.raises(ValueError, match=r"^--teacher: .*pickled.*pass --trust_checkpoint true"):
        pairs_main(["--teacher", str(teacher), "--num", "4", "--nfe", "3", "--out", str(tmp_path / "p.pt")])
    out = pairs_main(["--teacher", str(teacher), "--num", "4", "--nfe", "3", "--out", str(tmp_path / "p.pt"),
                      "--trust_checkpoint", "true"])
    assert load_checkpoint(out)["x"].shape == (4, 2)


def test_teacher_without_opt_in_says_how_to_resave(tmp_path):
    teacher = _pickled_teacher(tmp_path)
    with pytest.raises(ValueError, match=r"^teacher_ckpt: .*pickled.*re-save it weights-only once") as err:
        load_teacher(str(teacher))
    assert "--trust_checkpoint" not in str(err.value)  # fit offers no such flag
    resaved = tmp_path / "resaved.pt"
    load_module(teacher, trust=True).export(str(resaved))  # the advice works
    assert load_teacher(str(resaved)) is not None


def test_shipped_assets_still_load():
    for name in ("edm_tree", "fm_tree", "edm_digits", "fm_digits", "dmd2_digits"):
        load_module(ROOT / "lit_fewstep" / "assets" / f"{name}.pt")


def test_allowing_a_users_module_builds_its_classes_without_pickle(tmp_path, monkeypatch):
    """A user's own method class loads once its package is allowed (argument or environment); pickle stays off."""
    import sys

    package = tmp_path / "mylab_methods.py"
    package.write_text("from lit_fewstep.methods import EDMDiffusion\n\nclass MyEDM(EDMDiffusion):\n"
                       "    def __init__(self, net, sigma_data: float = 0.5):\n        super().__init__(net, sigma_data)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylab_methods

    path = tmp_path / "mine.pt"
    mylab_methods.MyEDM(MLP(dim=2, hidden=8, depth=1, emb_dim=8), sigma_data=1.0).export(str(path))
    with pytest.raises(UnsafeClassPathError, match=r"mylab_methods.MyEDM', which was refused: it is outside lit_fewstep; "
                                                   r"if you trust the package .* --allow_module mylab_methods .*pickle stays off"):
        load_module(path)
    assert type(load_module(path, allow_modules=["mylab_methods"])).__name__ == "MyEDM"
    out = main(["sample", "--ckpt", str(path), "--nfe", "2", "--num", "4", "--out", str(tmp_path / "s.npz"),
                "--allow_module", "mylab_methods"])  # the command-line opt-in
    assert out.exists()
    monkeypatch.setenv("LIT_FEWSTEP_ALLOW_MODULES", "mylab_methods")
    assert type(load_module(path)).__name__ == "MyEDM"
    ckpt = torch.load(path, weights_only=True)
    ckpt["note"] = argparse.Namespace(a=1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="pickled"):  # allowing a module is not allowing pickle
        load_module(path)
    sys.modules.pop("mylab_methods", None)
