"""Conformance: every method of `tests/conformance_methods.py::METHODS` goes through the same checks.

- it trains 3 iterations on its toy configuration, every phase active there logging a finite loss;
- `sample` at every NFE it supports spends exactly that NFE (reported and counted at the network);
- export and reload give bit-identical samples;
- resume is bit-exact when cut inside epoch 0, exactly at the epoch boundary and inside epoch 1 (with a
  different global seed at resume, on a data set whose size is not a multiple of the batch);
- frozen networks (a teacher with dropout here) stay in eval mode after fit, after `sample()` during training and
  after a sample-grid callback;
- a NaN loss in each phase stops training with an error naming that phase;
- a bad NFE is refused with the method's limit in the message.

A new method joins by adding one line to `METHODS`; `test_every_method_is_in_the_registry` makes sure none is left out.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lit_fewstep.methods as methods_package
from conformance_methods import BATCHES_PER_EPOCH, METHODS, build, data, fit, supported_nfes, teacher_path
from lit_fewstep.methods.base import FewStepModule, NonFiniteError
from lit_fewstep.metrics import SampleGridCallback
from lit_fewstep.nets import MLP
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module

pytestmark = [
    pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"),
    pytest.mark.usefixtures("float32_default_dtype"),
]

# 10 batches per epoch: 5 is inside epoch 0, 10 exactly at the first epoch boundary, 15 inside epoch 1.
RESUME_POINTS = (5, 10, 15)
RESUME_END = 18
FIT_ITERATIONS = 3


def test_every_method_is_in_the_registry():
    exported = {obj for obj in vars(methods_package).values()
                if isinstance(obj, type) and issubclass(obj, FewStepModule) and obj is not FewStepModule}
    registered = {type(build(name)) for name in METHODS}
    missing = sorted(cls.__name__ for cls in exported - registered)
    assert not missing, f"add these methods to tests/conformance_methods.py::METHODS: {missing}"


# ----------------------------------------------------------------------------------------------- frozen networks
def _is_average(name: str) -> bool:
    """Sampling EMAs and the consistency target average the trained network and follow the module's mode (the
    target replays the student's dropout masks); they are not frozen networks."""
    return name == "ema" or name.startswith("ema_") or name == "target"


def frozen_networks(module: FewStepModule) -> dict[str, nn.Module]:
    """The module's frozen networks: those it registers as frozen, and any child network with parameters of which
    none is trainable (other than the averages above)."""
    names = set(getattr(module, "frozen_names", ()))
    for name, child in module.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params) and not _is_average(name):
            names.add(name)
    return {name: module._modules[name] for name in sorted(names) if module._modules.get(name) is not None}


def frozen_in_train_mode(module: FewStepModule) -> list[str]:
    """Frozen networks with any of their modules in training mode."""
    return [name for name, net in frozen_networks(module).items() if any(m.training for m in net.modules())]


class FrozenProbe(Callback):
    """Records frozen networks left in training mode: at each batch start (after the previous batch's callbacks,
    when the next loss is about to use them), after the sample-grid callback (listed before this probe), and after
    a `sample()` call made here during training. Also keeps the generator's weights when training starts."""

    def __init__(self):
        self.violations: list[tuple[str, int, list[str]]] = []
        self.initial: list[torch.Tensor] = []

    def _check(self, when: str, module) -> None:
        bad = frozen_in_train_mode(module)
        if bad:
            self.violations.append((when, int(module.iteration), bad))

    def on_train_start(self, trainer, pl_module):
        self.initial = [p.detach().clone() for p in pl_module.generator.parameters()]
        self._check("at train start", pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check("at batch start", pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check("after the sample-grid callback", pl_module)
        pl_module.sample(4, 1, generator=torch.Generator().manual_seed(0))
        self._check("after sample() during training", pl_module)


@dataclass
class Fitted:
    module: FewStepModule
    trainer: object
    probe: FrozenProbe
    sample_calls: int
    grid_nfes: int
    teacher: Path


_fitted: dict[str, Fitted] = {}


def fitted(name: str, tmp_path_factory) -> Fitted:
    """The method trained FIT_ITERATIONS iterations (once per session) with a dropout teacher, a TensorBoard logger,
    a sample-grid callback every iteration and the frozen-network probe."""
    if name not in _fitted:
        root = tmp_path_factory.mktemp(f"fit_{name}")
        teacher = root / "teacher.pt"  # this run's own copy: the export check hides it
        shutil.copy(teacher_path(dropout=0.5), teacher)
        probe = FrozenProbe()
        calls = []

        def make():
            module = build(name, str(teacher))
            original = module.sample

            def counting(*args, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            module.sample = counting
            return module

        grid_nfes = supported_nfes(build(name))[:2]
        module, run = fit(make, root, FIT_ITERATIONS,
                          [SampleGridCallback(every_n_iterations=1, nfe=grid_nfes, num=16), probe],
                          logger=TensorBoardLogger(str(root), name="tb", version="v"), log_every_n_steps=1)
        del module.sample
        _fitted[name] = Fitted(module, run, probe, len(calls), len(grid_nfes), teacher)
    return _fitted[name]


# ----------------------------------------------------------------------------------------------- helpers
def _checkpoint_at(directory, iteration):
    for path in sorted(directory.glob("step=*.ckpt")):
        if int(load_checkpoint(path)["state_dict"]["iteration"]) == iteration:
            return path
    raise AssertionError(f"no checkpoint at iteration {iteration} in {directory}")


def _different_state(a: nn.Module, b: nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:5]
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def _count_network_rows(module: nn.Module):
    """Rows fed to every MLP inside `module`, per call (NFE per sample = rows / n, whatever the routing)."""
    rows: list[int] = []

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["x"]
        rows.append(int(x.shape[0]))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, MLP)]
    assert handles, f"no MLP inside {type(module).__name__}"
    return rows, handles


class PrecisionProbe(Callback):
    """Under bf16-mixed: records every loss (dtype, finite, whether autocast was on), the output dtypes of the module's
    networks (hooks registered after the module's own, so they see what leaves a network) and whether any linear
    layer inside actually ran in bfloat16 (else the check would check nothing)."""

    def __init__(self):
        self.losses: list[tuple[str, bool, torch.dtype, bool]] = []
        self.outputs: dict[str, set] = {}
        self.half_inside = False

    def on_train_start(self, trainer, pl_module):
        for phase in pl_module.phases:
            original = getattr(pl_module, phase.loss)

            def spied(*args, _original=original, _name=phase.name, **kwargs):
                loss = _original(*args, **kwargs)
                autocast = torch.is_autocast_enabled(loss.device.type)
                self.losses.append((_name, autocast, loss.dtype, bool(torch.isfinite(loss))))
                return loss

            setattr(pl_module, phase.loss, spied)
        for name, child in pl_module.named_children():
            child.register_forward_hook(lambda m, a, out, _name=name: self.outputs.setdefault(_name, set()).update(
                t.dtype for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t)))
        for module in pl_module.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(
                    lambda m, a, out: setattr(self, "half_inside", self.half_inside or out.dtype == torch.bfloat16))


def _nan_loss(batch, *args, **kwargs):
    return torch.tensor(float("nan"), requires_grad=True)


def _refusal(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


# ----------------------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("name", list(METHODS))
class TestConformance:
    def test_fits_three_iterations(self, name, tmp_path_factory):
        run = fitted(name, tmp_path_factory)
        module = run.module
        assert int(module.iteration) == FIT_ITERATIONS
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(run.probe.initial, module.generator.parameters())), \
            "the generator did not change"
        for phase in module.phases:
            if any(phase.active(k) for k in range(FIT_ITERATIONS)):
                loss = run.trainer.callback_metrics.get(f"train/{phase.name}_loss")
                assert loss is not None and math.isfinite(float(loss)), (phase.name, loss)

    def test_bf16_mixed_keeps_float32_between_networks(self, name, tmp_path):
        """bf16 autocast inside the networks, float32 outside them (FewStepModule's precision policy): every loss and
        every network output is float32, parameters and EMAs stay float32, and the layers really ran in bfloat16."""
        probe = PrecisionProbe()
        module, _ = fit(lambda: build(name), tmp_path, FIT_ITERATIONS, [probe], precision="bf16-mixed")
        assert int(module.iteration) == FIT_ITERATIONS
        assert probe.half_inside, "no layer ran in bfloat16: autocast was off"
        assert probe.losses and all(autocast for _, autocast, _, _ in probe.losses)
        assert all(dtype == torch.float32 and finite for _, _, dtype, finite in probe.losses), probe.losses
        half_outputs = {net: dtypes for net, dtypes in probe.outputs.items() if dtypes - {torch.float32, torch.long}}
        assert not half_outputs, f"networks handing half-precision tensors to the method: {half_outputs}"
        assert all(t.dtype == torch.float32 for t in module.state_dict().values() if t.is_floating_point())

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine (benchmarks/gpu/)")
    def test_trains_and_samples_on_cuda_in_bf16_mixed(self, name, tmp_path):
        """The bf16 check above on a GPU, then sampling there at every supported NFE with the exact count."""
        probe = PrecisionProbe()
        module, _ = fit(lambda: build(name), tmp_path, FIT_ITERATIONS, [probe], accelerator="gpu",
                        precision="bf16-mixed")
        assert int(module.iteration) == FIT_ITERATIONS and probe.half_inside
        assert all(autocast and dtype == torch.float32 and finite for _, autocast, dtype, finite in probe.losses)
        module = module.cuda().eval()
        for nfe in supported_nfes(module):
            out = module.sample(16, nfe, generator=torch.Generator().manual_seed(nfe))  # noise drawn on the CPU
            assert out.nfe == nfe and out.x.device.type == "cuda" and torch.isfinite(out.x).all()

    def test_sample_spends_exactly_the_requested_nfe(self, name, tmp_path_factory):
        module = fitted(name, tmp_path_factory).module
        n = 16
        rows, handles = _count_network_rows(module.sampling_network())
        try:
            for nfe in supported_nfes(module):
                rows.clear()
                out = module.sample(n, nfe, generator=torch.Generator().manual_seed(nfe))
                assert out.nfe == nfe, (nfe, out.nfe)
                assert sum(rows) == nfe * n, f"asked {nfe} NFE, the network saw {sum(rows) / n} per sample"
                assert out.x.shape == (n, 2) and torch.isfinite(out.x).all()
                assert out.labels is not None and out.labels.shape == (n,)
        finally:
            for handle in handles:
                handle.remove()

    def test_export_and_reload_give_identical_samples(self, name, tmp_path_factory):
        run = fitted(name, tmp_path_factory)
        module = run.module
        path = tmp_path_factory.mktemp(f"export_{name}") / "model.pt"
        module.export(str(path))
        unsaved = [k for k in load_checkpoint(path)["state_dict"] if k.startswith(tuple(module.unsaved_prefixes))]
        assert not unsaved, f"the export holds networks that are loaded from their own files: {unsaved[:3]}"
        fit_ckpt = path.with_name("fit.ckpt")  # what `sample --ckpt last.ckpt` reads: critics and all
        run.trainer.save_checkpoint(str(fit_ckpt))
        hidden = run.teacher.rename(run.teacher.with_name("hidden.pt"))  # an exported model samples without it
        try:
            for loaded in (load_module(path), load_module(fit_ckpt)):
                assert type(loaded) is type(module)
                for nfe in supported_nfes(module):
                    a = module.sample(16, nfe, generator=torch.Generator().manual_seed(7))
                    b = loaded.sample(16, nfe, generator=torch.Generator().manual_seed(7))
                    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels) and a.nfe == b.nfe, nfe
                assert not frozen_networks(loaded), f"sampling loaded {list(frozen_networks(loaded))}"
        finally:
            hidden.rename(run.teacher)

    def test_frozen_networks_stay_in_eval_mode(self, name, tmp_path_factory):
        run = fitted(name, tmp_path_factory)
        module = run.module
        if getattr(module, "teacher_ckpt", None):  # the check must see the teacher, and the teacher has dropout
            teacher = frozen_networks(module).get("teacher")
            assert teacher is not None, f"{name}: teacher not found among frozen networks {list(frozen_networks(module))}"
            assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in teacher.modules())
        # the grid drew every iteration, the probe sampled every iteration
        assert run.sample_calls == FIT_ITERATIONS * (run.grid_nfes + 1), run.sample_calls
        assert not run.probe.violations, run.probe.violations
        assert not frozen_in_train_mode(module), "after fit"
        module.train()
        assert not frozen_in_train_mode(module), "after module.train()"
        module.sample(4, 1, generator=torch.Generator().manual_seed(0))
        assert not frozen_in_train_mode(module), "after sample() in training mode"
        assert module.training  # sample() gives the mode back

    def test_resume_is_bit_exact_inside_and_across_epochs(self, name, tmp_path):
        loader = data()
        loader.setup("fit")
        assert len(loader.train_dataloader()) == BATCHES_PER_EPOCH  # the cuts are where RESUME_POINTS says

        def make():
            return build(name)

        full, _ = fit(make, tmp_path / "full", RESUME_END)
        assert int(full.iteration) == RESUME_END
        ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        fit(make, tmp_path / "cut", max(RESUME_POINTS), [ckpts], enable_checkpointing=True)
        failures = {}
        for cut in RESUME_POINTS:
            # A different global seed at resume must not matter: the run's own seed and RNG streams come back.
            resumed, _ = fit(make, tmp_path / f"resumed_{cut}", RESUME_END, seed=123,
                             ckpt_path=_checkpoint_at(tmp_path / "ckpts", cut))
            assert int(resumed.iteration) == RESUME_END, cut
            different = _different_state(full, resumed)
            if different:
                failures[cut] = different[:5]
        # A chain: resumed at the epoch boundary, stopped inside the next epoch, and resumed from there again.
        boundary = RESUME_POINTS[1]
        chain = ModelCheckpoint(dirpath=tmp_path / "chain", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        fit(make, tmp_path / "chain_first", RESUME_POINTS[2], [chain], enable_checkpointing=True,
            ckpt_path=_checkpoint_at(tmp_path / "ckpts", boundary))
        resumed, _ = fit(make, tmp_path / "chain_second", RESUME_END, ckpt_path=_checkpoint_at(tmp_path / "chain",
                                                                                               RESUME_POINTS[2]))
        different = _different_state(full, resumed)
        if different:
            failures[f"{boundary} then {RESUME_POINTS[2]}"] = different[:5]
        assert not failures, f"resumed state differs from the uninterrupted run (cut: first keys): {failures}"

    def test_nan_loss_stops_naming_the_phase(self, name, tmp_path):
        for phase in build(name).phases:
            first = next(k for k in range(1000) if phase.active(k))

            def make(loss=phase.loss):
                module = build(name)
                setattr(module, loss, _nan_loss)
                return module

            pattern = rf"non-finite loss in phase '{re.escape(phase.name)}' at iteration {first}\b"
            with pytest.raises(NonFiniteError, match=pattern):
                fit(make, tmp_path / phase.name, first + 1)

    def test_bad_nfe_is_refused_with_the_limit(self, name):
        module = build(name)
        for call in (lambda: module.check_nfe(0), lambda: module.sample(2, 0)):
            message = _refusal(call)
            assert message.startswith("nfe:") and ">= 1" in message and "got 0" in message, message
        if module.max_nfe is not None:
            module.check_nfe(module.max_nfe)  # the limit itself is allowed
            bad = module.max_nfe + 1
            for call in (lambda: module.check_nfe(bad), lambda: module.sample(2, bad)):
                message = _refusal(call)
                assert message.startswith("nfe:") and re.search(rf"\b{module.max_nfe}\b", message), message
                assert f"got {bad}" in message, message


# The step count a method is drawn with when none is asked for (the picture that ends every fit): the generator's own
# steps, never the teacher's 35-step ODE budget for a few-step student (sCD's CIFAR-10 dry run spent minutes there).
DEFAULT_NFE = {"edm": 35, "flow_matching": 35, "cd": 1, "ct": 1, "ict": 1, "scd": 1, "sct": 1, "dmd": 1, "dmd2": 2,
               "msd": 2, "ctm": 1, "caf": 2, "caf_2rf": 1, "flow_map": 1}
DEFAULT_NFE["analog_bits"] = 10  # the conformance configuration's own step count (steps=10)
DEFAULT_NFE["lowdiff"] = 35  # the EDM budget at its one level (the 2-D configuration)
DEFAULT_NFE["msd_shared_critic"] = DEFAULT_NFE["msd"]  # the same two generator sigmas


@pytest.mark.parametrize("name", list(METHODS))
def test_default_nfe_is_the_generators_own(name):
    module = build(name)
    if name == "guided_distillation":  # stage 1 (any step count), then the halving stages 4, 2, 1
        assert [module.current_steps(k) for k in (0, 4, 8, 12)] == [None, 4, 2, 1]
        expected = {0: 35, 4: 4, 8: 2, 12: 1}
        for iteration, nfe in expected.items():
            module.iteration.fill_(iteration)
            assert module.default_nfe == nfe, iteration
        return
    assert module.default_nfe == DEFAULT_NFE[name]
    module.sample(2, module.default_nfe, generator=torch.Generator().manual_seed(0))
