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
