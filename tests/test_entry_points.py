"""Both entry points exit 0 on success; a user error is one line on stderr and exit status 2; --debug shows the
traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

ASSET = str(ROOT / "lit_fewstep" / "assets" / "edm_tree.pt")
STUDENT = str(ROOT / "lit_fewstep" / "assets" / "dmd2_digits.pt")


def _console_script() -> str:
    script = Path(sys.executable).parent / "lit_fewstep"
    assert script.exists(), "the lit_fewstep console script is not installed (pip install -e .)"
    return str(script)


@pytest.mark.parametrize("entry", ["module", "script"])
def test_success_exits_zero(entry, tmp_path):
    args = ["sample", "--ckpt", ASSET, "--nfe", "2", "--num", "8", "--out", str(tmp_path / "s.npz")]
    if entry == "module":
        result = run_cli(args)
    else:
        result = subprocess.run([_console_script(), *args], capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("args,message", [
    (["sample", "--ckpt", "missing.pt", "--nfe", "1", "--out", "x.npz"], "error: ckpt: checkpoint 'missing.pt' does not exist"),
    (["sample", "--ckpt", STUDENT, "--nfe", "5", "--out", "x.npz"], "error: nfe: DMD2 samples with at most 1 evaluations"),
    (["evaluate", "--ckpt", ASSET, "--nfe", "1", "--data", "nowhere.yaml"], "error: data: config 'nowhere.yaml' does not exist"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    """In this process (the console function both entry points call; a subprocess costs seconds of imports): the
    fit case below checks the same through a real process's exit status."""
    from lit_fewstep.__main__ import console

    monkeypatch.chdir(ROOT)
    code = console([*args[:-1], str(tmp_path / args[-1])] if args[-1].endswith(".npz") else args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(message) and last.endswith("(--debug shows the traceback)"), err


def test_debug_shows_the_traceback(monkeypatch):
    from lit_fewstep.__main__ import console

    monkeypatch.delenv("LIT_FEWSTEP_DEBUG", raising=False)
    with pytest.raises(FileNotFoundError):  # raised, not turned into one line: Python prints its traceback
        console(["sample", "--ckpt", "missing.pt", "--nfe", "1", "--out", "x.npz", "--debug"])


def test_a_refused_teacher_in_fit_is_one_line(tmp_path):
    result = run_cli(["fit", "--config", "configs/dmd2/tree.yaml", "--model.init_args.teacher_ckpt", str(tmp_path / "t.pt"),
                      "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher_ckpt: checkpoint "), result.stderr
