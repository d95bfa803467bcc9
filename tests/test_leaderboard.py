"""benchmarks/leaderboard.py: cache keys, the report's arithmetic and its figures (no training here)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT
from benchmarks import leaderboard as lb


def _rows(values: dict[int, float], rate: float = 100.0) -> dict:
    return {str(n): {"sw2": v, "samples_per_s": rate} for n, v in values.items()}


def table() -> dict:
    teachers = [{"solver": "heun", "rows": {**_rows({1: 0.6, 2: 0.6, 4: 0.2, 8: 0.5}), "35": {"sw2": 0.05, "nll": 4.0}}},
                {"solver": "dpmpp_2m", "rows": _rows({1: 0.6, 2: 0.6, 4: 0.15, 8: 0.1})}]
    cd_rows = _rows({1: 0.1, 2: 0.08, 4: 0.07, 8: 0.06})
    cd_rows["1"]["nll"] = 6.0
    methods = [{"name": "cd", "rows": cd_rows, "train_wall_s": 60.0,
                "iterations": 1500, "command": "python -m lit_fewstep fit --config configs/cd/tree.yaml"},
               {"name": "dmd2", "rows": _rows({1: 0.2}), "train_wall_s": 90.0, "iterations": 1000},
               {"name": "lowdiff", "missing": "no configs/lowdiff/tree.yaml yet"}]
    return {"teachers": teachers, "methods": methods}


def test_rows_state_ratios_to_the_reference_and_the_free_solver_comparison():
    lines = lb.markdown("tree", table(), [0, 1, 2], 2000)
    text = "\n".join(lines)
    assert "Heun at 35 NFE, sw2 0.05" in text and "best training-free solver at 4 NFE: 0.15" in text
    cd = next(line for line in lines if line.startswith("| cd |"))
    # sw2 at 1/2/4/8, ratio @1 = 0.1 / 0.05, ratio @4 = 0.07 / 0.05, 0.1 < 0.15 beats the best free solver at 4 NFE,
    # nll at 1 NFE 6 and its ratio to the 35-NFE teacher's 4
    assert cd.split(" | ")[1:11] == ["0.1", "0.08", "0.07", "0.06", "2", "1.4", "yes", "6", "1.5", "1500"]
    dmd2 = next(line for line in lines if line.startswith("| dmd2 |"))
    assert dmd2.split(" | ")[1:8] == ["0.2", "–", "–", "–", "4", "–", "no"]  # a one-step generator: no @2..@8
    assert any(line.startswith("| lowdiff | not yet") for line in lines)


def test_the_targets_list_each_distillation_row_as_met_or_missed_with_its_ratio():
    t = table()
    t["methods"].insert(1, {"name": "ct", "rows": _rows({1: 0.5}), "iterations": 10})  # from scratch: not counted
    lines = lb.targets("tree", t)
    sw2 = next(line for line in lines if line.startswith("- sw2 @1"))
    assert sw2.endswith("met by 0 of 2; missed: cd 2.00x, dmd2 4.00x")  # 0.1 and 0.2 against the teacher's 0.05
    nll = next(line for line in lines if line.startswith("- nll @1"))
    assert nll.endswith("met by 1 of 1 (cd 1.50x); not scored at 1 NFE: dmd2")  # 6 / 4 is within 1.5x
    free = next(line for line in lines if "best training-free solver" in line)
    assert free.endswith("met by 1 of 2 (cd 0.1); missed: dmd2 0.2")  # the best free solver at 4 NFE: 0.15
    assert not any("ct " in line for line in lines[2:])
    digits = {"teachers": [{"solver": "heun", "rows": {"4": {"fid": 30.0}, "35": {"fid": 4.0}}}],
              "methods": [{"name": "dmd2", "rows": {"1": {"fid": 4.5}}}, {"name": "cd", "rows": {
                  "1": {"fid": 8.0}, "4": {"fid": 6.2}}}]}
    text = "\n".join(lb.targets("digits", digits))
    assert "fid @4 within 1.5x of the teacher's 35-NFE 4: met by 0 of 1; missed: cd 1.55x; not scored at 4 NFE: dmd2" in text
    assert "fid @1 within 2.0x of the teacher's 35-NFE 4: met by 2 of 2 (dmd2 1.12x, cd 2.00x)" in text
    assert "fid @1 within 1.1x of the teacher's 35-NFE 4: met by 0 of 1; missed: dmd2 1.12x" in text
    # a row distilled from the flow-matching teacher, missing a target that teacher misses too, says so (not when met)
    digits["fm_teacher"] = {"rows": {"35": {"fid": 6.4}}}
    digits["methods"] += [{"name": "flow_map", "rows": {"1": {"fid": 7.0}, "4": {"fid": 6.5}}},
                          {"name": "caf", "rows": {"1": {"fid": 5.0}, "4": {"fid": 5.6}}}]
    text = "\n".join(lb.targets("digits", digits))
    assert "missed: cd 1.55x, flow_map 1.62x (its flow-matching teacher at 35 NFE: 1.60x)" in text
    assert "(dmd2 1.12x, cd 2.00x, flow_map 1.75x, caf 1.25x)" in text and "met by 1 of 3 (caf 1.40x)" in text
    intro = "\n".join(lb.markdown("digits", {**digits, "teachers": [{"solver": "heun", "rows": {
        "1": {}, "4": {"fid": 30.0}, "35": {"fid": 4.0}}}]}, [0], 10))
    assert "whose own score at 35 NFE (Heun) is fid 6.4 (1.60x the EDM teacher's)" in intro


def test_the_readme_results_are_rewritten_between_their_markers_only(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n## Results\n{lb.README_START}\nold table\n{lb.README_END}\n\n## Next\nkept\n")
    monkeypatch.setattr(lb, "README", readme)
    runs = {"tree": {"seeds": [0, 1, 2], "num": 2000, "machine": "CPU X; 2 cores", "git": "abc123"}}
    assert lb.update_readme({"tree": table()}, runs)
    text = readme.read_text()
    assert text.startswith("# title\n\n## Results\n") and text.endswith("\n\n## Next\nkept\n") and "old table" not in text
    cd = next(line for line in text.splitlines() if line.startswith("| tree | cd |"))
    assert cd.split(" | ")[2:8] == ["sw2", "0.1", "0.08", "0.07", "0.06", "2 |"]  # 0.1 / the 35-NFE reference 0.05
    assert "not yet: lowdiff" in text and "leaderboard_tree_nfe.svg" in text
    readme.write_text("# no markers\n")
    assert not lb.update_readme({"tree": table()}, runs) and readme.read_text() == "# no markers\n"


def test_figures_are_well_formed_svg_with_one_line_per_model(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    names = lb.figures("tree", table())
    assert names == ["leaderboard_tree_nfe.svg", "leaderboard_tree_time.svg"]
    nfe = ET.parse(tmp_path / names[0]).getroot()
    lines = [e for e in nfe.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 4  # two teacher solvers (dashed) + cd + dmd2; lowdiff is not yet there
    assert sum("stroke-dasharray" in e.attrib for e in lines) == 2
    assert len([e for e in ET.parse(tmp_path / names[1]).getroot().iter() if e.tag.endswith("circle")]) == 2


def test_the_cache_key_follows_the_config_the_overrides_and_the_seed():
    key = lb.entry_key("cd", "tree", 0, [])
    assert key == lb.entry_key("cd", "tree", 0, []) and key.startswith("cd-")
    assert key != lb.entry_key("cd", "tree", 1, [])
    assert key != lb.entry_key("cd", "tree", 0, ["--trainer.max_steps", "10"])
    assert lb.config_path("cd", "tree") == ROOT / "configs" / "cd" / "tree.yaml"
    assert lb.config_path("cd", "nowhere") is None
    # 2-rectified flow is a row of its own, trained by CAF's config for it on CAF's couplings
    assert lb.config_path("caf_2rf", "digits") == ROOT / "configs" / "caf" / "digits_2rf.yaml"
    assert lb.config_path("dmd2", "digits") == ROOT / "configs" / "dmd2" / "digits_long.yaml"
    assert lb.config_path("dmd2", "tree") == ROOT / "configs" / "dmd2" / "tree.yaml"
    assert lb.PAIRS["caf_2rf"] is lb.PAIRS["caf"]


def test_the_cache_key_ignores_comments_and_layout_and_old_byte_keyed_entries_are_kept(tmp_path, monkeypatch):
    configs = tmp_path / "configs" / "cd"
    configs.mkdir(parents=True)
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(lb, "CACHE", tmp_path / "cache")
    (configs / "tree.yaml").write_text("model:\n  init_args: {lr: 0.001, ema_decay: 0.99}\n")
    key = lb.entry_key("cd", "tree", 0, [])
    (configs / "tree.yaml").write_text("# a comment\nmodel:\n  init_args:\n    ema_decay: 0.99  # why\n    lr: 1.0e-3\n")
    assert lb.entry_key("cd", "tree", 0, []) == key
    (configs / "tree.yaml").write_text("model:\n  init_args: {lr: 0.002, ema_decay: 0.99}\n")
    assert lb.entry_key("cd", "tree", 0, []) != key
    # a folder keyed by the file's bytes (caches made before) is renamed to the content key, not retrained
    old = tmp_path / "cache" / "tree" / lb._byte_key("cd", "tree", 0, [])
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(b"weights")
    (old / "train.json").write_text(json.dumps({"train_wall_s": 1.0, "command": "fit", "key": old.name}))
    monkeypatch.setattr("benchmarks.run.train", lambda *a: pytest.fail("retrained a cached model"))
    path, record = lb.train_cached("cd", "tree", 0, None, [])
    assert path == tmp_path / "cache" / "tree" / lb.entry_key("cd", "tree", 0, []) / "model.pt"
    assert path.read_bytes() == b"weights" and record["key"] == path.parent.name and not old.exists()


def test_every_method_of_the_zoo_is_a_row():
    """Every method in the conformance registry (teachers apart: they are the reference rows) has a leaderboard row."""
    from conformance_methods import METHODS

    missing = set(METHODS) - {"edm", "flow_matching"} - set(lb.VARIANTS) - set(lb.METHODS)
    assert not missing, f"add them to benchmarks/leaderboard.py's METHODS (or VARIANTS): {missing}"


@pytest.mark.parametrize("argv", [["benchmark", "--help"]])
def test_the_cli_runs_the_leaderboard_from_a_checkout(argv, capsys):
    from lit_fewstep.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "--collect" in capsys.readouterr().out


def test_workers_run_every_method_at_most_jobs_at_a_time(tmp_path):
    """--jobs: every method gets its process, never more than `jobs` at once, each with its own log."""
    import sys

    script = ("import os, sys, time; d = sys.argv[1]; open(os.path.join(d, sys.argv[2] + '.start'), 'w').close(); "
              "n = len([f for f in os.listdir(d) if f.endswith('.start')]) - "
              "len([f for f in os.listdir(d) if f.endswith('.end')]); print('running', n); time.sleep(0.5); "
              "open(os.path.join(d, sys.argv[2] + '.end'), 'w').close(); sys.exit(3 if sys.argv[2] == 'c' else 0)")
    codes = lb.run_in_workers(["a", "b", "c", "d", "e"], 2, tmp_path / "logs",
                              lambda m: [sys.executable, "-c", script, str(tmp_path), m])
    assert codes == {"a": 0, "b": 0, "c": 3, "d": 0, "e": 0}
    counts = [int((tmp_path / "logs" / f"{m}.log").read_text().split()[1]) for m in "abcde"]
    assert max(counts) == 2, counts


def test_accelerator_and_devices_reach_every_worker_and_every_fit(monkeypatch):
    """--accelerator/--devices: the workers get them as this script's flags, fit as trainer flags."""
    calls = {"run": [], "workers": []}
    monkeypatch.setattr(lb, "run", lambda data, methods, *a, **kw: calls["run"].append((methods, a[-1])) or {})
    monkeypatch.setattr(lb, "run_in_workers", lambda methods, jobs, logs, command: calls["workers"].extend(
        command(m) for m in methods))
    lb.main(["--data", "tree", "--only", "cd", "dmd", "--jobs", "2", "--accelerator", "gpu", "--devices", "1",
             "--no_report"])
    assert all(hw == ["--trainer.accelerator", "gpu", "--trainer.devices", "1"] for _, hw in calls["run"])
    for command in calls["workers"]:
        assert command[command.index("--accelerator") + 1] == "gpu" and command[command.index("--devices") + 1] == "1"
        assert "--trainer.accelerator" not in command
    # the teachers' rows are a worker job beside the first fit, not a serial step before the pool
    assert [c[c.index("--only") + 1] if "--only" in c else "teachers" for c in calls["workers"]] == \
        ["cd", "teachers", "dmd"]
    assert "--teachers_only" in calls["workers"][1]
    assert [methods for methods, _ in calls["run"]] == [["cd", "dmd"]]  # then the report pass, from the caches


@pytest.mark.parametrize("flags,methods,teachers", [
    (["--only", "cd", "--no_report"], ["cd"], False),    # a method's worker: the teachers job scores those rows
    (["--teachers_only", "--no_report"], [], True),      # the teachers job
    (["--only", "cd", "--collect"], ["cd"], True),       # a report pass scores whatever is not cached
])
def test_only_the_teachers_job_and_the_report_score_the_teachers(monkeypatch, flags, methods, teachers):
    calls = []
    monkeypatch.setattr(lb, "run", lambda data, m, *a, teachers=True: calls.append((m, teachers)) or {})
    monkeypatch.setattr(lb, "collectable", lambda m, data: m)
    monkeypatch.setattr(lb, "write_report", lambda *a: "report")
    monkeypatch.setattr(lb, "partial", lambda *a: None)
    lb.main(["--data", "tree", *flags])
    assert calls == [(methods, teachers)]


def test_without_only_the_longest_recorded_fit_starts_first(tmp_path, monkeypatch):
    """Workers start fits by the training time the committed leaderboard records, longest first; unrecorded ones last."""
    (tmp_path / "leaderboard.json").write_text(json.dumps({"tables": {"tree": {"methods": [
        {"name": "cd", "train_wall_s": 1.0}, {"name": "ct", "train_wall_s": 1.0},
        {"name": "dmd", "train_wall_s": 3.0}, {"name": "msd", "train_wall_s": 2.0}]}}}))
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    assert lb.longest_first(["cd", "ct", "ict", "dmd", "msd"], "tree") == ["dmd", "msd", "cd", "ct", "ict"]
    assert lb.longest_first(["cd", "ct"], "digits") == ["cd", "ct"]  # nothing recorded: table order


def test_collect_keeps_the_not_yet_rows_and_leaves_out_what_is_not_cached(tmp_path, monkeypatch):
    """--collect reports the cached methods and, as "not yet", those with no config for the data set (analog_bits
    has no tree config); a configured method with nothing cached is left out, never trained."""
    (tmp_path / "tree" / "cd-0123456789").mkdir(parents=True)
    (tmp_path / "tree" / "cd-0123456789" / "scores.json").write_text("{}")
    monkeypatch.setattr(lb, "CACHE", tmp_path)
    assert lb.config_path("analog_bits", "tree") is None and lb.config_path("ct", "tree") is not None
    assert lb.collectable(["cd", "ct", "analog_bits"], "tree") == ["cd", "analog_bits"]


def test_jobs_must_be_positive():
    with pytest.raises(SystemExit):
        lb.main(["--jobs", "0", "--collect"])


def test_a_staged_method_is_scored_at_n_nfe_by_its_n_step_student_unguided(tmp_path, monkeypatch):
    """Guided distillation's row: at n NFE the student of the n-step stage, sampled at guidance scale 1 (like the
    teacher rows), not its final one-step student at every NFE nor its config's default scale."""
    students = {"8": "student_8_steps.ckpt", "4": "student_4_steps.ckpt", "2": "student_2_steps.ckpt",
                "1": "student_1_steps.ckpt", "16": "student_16_steps.ckpt"}
    calls = []

    def fake_scored(name, data, path, evaluator, seeds, num, nfes, options, cache_file):
        calls.append((path.name, nfes, options))
        if name.startswith("teacher"):
            return {"rows": {str(n): {"sw2": 1.0} for n in nfes}, "model": "t", "iterations": None}
        return {"name": name, "rows": {str(nfes[0]): {"sw2": 0.1 * nfes[0]}}, "model": path.name, "iterations": 7}

    monkeypatch.setattr(lb, "evaluator_for", lambda data, seed: None)
    monkeypatch.setattr(lb, "scored", fake_scored)
    monkeypatch.setattr(lb, "train_cached", lambda *a: (tmp_path / "model.pt", {"students": students, "key": "k"}))
    table = lb.run("tree", ["guided_distillation"], [0], 10, None, 0)
    student_calls = [c for c in calls if c[0].startswith("student_")]
    assert sorted((c[0], c[1]) for c in student_calls) == sorted((f"student_{n}_steps.ckpt", [n]) for n in lb.NFES)
    assert all(c[2] == {"guidance_scale": 1.0} for c in student_calls)
    row = table["methods"][0]
    assert {n: row["rows"][n]["sw2"] for n in row["rows"]} == {str(n): pytest.approx(0.1 * n) for n in lb.NFES}


def test_rows_distilled_with_autoguidance_are_named_with_their_range_and_sampling_scale(tmp_path, monkeypatch):
    (tmp_path / "configs" / "flow_map").mkdir(parents=True)
    (tmp_path / "configs" / "flow_map" / "tree.yaml").write_text(
        "model:\n  init_args: {guide_ckpt: assets/weak.pt, guidance_range: [1.0, 3.0]}\n")
    (tmp_path / "configs" / "flow_map" / "digits.yaml").write_text("model:\n  init_args: {guide_ckpt: null}\n")
    (tmp_path / "configs" / "cd").mkdir()
    (tmp_path / "configs" / "cd" / "tree.yaml").write_text(
        "model:\n  init_args: {guide_ckpt: w.pt, guidance_range: [1, 2], sampling_guidance: 1.2}\n")
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    assert lb.autoguided_rows("tree") == ["cd (lambda ~ U[1, 2] against w.pt, sampled at 1.2)",
                                          "flow_map (lambda ~ U[1, 3] against weak.pt, sampled at 2)"]
    assert lb.autoguided_rows("digits") == []
    assert "sampled guided: cd (lambda ~ U[1, 2]" in "\n".join(lb.markdown("tree", table(), [0], 10))
    monkeypatch.setattr(lb, "METHODS", ["flow_map"])
    (tmp_path / "configs" / "flow_map" / "tree.yaml").write_text("model:\n  init_args: {lr: 0.1}\n")
    assert "autoguidance" not in "\n".join(lb.markdown("tree", table(), [0], 10))


def test_dmd2_rows_with_the_regression_loss_are_named_so(tmp_path, monkeypatch):
    (tmp_path / "configs" / "dmd2").mkdir(parents=True)
    (tmp_path / "configs" / "dmd2" / "tree.yaml").write_text("model:\n  init_args: {reg_pairs: 2048, reg_weight: 0.5}\n")
    (tmp_path / "configs" / "dmd2" / "digits_long.yaml").write_text("model:\n  init_args: {reg_pairs: 0}\n")
    (tmp_path / "configs" / "msd").mkdir()
    (tmp_path / "configs" / "msd" / "digits.yaml").write_text(
        "model:\n  init_args: {reg_pairs: 512, reg_weight: 0.0}\n")  # weight 0: no regression
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    assert lb.regression_rows("tree") == ["dmd2 (DMD's regression loss on 2048 teacher pairs, weight 0.5)"]
    assert lb.regression_rows("digits") == []
    assert "drops: dmd2 (DMD's regression loss" in "\n".join(lb.markdown("tree", table(), [0], 10))
    (tmp_path / "configs" / "dmd2" / "tree.yaml").write_text("model:\n  init_args: {lr: 0.1}\n")
    assert "regression" not in "\n".join(lb.markdown("tree", table(), [0], 10))


def test_a_run_of_a_few_rows_replaces_those_rows_and_keeps_the_rest_with_their_run(tmp_path, monkeypatch):
    """--only cd on a recorded tree table: cd's row and the teachers' rows are the new ones, dmd2 and the not-yet row
    stay, in table order, and the report names both runs; other seeds than the table's are refused before training."""
    recorded = table()
    run0 = {"command": "full", "machine": "m0", "git": "g0", "started": "s0", "wall_s": 10.0, "seeds": [0, 1, 2],
            "num": 2000}
    (tmp_path / "leaderboard.json").write_text(json.dumps({"tables": {"tree": recorded}, "runs": {"tree": run0}}))
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "update_readme", lambda *a: True)
    new_cd = {"name": "cd", "rows": _rows({1: 0.09, 2: 0.08, 4: 0.07, 8: 0.06}), "iterations": 3000}
    new_teachers = [{**t, "rows": {**t["rows"], "35": {"sw2": 0.04, "nll": 4.0}}} if t["solver"] == "heun" else t
                    for t in recorded["teachers"]]
    args = lb.argparse.Namespace(only=["cd"], collect=False, seeds=[0, 1, 2], num=2000)
    lb.write_report({"tree": {"teachers": new_teachers, "methods": [new_cd]}}, args, "s1", 5.0)
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    methods = saved["tables"]["tree"]["methods"]
    assert [m["name"] for m in methods] == ["cd", "dmd2", "lowdiff"] and methods[0]["iterations"] == 3000
    assert methods[1] == recorded["methods"][1]
    assert saved["tables"]["tree"]["teachers"][0]["rows"]["35"]["sw2"] == 0.04
    assert saved["runs"]["tree"]["command"] == "full" and saved["runs"]["tree"]["updates"][0]["rows"] == ["cd"]
    text = (tmp_path / "leaderboard.md").read_text()
    assert "- tree: `full`" in text and "then rows cd (and the teachers' rows) re-run" in text
    with pytest.raises(SystemExit, match="same --seeds"):
        lb.main(["--data", "tree", "--only", "cd", "--seeds", "0"])


def test_a_run_of_every_row_on_cached_fits_is_an_update_and_the_end_to_end_run_stays(tmp_path, monkeypatch):
    """A run without --only whose table holds fits made before it started (cached: dated earlier, or undated) does
    not measure the suite, so the last end-to-end run stays the table's run and this one is listed as an update
    naming what it trained; a run that trained every row replaces it."""
    run0 = {"command": "full", "machine": "m0", "git": "g0", "started": "2026-12-01 10:00 UTC", "wall_s": 10.0,
            "seeds": [0, 1, 2], "num": 2000}
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "update_readme", lambda *a: True)
    args = lb.argparse.Namespace(only=None, teachers_only=False, collect=False, seeds=[0, 1, 2], num=2000)
    started = "2026-12-05 00:01:10 UTC"
    new = table()
    new["methods"][0]["fitted_at"] = "2026-12-05 00:30:00 UTC"  # cd: trained by this run
    (tmp_path / "leaderboard.json").write_text(json.dumps({"tables": {"tree": table()}, "runs": {"tree": run0}}))
    assert lb.reused_fits(new, started) == ["dmd2"]  # undated: cached (lowdiff has no fit)
    new["methods"][1]["fitted_at"] = "2026-12-05 00:01:09 UTC"  # a second before the start: cached
    lb.write_report({"tree": new}, args, started, 5.0)
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    assert saved["runs"]["tree"]["started"] == run0["started"] and saved["tables"]["tree"] == new
    assert [(u["rows"], u["reused_fits"]) for u in saved["runs"]["tree"]["updates"]] == [(["cd"], ["dmd2"])]
    assert "then every row re-scored and rows cd re-trained (the cached fits of dmd2 reused): `" in \
        (tmp_path / "leaderboard.md").read_text()
    new["methods"][1]["fitted_at"] = "2026-12-05 00:40:00 UTC"  # now every row was trained after the start
    lb.write_report({"tree": new}, args, started, 7.0)
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    assert saved["runs"]["tree"]["started"] == started and "updates" not in saved["runs"]["tree"]


def test_a_collect_report_is_an_update_and_never_the_suites_wall_time(tmp_path, monkeypatch):
    """`--collect` trains and scores nothing, so on a recorded table it is listed as an update and the end-to-end
    run (whose wall time benchmarks/suite_time.py reads) stays; as a table's first record it is marked, and
    suite_time refuses it rather than report its seconds as the suite's."""
    from benchmarks import suite_time

    run0 = {"command": "full", "machine": "m0", "git": "g0", "started": "2026-12-01 10:00 UTC", "wall_s": 10.0,
            "seeds": [0, 1, 2], "num": 2000}
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "update_readme", lambda *a: True)
    args = lb.argparse.Namespace(only=None, teachers_only=False, collect=True, seeds=[0, 1, 2], num=2000)
    (tmp_path / "leaderboard.json").write_text(json.dumps({"tables": {"tree": table()}, "runs": {"tree": run0}}))
    lb.write_report({"tree": table()}, args, "2026-12-05 01:00:00 UTC", 3.0)
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    assert saved["runs"]["tree"]["started"] == run0["started"] and saved["runs"]["tree"]["wall_s"] == 10.0
    assert [(u["rows"], u["collected"]) for u in saved["runs"]["tree"]["updates"]] == [([], True)]
    assert "then the table collected from the cached scores" in (tmp_path / "leaderboard.md").read_text()

    (tmp_path / "leaderboard.json").unlink()
    lb.write_report({"tree": table()}, args, "2026-12-05 01:00:00 UTC", 3.0)
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    assert saved["runs"]["tree"]["collected"] is True
    assert "3 s (a `--collect` report: nothing trained or scored)" in (tmp_path / "leaderboard.md").read_text()
    with pytest.raises(SystemExit, match="--collect. report"):
        suite_time.base_of("tree", saved)
