"""A researcher's first hour, continued: bad requests fail before any work, runs never overwrite each other,
one x axis (the iteration) in TensorBoard, a progress bar in iterations, quiet runs, a fast help."""

import pytest

from conftest import ROOT

STUDENT = str(ROOT / "lit_fewstep" / "assets" / "dmd2_digits.pt")  # a one-step DMD2 student


def test_evaluate_refuses_every_bad_nfe_before_any_work(tmp_path, monkeypatch, capsys):
    """`evaluate --nfe 1 2 4` on a one-step model: no reference features, no sampling, nothing written."""
    from lit_fewstep import evaluation

    def no_work(*args, **kwargs):
        pytest.fail("evaluate did work before checking every requested NFE")

    for name in ("draw", "Evaluator", "data_from_config", "instantiate"):
        monkeypatch.setattr(evaluation, name, no_work)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        evaluation.evaluate_main(["--ckpt", STUDENT, "--nfe", "1", "2", "4", "--num", "8", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--nfe: nfe: DMD2 samples with at most 1 evaluations, got 2" in capsys.readouterr().err
    assert not out.exists()


def _fit_tree(save_dir, *extra):
    from lit_fewstep.cli import main

    main(["fit", "--config", str(ROOT / "configs" / "edm" / "tree.yaml"), "--trainer.max_steps", "2",
          "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
          "--data.init_args.batch_size", "32", "--data.init_args.num_train", "64", *extra])


def test_rerunning_a_config_never_overwrites_the_previous_run(tmp_path, capsys):
    """Configs pin no version: each fit gets a new version_N folder and `<name>/latest` points to the newest."""
    from lit_fewstep.cli import main

    runs = tmp_path / "edm_tree"
    _fit_tree(tmp_path)
    first = (runs / "version_0" / "model.pt").read_bytes()
    assert (runs / "latest").resolve() == (runs / "version_0").resolve()
    printed = capsys.readouterr().out
    assert f"to {runs / 'version_0' / 'model.pt'} ({runs / 'latest' / 'model.pt'} points to it)" in printed
    # the job ends saying where its picture of samples went
    assert f"wrote a picture of its samples to {runs / 'version_0' / 'samples.png'}" in printed
    assert (runs / "version_0" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _fit_tree(tmp_path, "--seed_everything", "1", "--picture_samples", "0")  # 0: no picture
    assert not (runs / "version_1" / "samples.png").exists() and "wrote a picture" not in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1"]
    assert (runs / "version_0" / "model.pt").read_bytes() == first  # the first run is untouched
    assert (runs / "version_0" / "config.yaml").is_file() and (runs / "version_1" / "config.yaml").is_file()
    assert (runs / "latest").resolve() == (runs / "version_1" / "model.pt").parent.resolve()
    main(["evaluate", "--ckpt", str(runs / "latest" / "model.pt"), "--nfe", "1", "--num", "64",
          "--num_reference", "64"])
    assert (runs / "version_1" / "model.eval.json").is_file()
    # a pinned version that already holds a run is refused (one line), not overwritten
    with pytest.raises(FileExistsError, match=r"^trainer.logger: .*version_0 already holds a run"):
        _fit_tree(tmp_path, "--trainer.logger.init_args.version", "version_0")
    assert (runs / "version_0" / "model.pt").read_bytes() == first


def test_latest_is_a_text_file_where_symlinks_fail(tmp_path, monkeypatch):
    import os

    import torch

    from lit_fewstep.utils.checkpoint import load_checkpoint
    from lit_fewstep.utils.runs import point_latest

    for n in (0, 1):
        (tmp_path / "run" / f"version_{n}").mkdir(parents=True)
        torch.save({"n": n}, tmp_path / "run" / f"version_{n}" / "model.pt")
    assert point_latest(tmp_path / "run" / "version_0").is_symlink()

    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    pointer = point_latest(tmp_path / "run" / "version_1")  # replaces the symlink with a text file
    assert pointer.is_file() and not pointer.is_symlink() and pointer.read_text() == "version_1\n"
    assert load_checkpoint(tmp_path / "run" / "latest" / "model.pt")["n"] == 1
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_readme_commands_write_under_runs(tmp_path, monkeypatch):
    """No README command writes into the repository root: every concrete --out is under runs/."""
    import re
    import shlex

    from lit_fewstep.cli import main

    readme = (ROOT / "README.md").read_text()
    outs = re.findall(r"--out (\S+?)[`\s]", readme)
    concrete = [o for o in outs if not o.startswith(("FILE", "DIR", "TEACHER"))]
    assert concrete and all(o.startswith("runs/") for o in concrete), concrete
    # the sample command of the shipped student, run as written (from a scratch folder standing for the clone)
    command = re.search(r"`(python -m lit_fewstep sample --ckpt lit_fewstep/assets/dmd2_digits.pt [^`]*)`", readme)
    args = shlex.split(command.group(1))[3:]
    args[args.index("--ckpt") + 1] = STUDENT
    monkeypatch.chdir(tmp_path)
    out = main(args)
    assert out.resolve().parent == (tmp_path / "runs" / "samples").resolve() and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def _toy_dmd2(tmp_path, **kwargs):
    from lit_fewstep.methods import DMD2, EDMDiffusion
    from lit_fewstep.nets import MLP

    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        EDMDiffusion(MLP(dim=2, hidden=16, depth=1, emb_dim=8, num_classes=8), sigma_data=1.4).export(str(teacher))
    return DMD2(str(teacher), generator_every=5, lr=1e-3, **kwargs)  # TTUR 5:1: 6 optimizer steps per 5 iterations


def test_tensorboard_x_axis_is_the_iteration_for_losses_pictures_and_sweeps(tmp_path, float32_default_dtype):
    """Under a 5:1 critic/generator schedule optimizer steps run ahead of iterations; every event carries the
    iteration (pictures and sweeps after iterations 5 and 10 sit beside the losses of iterations 5 and 10)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_fewstep.data import Toy2DDataModule
    from lit_fewstep.metrics import NFESweepCallback, SampleGridCallback

    L.seed_everything(0)
    model = _toy_dmd2(tmp_path)
    callbacks = [SampleGridCallback(every_n_iterations=5, nfe=(1,), num=16),
                 NFESweepCallback(nfe=(1,), num=64, every_n_iterations=5, num_reference=64)]
    trainer = L.Trainer(accelerator="cpu", max_steps=model.optimizer_steps_for(10), log_every_n_steps=1,
                        logger=TensorBoardLogger(str(tmp_path), name="tb", version="v"), callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=320))
    assert int(model.iteration) == 10 and trainer.global_step == 12
    acc = EventAccumulator(str(next((tmp_path / "tb" / "v").glob("events.out.tfevents.*"))),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/nfe1")] == [5, 10]
    assert [e.step for e in acc.Scalars("val/sw2@1")] == [5, 10]
    assert [e.step for e in acc.Scalars("train/critic_loss")] == list(range(1, 11))
    assert {e.step for e in acc.Scalars("train/generator_loss")} <= set(range(1, 11))
    assert "step" not in acc.Tags()["scalars"]
    assert max(e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)) == 10


def test_progress_bar_counts_iterations_of_the_run(tmp_path, capsys, float32_default_dtype):
    """One bar for the run: iterations (not batches of the epoch) out of the total that max_steps allows."""
    import lightning as L

    from lit_fewstep.data import Toy2DDataModule
    from lit_fewstep.utils.progress import IterationProgressBar

    model = _toy_dmd2(tmp_path)
    assert model.optimizer_steps_for(1000) == 1200 and model.iterations_for(1200) == 1000  # configs/dmd2/digits.yaml
    assert all(model.optimizer_steps_for(model.iterations_for(s)) >= s > model.optimizer_steps_for(
        model.iterations_for(s) - 1) for s in range(1, 40))
    data = Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=192)  # 6 batches per epoch
    trainer = L.Trainer(accelerator="cpu", max_steps=model.optimizer_steps_for(10), logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    assert isinstance(trainer.progress_bar_callback, IterationProgressBar) and int(model.iteration) == 10
    bar = capsys.readouterr().out.replace("\r", "\n")  # Lightning's tqdm bars write to stdout
    assert "Training: 100%" in bar and "10/10 [" in bar and "epoch=1" in bar
    assert "/6 [" not in bar and "Epoch 0" not in bar  # no per-epoch restarts
    quiet = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    quiet.fit(_toy_dmd2(tmp_path), data)
    assert quiet.progress_bar_callback is None  # a bar turned off stays off


DISTILLATION = [f"{m}/{d}" for m in ("cd", "ct", "ict", "scd", "sct", "dmd", "dmd2", "msd") for d in ("tree", "digits")]


def _callbacks_of(config: str) -> dict:
    import yaml

    callbacks = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["trainer"]["callbacks"]
    return {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in callbacks}


@pytest.mark.parametrize("config", DISTILLATION)
def test_distillation_configs_log_pictures_and_nfe_sweeps(config):
    callbacks = _callbacks_of(config)
    assert {"SampleGridCallback", "NFESweepCallback"} <= set(callbacks), config
    one_step = config.split("/")[0] in ("dmd", "dmd2", "msd")  # one-step generators; consistency models: 1 and 2
    for name in ("SampleGridCallback", "NFESweepCallback"):
        assert callbacks[name]["nfe"] == ([1] if one_step else [1, 2]), (config, name)
        assert callbacks[name]["every_n_iterations"] >= 300, (config, name)  # a few times per run: cheap


@pytest.mark.parametrize("config", [c for c in DISTILLATION if c.endswith("tree")])
def test_distillation_config_runs_its_callbacks_and_names_learning_rates_by_phase(config, tmp_path):
    """Each tree config, a few iterations with its own callbacks made due every iteration: pictures, sweeps and
    `lr/<phase>` tags in TensorBoard."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_fewstep.cli import main

    spec = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    for callback in spec["trainer"]["callbacks"]:
        if "every_n_iterations" in callback.get("init_args", {}):
            callback["init_args"].update(every_n_iterations=2, num=64)
            if "num_reference" in callback["init_args"]:
                callback["init_args"]["num_reference"] = 64
    spec["trainer"].update(max_steps=-1, max_epochs=1, log_every_n_steps=1, enable_progress_bar=False)
    spec["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    spec["data"]["init_args"].update(batch_size=32, num_train=64)  # 2 iterations
    if spec["model"]["init_args"].get("pairs_path"):
        spec["model"]["init_args"]["pairs_path"] = None  # DMD's regression pairs are made by a separate command
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(spec))
    module = main(["fit", "--config", str(tmp_path / "config.yaml")]).model
    run = next(tmp_path.glob("*/version_0"))
    acc = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for nfe in _callbacks_of(config)["SampleGridCallback"]["nfe"]:
        assert [e.step for e in acc.Images(f"samples/nfe{nfe}")] == [2], (config, tags["images"])
        assert [e.step for e in acc.Scalars(f"val/sw2@{nfe}")] == [2], (config, tags["scalars"])
    lr_tags = sorted(t for t in tags["scalars"] if t.startswith("lr"))
    assert lr_tags == sorted(f"lr/{phase.name}" for phase in module.phases), (config, lr_tags)


def test_no_config_pins_a_run_folder():
    """A pinned logger version makes every rerun write into the same folder; no config (new ones included) has one."""
    import yaml

    pinned = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        logger = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("logger") or {}
        if isinstance(logger, dict) and "version" in (logger.get("init_args") or {}):
            pinned.append(str(path.relative_to(ROOT)))
    assert not pinned, f"configs pinning trainer.logger.init_args.version: {pinned}"


@pytest.mark.parametrize("config", ["edm/tree", "dmd2/tree"])
def test_a_run_prints_no_warnings_that_do_not_concern_the_user(config, tmp_path):
    """README's tree run (and a distillation run, which has no validation step) prints Lightning's device and stop
    lines on stderr, nothing else: no deprecations from inside libraries, advertisements or misleading hints."""
    from conftest import run_cli

    result = run_cli(["fit", "--config", f"configs/{config}.yaml", "--trainer.max_steps", "20",
                      "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    import re

    expected = r"Seed set to 0|(GPU|TPU|HPU) available: .*|`Trainer.fit` stopped: `max_steps=20` reached\."
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(re.fullmatch(expected, line) for line in lines) and len(lines) <= 4, "\n".join(lines)


def test_help_lists_the_commands_without_importing_torch():
    """`python -m lit_fewstep --help` answers at once: the command list is printed before torch or Lightning load."""
    import subprocess
    import sys

    code = ("import sys; from lit_fewstep.__main__ import console; status = console(['--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules)); "
            "sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "HEAVY []" in result.stdout
    from lit_fewstep.__main__ import COMMANDS
    from lit_fewstep.cli import FewStepCLI

    assert list(COMMANDS) == list(FewStepCLI.subcommands())  # the fast list stays the CLI's
    for name in COMMANDS:
        assert f"\n  {name:<10}" in result.stdout


def test_model_help_shows_the_methods_own_arguments(capsys):
    """`fit --model.help DMD2`: DMD2's arguments and lit_fewstep's networks, not every torch.nn class."""
    from lit_fewstep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "DMD2"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())  # argparse wraps the help at the terminal's width
    assert "--model.generator_every" in text and "--model.teacher_ckpt" in text
    assert "lit_fewstep.nets.UNet" in text and "lit_fewstep.nets.MLP" in text
    assert "torch.nn.ReLU" not in text and "classes of other packages" in flat
    assert len(text.splitlines()) < 150, len(text.splitlines())  # was 1,427
