"""The benchmark harness and the timing benchmark measure what they say (no speed targets here: see benchmarks/)."""

import json
import sys
import time

import lightning as L
import pytest
import torch
from torch import nn

from conftest import ROOT
from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.methods.base import FewStepModule, Phase
from lit_fewstep.nets import MLP

sys.path.insert(0, str(ROOT))
from benchmarks import run as bench  # noqa: E402
from benchmarks.timing import sampling_throughput, training_step_ratio  # noqa: E402


def tiny_teacher():
    return EDMDiffusion(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=2), sigma_data=1.062, ema_decay=0.9)


class StudentWithFrozenCritic(FewStepModule):
    """Each step: the frozen `critic` is called under no_grad once and, with gradients flowing through it, once."""

    generator_name = "student"

    def __init__(self):
        super().__init__(ema_decay=0.0)
        self.student, self.critic = nn.Linear(2, 2), nn.Linear(2, 1)
        self.student.in_channels = 2  # read by FewStepModule.data_shape
        self.critic.requires_grad_(False)
        self.phases = [Phase("student", "loss", ("student",))]

    def loss(self, batch):
        x, _ = batch
        with torch.no_grad():
            baseline = self.critic(x)
        return (self.critic(self.student(x)) - baseline).square().mean()


def test_training_step_ratio_records_each_network_pass(tmp_path):
    L.seed_everything(0)
    data = Toy2DDataModule(name="tree", batch_size=32, num_train=64)  # 2 batches per epoch: epochs roll over
    teacher = training_step_ratio(tiny_teacher(), data, steps=3, warmup=1, repeats=1, accelerator="cpu")
    assert teacher["passes"] == ["model:fwd+bwd"] and teacher["calls_per_step"] == 1
    assert teacher["step_s"] > 0 and teacher["floor_s"] > 0 and teacher["ratio"] > 0

    other = training_step_ratio(StudentWithFrozenCritic(), data, steps=3, warmup=1, repeats=1, accelerator="cpu")
    # the critic: once forward only (no_grad), once forward + backward (gradient reaches the student through it)
    assert other["passes"] == ["critic:fwd", "critic:fwd+bwd", "student:fwd+bwd"]
    assert other["calls_per_step"] == 3


class _Slow(torch.autograd.Function):
    """Identity whose forward takes 40 ms and backward 80 ms: network time that a clock must see."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(0.04)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.08)
        return grad


class _SlowCritic(nn.Module):
    def forward(self, x):
        return _Slow.apply(x) + self.bias

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2), requires_grad=False)


class TwoBackwardsThroughCritic(FewStepModule):
    """The frozen critic runs forward once and backward twice (a weight's gradient, then the step), as CTM's two
    input gradients of its target network; `loss_math_s` of sleep outside every network."""

    generator_name = "student"

    def __init__(self, loss_math_s=0.0):
        super().__init__(ema_decay=0.0)
        self.student, self.critic, self.loss_math_s = nn.Linear(2, 2), _SlowCritic(), loss_math_s
        self.student.in_channels = 2
        self.phases = [Phase("student", "loss", ("student",))]

    def loss(self, batch):
        x, _ = batch
        h = self.student(x)
        loss = self.critic(h).square().mean()
        torch.autograd.grad(loss, h, retain_graph=True)
        time.sleep(self.loss_math_s)
        return loss


def test_in_place_ratio_counts_every_backward_and_nothing_outside_the_networks():
    data = Toy2DDataModule(name="tree", batch_size=32, num_train=64)
    # step ~ 40 ms forward + 2 x 80 ms backward; the replay counts one backward (120 ms), the clock in place both
    two = training_step_ratio(TwoBackwardsThroughCritic(), data, steps=4, warmup=1, repeats=1, accelerator="cpu")
    assert two["ratio"] > 1.5 and two["ratio_in_place"] < 1.35
    # 300 ms of loss math outside the networks is outside the in-place clock
    slow = training_step_ratio(TwoBackwardsThroughCritic(0.3), data, steps=4, warmup=1, repeats=1, accelerator="cpu")
    assert slow["ratio_in_place"] > 2.0


def test_sampling_throughput_counts_nfe():
    rows = sampling_throughput(tiny_teacher(), [1, 3], batch=50, repeats=2)
    assert [(r["nfe"], r["nfe_spent"], r["batch"]) for r in rows] == [(1, 1, 50), (3, 3, 50)]
    assert all(r["images_per_s"] == pytest.approx(50 / r["seconds"]) for r in rows)


def test_suite_rows_report_and_teacher_column(tmp_path):
    asset = ROOT / "lit_fewstep" / "assets" / "edm_tree.pt"
    if not asset.exists():
        pytest.skip("edm_tree.pt not shipped")
    entry = {"name": "EDM", "config": "configs/edm/tree.yaml", "asset": "lit_fewstep/assets/edm_tree.pt",
             "teacher": "self", "nfe": [1, 35], "num": 200, "options": {"solver": "heun"}}
    result = bench.run_suite("unit", [entry], reuse=True, seed=0, timing=False, num_reference=500)
    rows = result["rows"]
    assert [r["nfe"] for r in rows] == [1, 35] and all(r["source"] == "reused" for r in rows)
    # the teacher column is the teacher's own 35-NFE sw2, on every row
    assert all(r["teacher sw2@35"] == rows[1]["sw2"] for r in rows)
    assert rows[1]["sw2"] < rows[0]["sw2"]  # 35 Heun steps beat one step on the shipped teacher

    class Args:
        seed, reuse, num_reference = 0, True, 500

    out = tmp_path / "unit.md"
    bench.write_report(result, out, Args, "now", 1.0, "0 0 0", "0 0 0")
    text = out.read_text()
    assert "- command: `" in text and "- machine: " in text and "### tree" in text
    assert "| EDM | 35 |" in text and out.with_suffix(".json").exists()


def test_every_suite_entry_points_at_existing_files():
    for suite, entries in bench.SUITES.items():
        for entry in entries:
            assert (ROOT / entry["config"]).exists(), (suite, entry["config"])
            assert entry.get("teacher") in (None, "self") or (ROOT / entry["teacher"]).exists(), (suite, entry)


@pytest.mark.slow
def test_gpu_smoke_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu/smoke.py end to end on the CPU in bf16-mixed for a JVP method on a convolutional network (sCD)
    and DMD2: a row per method with its throughput, the step/passes ratio, and the targets it can judge."""
    from benchmarks.gpu import smoke

    out = tmp_path / "smoke.md"
    result = smoke.main(["--accelerator", "cpu", "--methods", "cd", "scd", "dmd2", "--iterations", "2", "--steps", "1",
                         "--batch", "8", "--out", str(out)])
    assert not result["skipped"], result["skipped"]
    text = out.read_text()
    for method in ("cd", "scd", "dmd2"):
        row = result["rows"][method]
        assert row["iterations"] == 2 and row["nfe"] == 1 and row["images_per_s"] > 0 and row["ratio"] > 0
        assert f"| {method} |" in text
    assert "DMD2 step / its network passes" in text and "sCD step / CD step" in text
    assert (tmp_path / "smoke.json").exists()


def test_dmd_ratio_only_rewrites_its_section_and_keeps_the_rest(tmp_path):
    """`benchmarks/dmd.py --ratio_only`: the timing section is replaced; the tables and hand-written readings
    around it stay byte for byte."""
    from benchmarks import dmd

    report = tmp_path / "dmd.md"
    head, tail = "# Distribution matching\n\n## digits\n\n| run |\n|---|\n", "## Reading (by hand)\n\n- kept\n"
    report.write_text(head + "\n" + dmd.TIMING_HEADING + "\n\nold figures\n\n" + tail)
    ratio = {"data": "digits", "batch": 64, "steps": 100, "warmup": 5, "step_s": 0.4, "floor_s": 0.39,
             "ratio": 1.025, "ratio_in_place": 1.115, "passes": ["G:fwd", "teacher:fwd"], "calls_per_step": 4}
    dmd.replace_timing_section(report, ratio)
    text = report.read_text()
    assert text.startswith(head) and text.endswith(tail) and "old figures" not in text
    assert "**ratio 1.025**" in text and "**1.115**" in text and text.count(dmd.TIMING_HEADING) == 1


def test_variants_table_rows_and_cache_key(tmp_path, monkeypatch):
    """benchmarks/variants.py: one row per variant in the given order, the first NFE's extra metrics, '–' where a
    model cannot take an NFE; the cache key follows the overrides' words, not their spacing."""
    from benchmarks import variants

    scores = {"": {"1": {"sw2": 0.05, "nll": 5.5}, "2": {"sw2": 0.04, "nll": 6.0}},
              "--x 1": {"1": {"sw2": 0.5, "nll": 9.25}}}
    monkeypatch.setattr(variants, "run_variant", lambda args, tag, overrides: {
        "variant": tag, "overrides": overrides, "fit_command": f"fit {tag}", "train_wall_s": 90.4,
        "rows": scores[overrides]})
    out = variants.main(["--method", "cd", "--data", "tree", "--name", "t", "--out_dir", str(tmp_path / "new"),
                         "--nfe", "1", "2", "--extra", "nll", "--variant", "shipped", "", "--variant", "x", "--x 1"])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| variant | overrides | sw2 @1 | sw2 @2 | nll @1 | train s |"
    assert rows[1] == "| shipped | `(as shipped)` | 0.05 | 0.04 | 5.5 | 90 |"
    assert rows[2] == "| x | `--x 1` | 0.5 | – | 9.25 | 90 |"
    assert [v["variant"] for v in json.loads(out.with_suffix(".json").read_text())["variants"]] == ["shipped", "x"]
    with pytest.raises(SystemExit):
        variants.main(["--method", "cd", "--data", "tree", "--name", "t", "--out_dir", str(tmp_path),
                       "--variant", "a", "", "--variant", "a", "--x 1"])
    protocol = {"nfe": [1], "seeds": [0], "num": 10}
    key = variants.variant_key("cd", "tree", "--x  1", protocol)
    assert key == variants.variant_key("cd", "tree", "--x 1", protocol)
    assert key != variants.variant_key("cd", "tree", "--x 2", protocol)
    assert key != variants.variant_key("cd", "tree", "--x 1", {**protocol, "num": 20})


def test_variants_train_as_the_leaderboard_does(tmp_path, monkeypatch):
    """A variant of a method that reads teacher pairs trains on the leaderboard's pairs (its overrides after them),
    is scored with the leaderboard's sampling options, and a staged method is refused with the reason."""
    from benchmarks import variants

    seen = {}
    monkeypatch.setattr(variants, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(variants, "ensure_pairs", lambda method, data: ["--model.init_args.pairs_path", f"{method}.pt"])
    monkeypatch.setattr(variants, "train",
                        lambda entry, where, seed: (seen.update(entry=entry), "m.pt", 1.0, "fit")[1:])
    monkeypatch.setattr(variants, "load", lambda path: path)
    monkeypatch.setattr(variants, "evaluator", lambda data, seed: None)
    monkeypatch.setattr(variants, "score_model", lambda module, ev, nfes, seeds, num, options:
                        (seen.update(options=options), {1: {"fid": 5.0}})[1])
    args = variants.argparse.Namespace(method="dmd", data="digits", name="t", nfe=[1], seeds=[0], num=10)
    result = variants.run_variant(args, "a", "--model.init_args.reg_weight 0.5")
    assert seen["entry"] == {"config": "configs/dmd/digits.yaml", "fit_args": [
        "--model.init_args.pairs_path", "dmd.pt", "--model.init_args.reg_weight", "0.5"]}
    assert seen["options"] == {} and result["rows"] == {"1": {"fid": 5.0}}
    monkeypatch.setattr(variants, "SAMPLING", {"dmd": {"guidance_scale": 1.0}})
    variants.run_variant(args, "b", "")
    assert seen["options"] == {"guidance_scale": 1.0}
    with pytest.raises(SystemExit):
        variants.main(["--method", "guided_distillation", "--data", "digits", "--name", "t", "--variant", "a", ""])


def test_msd_run_names_read_back_to_their_kind():
    # benchmarks/msd.py's speed pass rebuilds each row's architecture from its kind: a name with both suffixes
    # (a non-default EMA and training seed) must still find it, and the defaults add no suffix
    from benchmarks.msd import SEED, base_run, run_name

    assert run_name("k2", None, SEED) == "k2"
    for kind in ("one", "k2", "k4_kmeans", "half_tsm", "half_none", "one_half_tsm"):
        for ema, seed, iterations, sb in [(None, 1, None, False), (0.99, SEED, None, False), (0.995, 2, None, True),
                                          (None, SEED, 5000, False), (None, SEED, None, True)]:
            name = run_name(kind, ema, seed, iterations, student_batch=sb)
            assert base_run(name) == kind and name != kind
    assert run_name("one", 0.99, 2) == "one_ema0.99_seed2"
    assert run_name("k4", 0.99, SEED, 5000) == "k4_ema0.99_it5000"
    assert run_name("k2", 0.99, 1, student_batch=True) == "k2_sb_ema0.99_seed1"
    assert run_name("k4", 0.99, 1, reg_weight=0.5) == "k4_reg0.5_ema0.99_seed1"
    assert base_run(run_name("one_half_tsm", 0.99, SEED, 5000, reg_weight=0.25)) == "one_half_tsm"
    assert run_name("k4", 0.99, SEED, 5000, reg_weight=0.5, lr=1.5e-4) == "k4_reg0.5_lr0.00015_ema0.99_it5000"
    assert run_name("k4", 0.99, SEED, lr=3e-4) == "k4_ema0.99"  # the default lr names nothing
    assert base_run(run_name("k4_kmeans", None, SEED, lr=1e-4)) == "k4_kmeans"
    assert run_name("half_tsm", 0.99, SEED, 8000, reg_weight=0.5, width=8) == "half_tsm_w8_reg0.5_ema0.99_it8000"
    assert base_run(run_name("one_half_tsm", 0.99, 1, width=8)) == "one_half_tsm"


def test_msd_speed_pass_measures_several_tables_in_one_interleaved_run(tmp_path, monkeypatch):
    # images/s ratios across tables (the full-width student in one, half-width students in another) must come from
    # one pass: every row of every named table measured in the same rounds, each table told the command that did it
    import json
    import torch
    from benchmarks import msd

    tables = {"a": [{"name": "one_reg0.5_ema0.99_it10000", "students": 1}],
              "b": [{"name": "half_tsm_reg0.5_ema0.99_seed1_it13000", "students": 4},
                    {"name": "one_reg0.5_ema0.99", "students": 1},
                    {"name": "half_tsm_w8_reg0.5_ema0.99", "students": 2, "width": {"model_channels": 8}}]}
    for tag, rows in tables.items():
        (tmp_path / f"msd_digits_{tag}.json").write_text(json.dumps({"lr": 3e-4, "results": rows}))
    order = []
    monkeypatch.setattr(msd, "RESULTS", tmp_path)
    monkeypatch.setattr(msd, "write_report", lambda: None)
    monkeypatch.setattr(msd, "runs_for", lambda *a, **k: [
        {"name": "one", "cls": "DMD2", "kw": {}},
        {"name": "half_tsm", "cls": "MSD", "kw": {"student_net": {"class_path": "UNet", "init_args": {}}}}])
    built = []
    def build(run, data, pairs):
        built.append(run["kw"].get("student_net", {}).get("init_args"))
        return torch.nn.Linear(1, run["students"])
    monkeypatch.setattr(msd, "build", build)
    def images_per_s(model, nfe):
        order.append(model.out_features)
        return 100.0 * model.out_features + len(order)
    monkeypatch.setattr(msd, "images_per_s", images_per_s)

    msd.measure_speed("digits", ["a", "b"], rounds=3)
    assert order == [1, 4, 1, 2] * 3  # interleaved: every row once per round, tables in the order given
    assert built[-1] == {"model_channels": 8}  # a --small_width row is rebuilt at the width it was trained at
    a, b = (json.loads((tmp_path / f"msd_digits_{t}.json").read_text()) for t in "ab")
    assert a["speed_command"] == b["speed_command"] == (
        "OMP_NUM_THREADS=1 python benchmarks/msd.py --data digits --speed --tag a --speed_with b")
    assert [x["images_per_s_rounds"] for x in a["results"] + b["results"]] == [[101, 105, 109], [402, 406, 410],
                                                                                [103, 107, 111], [204, 208, 212]]
    assert b["results"][0]["images_per_s"] == 406 and a["speed_load"] == b["speed_load"]


def test_guided_distillation_reads_a_fits_options_back_from_its_saved_config(tmp_path):
    """A fit made by hand with options is named with them in the results, not as the plain config: the options are
    the differences between the run's saved configuration (every default filled in, as LightningCLI saves it) and the
    config file."""
    import inspect

    import yaml

    from benchmarks.guided_distillation import fit_command_of
    from lit_fewstep.methods import GuidedDistillation

    config = "configs/guided_distillation/digits.yaml"
    saved = yaml.safe_load((ROOT / config).read_text())
    defaults = {name: list(p.default) if isinstance(p.default, tuple) else p.default
                for name, p in inspect.signature(GuidedDistillation).parameters.items()
                if p.default is not inspect.Parameter.empty}
    saved["model"]["init_args"] = {**defaults, **saved["model"]["init_args"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert fit_command_of(tmp_path, config) == f"python -m lit_fewstep fit --config {config}"

    saved["seed_everything"] = 1
    saved["trainer"]["max_steps"] = 10000
    saved["trainer"]["logger"]["init_args"]["save_dir"] = "benchmarks/runs/gd128"
    saved["model"]["init_args"].update(teacher_steps=128, pin_unguided=True, guidance_range=[1.0, 3.0])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert fit_command_of(tmp_path, config) == (
        f"python -m lit_fewstep fit --config {config} --seed_everything 1 --trainer.max_steps 10000 "
        "--trainer.logger.init_args.save_dir "
        "benchmarks/runs/gd128 --model.init_args.guidance_range [1.0,3.0] --model.init_args.pin_unguided true "
        "--model.init_args.teacher_steps 128")
