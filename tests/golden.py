"""Golden losses: the exact per-phase losses of a method's tree config over its first iterations.

`record_losses("dmd2")` builds the model and data module of ``configs/dmd2/tree.yaml`` through the package's own
CLI (``FewStepCLI(..., run=False)``, as ``python -m lit_fewstep fit --config ...`` would), trains it on CPU for
exactly `iterations` iterations of the module's own ``iteration`` counter (a phase schedule may take several
optimizer steps per iteration) at seed 0, with the logger, checkpointing, validation, the progress bar and the
config's callbacks off, and returns every value logged under ``train/<name>_loss``, in order, as the exact
float of the tensor passed to ``self.log``. That covers every phase's loss (``train/<phase>_loss``, logged once
per optimizer step by ``FewStepModule.training_step``, so a repeated phase logs several values per iteration)
and the component losses some methods log inside their phase losses (e.g. DMD's ``train/dm_loss``).

`tests/make_golden_losses.py` writes them to ``tests/golden_losses.json``; `tests/test_golden_losses.py`
re-records them and asserts bit-equality.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import LightningDataModule

from conftest import StopAtIteration
from lit_fewstep.utils.machine import cpu_name
from lit_fewstep.utils.runs import working_directory

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
ITERATIONS = 5
LOSS_NAME = re.compile(r"^train/.+_loss$")

# Teacher ODE pairs for configs/dmd/tree.yaml, made as its comments say (python -m lit_fewstep.data.pairs
# --teacher lit_fewstep/assets/edm_tree.pt --num 4096 --nfe 35 --out ...; default --seed 0), into a temporary
# directory; its path replaces the config's runs/pairs/edm_tree.pt.
DMD_PAIRS_ARGS = ["--teacher", "lit_fewstep/assets/edm_tree.pt", "--num", "4096", "--nfe", "35", "--seed", "0"]


# Bit-exact goldens hold on the processor they were recorded on: another vendor's math kernels (oneDNN / MKL take
# other code paths on Intel and AMD) round some float32 results differently in the last bit. The top-level records
# of tests/golden_{losses,samples}.json were made on the CPU every CI run had until 2026-12-01 (an AMD EPYC, the model
# name starting with REFERENCE_CPU); `other_cpus` holds records of the same code made on other processors (the
# make_golden_* scripts' --this-cpu). On a processor with no record, values are compared within CROSS_CPU_RTOL.
REFERENCE_CPU = "AMD EPYC"
CROSS_CPU_RTOL = 1e-4


def record_for_this_cpu(golden: dict, section: str, name: str) -> tuple[dict, bool, str]:
    """(record, exact, where): the golden `section`'s record `name` made on this processor (compare bit-exactly),
    or the reference record to compare within CROSS_CPU_RTOL: on a processor with no records, and for a record
    dropped from this processor's set when it was re-made on the reference CPU (the file's `updates`)."""
    model = cpu_name()
    if model.startswith(REFERENCE_CPU):
        return golden[section][name], True, f"reference records ({REFERENCE_CPU})"
    mine = golden.get("other_cpus", {}).get(model, {}).get(section)
    if mine is None:
        why = f"no record for {model}"
    elif name not in mine:
        why = f"{name} not recorded on {model} since its last update"
    else:
        return mine[name], True, f"records made on {model}"
    return golden[section][name], False, f"reference records ({REFERENCE_CPU}) within rtol {CROSS_CPU_RTOL}: {why}"


def tree_configs() -> dict[str, str]:
    """{method: "configs/<method>/tree.yaml"} for every method with a tree config."""
    return {p.parent.name: str(p.relative_to(ROOT)) for p in sorted((ROOT / "configs").glob("*/tree.yaml"))}


def config_path(method_config: str) -> str:
    """A method name ("dmd2") means configs/<method>/tree.yaml; anything else is a config path."""
    if method_config.endswith((".yaml", ".yml")):
        return method_config
    return f"configs/{method_config}/tree.yaml"


@dataclass
class Recording:
    config: str
    iterations: int
    seed: int
    overrides: dict[str, str]
    losses: dict[str, list[float]] = field(default_factory=dict)
    # the module's iteration counter when each value was logged (same shape as `losses`)
    loss_iterations: dict[str, list[int]] = field(default_factory=dict)


# Hyperparameters a record was made with where the config has since moved to other values: the record still checks
# the same loss computation. CT's tree config now ends its curriculum at s1 = 20 with mu0 = 0.5 (a 1,500-iteration CPU
# budget: benchmarks/results/ct_tree_budget.md); its record was made at the paper's s1 = 150, mu0 = 0.9.
PINNED = {"configs/cd/tree.yaml": {"model.init_args.target_mu": "0.0"},  # the config's EMA target came later
          "configs/ct/tree.yaml": {"model.init_args.s1": "150", "model.init_args.mu0": "0.9"},
          # sCD's tree config now starts from the teacher, where the first losses are ~1e-10 (F = F- = the teacher's
          # velocity: rounding noise, not a cross-CPU record); the record keeps the random start it was made with
          "configs/scd/tree.yaml": {"model.init_args.init_from_teacher": "false",
                                    "model.init_args.preconditioning": "trigflow", "model.init_args.lr": "0.001"}}


def _overrides(config: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """CLI arguments a config needs to run here (files it points at, pinned values), and how they are described in
    the JSON."""
    import yaml

    cfg = yaml.safe_load((ROOT / config).read_text())
    init_args = (cfg.get("model") or {}).get("init_args") or {}
    args, described = [], {}
    for key, value in PINNED.get(config, {}).items():
        args += [f"--{key}", value]
        described[key] = f"{value} (pinned: the value this record was made with)"
    pairs_path = init_args.get("pairs_path")
    if pairs_path:
        # made afresh every time (never a user's runs/ file, which may be stale or missing)
        from lit_fewstep.cli import pairs_main as make_pairs_main

        out = workdir / "pairs.pt"
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            make_pairs_main([*DMD_PAIRS_ARGS, "--out", str(out)])
        args += ["--model.init_args.pairs_path", str(out)]
        described["model.init_args.pairs_path"] = (
            f"TMP/pairs.pt from `python -m lit_fewstep.data.pairs {' '.join(DMD_PAIRS_ARGS)} --out TMP/pairs.pt` "
            f"(replaces {pairs_path})")
    return args, described


def record(method_config: str, iterations: int = ITERATIONS, seed: int = SEED) -> Recording:
    """Train a tree config for `iterations` iterations (see the module docstring) and capture its losses."""
    from lit_fewstep.cli import FewStepCLI, FewStepTrainer
    from lit_fewstep.methods.base import FewStepModule

    torch.set_num_threads(1)
    config = config_path(method_config)
    with tempfile.TemporaryDirectory(prefix="golden_") as tmp, working_directory(ROOT):
        workdir = Path(tmp)
        extra, described = _overrides(config, workdir)
        L.seed_everything(seed, verbose=False)
        cli = FewStepCLI(FewStepModule, LightningDataModule, trainer_class=FewStepTrainer, subclass_mode_model=True,
                         subclass_mode_data=True, auto_configure_optimizers=False, run=False,
                         args=["--config", config, "--seed_everything", str(seed), "--trainer.logger", "false",
                               *extra])
        module, datamodule = cli.model, cli.datamodule

        rec = Recording(config=config, iterations=iterations, seed=seed, overrides=described)
        log = module.log

        def capturing_log(name, value, *args, **kwargs):
            if LOSS_NAME.match(name):
                v = float(value.item() if isinstance(value, torch.Tensor) else value)
                rec.losses.setdefault(name, []).append(v)
                rec.loss_iterations.setdefault(name, []).append(int(module.iteration))
            return log(name, value, *args, **kwargs)

        module.log = capturing_log
        trainer = FewStepTrainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(workdir),
                                 callbacks=[StopAtIteration(iterations)])
        L.seed_everything(seed, verbose=False)
        trainer.fit(module, datamodule=datamodule)
        del module.log
        if int(module.iteration) != iterations:
            raise RuntimeError(f"{config}: stopped at iteration {int(module.iteration)}, not {iterations}")
    return rec


def record_losses(method_config: str, iterations: int = ITERATIONS) -> dict[str, list[float]]:
    """{log name: [every value logged, in order]} for `iterations` iterations of a tree config at seed 0."""
    return record(method_config, iterations).losses
