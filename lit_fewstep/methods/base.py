"""FewStepModule: the shared machinery of every method.

A method is a LightningModule that
- holds named networks (student/generator, frozen teacher, fake score, discriminator, ...),
- declares its update schedule as data: a list of `Phase`s (loss, optimizer, frequency, repeats)
  that `training_step` runs with manual optimization (two-time-scale rules are phases with
  different `every`),
- keeps an EMA of its generator (student only: teachers and critics are never averaged),
- answers `sample(n, nfe, class_labels, generator)` the same way for every method, reporting the
  network evaluations actually spent.

Schedules run on `self.iteration` (one per training batch, saved in checkpoints), never on
`trainer.global_step`, which under manual optimization counts optimizer steps.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, split_batch
from ..diffusion.precond import PreconditionedNet
from ..teachers.formats import external_teacher, specialize
from ..utils.checkpoint import FORMAT_KEY, atomic_save, load_module, save_safetensors
from ..utils.config import Configurable
from ..utils.preemption import AtomicCheckpointIO, PreemptionCheckpoint
from ..utils.progress import IterationProgressBar

# Lightning warns that under manual optimization a periodic checkpoint holds the weights after the optimizer step.
# Here that is the intended state: checkpoints fall between iterations, with `iteration` already advanced, which is
# what exact resume needs (tests/test_conformance.py).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
# Frozen networks (teachers, guides) are in eval mode on purpose (see FewStepModule.register_frozen).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Every other message a run printed that does not concern its user (all the silencing is here, one reason each):
# - the CLI passes its arguments explicitly (main() takes them from sys.argv, less --debug): no mistake to warn of
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
# - the interval counts batches across epochs (Lightning's `_batches_that_stepped`), so runs of short epochs log fine
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# - data modules offer a validation split for the callbacks and the teachers; methods without validation need none
warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
# - deprecations inside Lightning's and torchdata's own code (lightning/pytorch/utilities/_pytree.py, set_vital)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


# ----------------------------------------------------------------------------------------------- mixed precision
# The precision policy of every method, decided here once (docs/precision.md). Under `--trainer.precision bf16-mixed`
# or `16-mixed` Lightning runs each training step inside torch.autocast: the networks' matrix products and
# convolutions run in half precision, which is where the time goes. Everything *between* networks stays float32,
# because the papers' arithmetic there does not survive 8 (bf16) or 11 (fp16) significant bits: EDM's skip
# c_skip x + c_out F at sigma = 80, sCM's tangent g and its normalisation g / (||g|| + c) built from a JVP, the
# losses and their reductions over a batch, GAN logits, the samplers' updates. So every network's output (and its
# JVP tangent) is cast to float32 where it leaves the network; parameters, optimizer states and EMAs are float32
# (mixed, not true, half precision). Half-precision types only: a float64 run stays float64.
_HALF = (torch.float16, torch.bfloat16)


def _to_float32(output):
    if torch.is_tensor(output):
        return output.float() if output.dtype in _HALF else output
    if isinstance(output, (tuple, list)):
        return type(output)(_to_float32(o) for o in output)
    if isinstance(output, dict):
        return {k: _to_float32(v) for k, v in output.items()}
    return output


def _float32_output_hook(module: nn.Module, args, output):
    return _to_float32(output)


def float32_jvp(fn, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]):
    """`torch.func.jvp` with autocast off and float32 primals and tangents: forward-mode derivatives run in float32
    in every precision. (Under autocast the forward-mode rule of a convolution meets a half-precision weight with a
    float32 tangent and fails; and sCM's / AYF's tangents are differences of nearly equal terms.)"""
    with torch.autocast(primals[0].device.type, enabled=False):
        return torch.func.jvp(fn, tuple(_to_float32(p) for p in primals), tuple(_to_float32(t) for t in tangents))


def float32_outputs(network: nn.Module) -> nn.Module:
    """Cast the half-precision outputs of `network`, and of the raw network inside each of its preconditioners (the
    preconditioning then runs in float32), to float32. Idempotent (a mark travels with deep copies, as the hook does)."""
    for module in [network, *(m.net for m in network.modules() if isinstance(m, PreconditionedNet))]:
        if not getattr(module, "_float32_outputs", False):
            module.register_forward_hook(_float32_output_hook)
            module._float32_outputs = True
    return network


class _QuietLightning(logging.Filter):
    """Lightning's info lines that are not about the run: advertisements for its cloud products, the default it
    picks for a flag of its own checkpoint saving, and the progress bar that FewStepModule replaces on purpose."""

    PREFIXES = ("\N{ELECTRIC LIGHT BULB} Tip: ", "`weights_only` was not set, defaulting to")
    EXACT = ("The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
             "callbacks passed to Trainer: TQDMProgressBar",)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.PREFIXES) or message in self.EXACT)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
              "lightning.pytorch.trainer.connectors.checkpoint_connector"):
    logging.getLogger(_name).addFilter(_QuietLightning())

__all__ = ["Phase", "Samples", "FewStepModule", "NonFiniteError", "load_teacher"]


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}


@dataclass
class Phase:
    """One loss of the update schedule and the optimizer(s) it steps.

    Args:
        name: logged as ``train/<name>_loss``.
        loss: name of the module method ``loss(batch) -> scalar``.
        networks: submodules this phase trains, as attribute paths (``"G"``, ``"G.members.0"``); with `separate`,
            an entry may be a tuple of paths that share one optimizer.
        every: run on iterations k with (k - start) % every == 0 and start <= k < stop.
        repeats: optimizer steps per active iteration (same batch, fresh noise).
        start, stop: the iteration range [start, stop) of the phase (stop None: no end).
        optimizer: "adamw", "adam" or "radam" (the papers use all three).
        lr, betas, weight_decay: its settings.
        warmup: linear learning-rate warm-up over this many of the phase's own optimizer steps (0: none).
        decay_after: EDM2's inverse-square-root decay, lr / sqrt(step / decay_after) once the phase has taken more
            than this many optimizer steps (0: constant); official sCD on ImageNet-64 decays after 35k of 600k steps.
        anneal: linear decay to zero over this many of the phase's optimizer steps, zero after (0: none); the
            progressive-distillation code's schedule within each halving.
        separate: one optimizer (and one gradient clip) per entry of `networks` instead of one for all of them;
            the loss is still computed and back-propagated once. For networks trained independently on one
            batched loss (MSD's students).
        updates_ema: update the generator EMAs after each step of this phase.
    """

    name: str
    loss: str
    networks: tuple[str | tuple[str, ...], ...]
    every: int = 1
    repeats: int = 1
    start: int = 0
    stop: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0
    decay_after: int = 0
    anneal: int = 0
    separate: bool = False
    updates_ema: bool = False

    def __post_init__(self):
        self.networks = tuple(self.networks)
        if (self.every < 1 or self.repeats < 1 or self.start < 0 or self.warmup < 0 or self.decay_after < 0
                or self.anneal < 0):
            raise ValueError(
                f"schedule: phase {self.name!r} needs every >= 1, repeats >= 1, start >= 0, warmup >= 0, "
                f"decay_after >= 0 and anneal >= 0 (got every={self.every}, repeats={self.repeats}, "
                f"start={self.start}, warmup={self.warmup}, decay_after={self.decay_after}, anneal={self.anneal})."
            )
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"schedule: phase {self.name!r} stops at {self.stop}, not after its start {self.start}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"schedule: phase {self.name!r} optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")

    def active(self, iteration: int) -> bool:
        return (self.start <= iteration and (self.stop is None or iteration < self.stop)
                and (iteration - self.start) % self.every == 0)

    @property
    def network_paths(self) -> tuple[str, ...]:
        return tuple(p for entry in self.networks for p in ((entry,) if isinstance(entry, str) else entry))

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes over the phase's steps (else the optimizer's own lr is left alone)."""
        return bool(self.warmup or self.decay_after or self.anneal)

    def lr_at(self, step: int) -> float:
        """Learning rate at the phase's `step`-th optimizer step (0-based): linear warm-up, constant, then (with
        `decay_after`) EDM2's lr / sqrt(max((step + 1) / decay_after, 1)); (with `anneal`) times
        max(1 - step / anneal, 0)."""
        lr = self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr
        if self.decay_after:
            lr /= math.sqrt(max((step + 1) / self.decay_after, 1.0))
        if self.anneal:
            lr *= max(1.0 - step / self.anneal, 0.0)
        return lr


@dataclass
class Stage:
    """A range of iterations [start, stop) with its own phases (e.g. a warm-up stage, then distillation, or
    the successive halvings of progressive distillation). `on_enter` names a module method called once, when
    the first iteration of the stage begins (re-initialise a student from the previous one, freeze the previous
    stage's network as the new teacher); it must leave the module in a state a checkpoint captures, because a
    run resumed inside the stage does not call it again."""

    name: str
    start: int
    stop: int | None
    phases: list[Phase]
    on_enter: str | None = None


@dataclass
class FrozenNetwork:
    """A registry entry: where a frozen network comes from and whether checkpoints hold it."""

    path: str | None  # loaded from this checkpoint on first use (never saved), or None: made in memory (saved)
    field: str  # the config field named in error messages


@dataclass
class Samples:
    """What `sample()` returns: samples [N, ...] in data units, labels [N] or None, NFE per sample."""

    x: Tensor
    labels: Tensor | None
    nfe: int
    extras: dict[str, Any] = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf; the message names method, phase, step and tensor."""


def load_teacher(path: str, trust: bool = False, field_name: str = "teacher_ckpt", opt_in: str | None = None) -> nn.Module:
    """The EMA generator of a trained lit_fewstep module (.pt/.ckpt, or .safetensors), frozen (requires_grad False,
    eval mode); or a diffusers folder / ``diffusers:PATH`` as a `teachers.DiffusersTeacher`.

    `opt_in`: how the caller's user allows pickle (e.g. "--trust_checkpoint true"); None where no opt-in is
    offered (a method's `teacher_ckpt`), and the error then says how to re-save a trusted file weights-only.
    """
    external = external_teacher(path, field_name)  # a diffusers folder or diffusers:PATH (lit_fewstep.teachers)
    if external is not None:
        return external
    module = load_module(path, trust=trust, field=field_name, opt_in=opt_in)
    teacher = module.ema if getattr(module, "ema", None) is not None else module.generator
    teacher = specialize(copy.deepcopy(teacher))
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


class FewStepModule(Configurable, L.LightningModule):
    """Base class of every method; subclasses set `self.phases` and implement their losses and `_sample`.

    Args:
        ema_decay: per-iteration EMA decay of the generator (0 disables the EMA).
        grad_clip: max gradient norm per phase (0 disables clipping).
        nonfinite: what a NaN/Inf loss or gradient does: "stop" (raise; checkpoints already written stay
            intact) or "skip" (drop that step and count it in ``train/skipped_steps``). A skipped step still
            counts toward the trainer's ``max_steps`` (the optimizer steps with no gradient and changes nothing), so a
            run with skips ends at the iteration it was scheduled to end at.
        max_consecutive_skips: with "skip", stop with an error once this many iterations in a row had a skipped
            step (a run that only skips would otherwise never learn anything and never end).
    """

    # Submodules that are not written to checkpoints (re-loaded from their own file).
    unsaved_prefixes: tuple[str, ...] = ("teacher.",)
    # Networks that only training builds (e.g. DMD's critic, made from the teacher in `configure_model`): a fit
    # checkpoint holds them, a module rebuilt for sampling (`utils.checkpoint.load_module`) has none and skips them.
    training_only_prefixes: tuple[str, ...] = ()
    # Training bookkeeping that an exported file may lack (it then starts at zero).
    optional_state_keys: tuple[str, ...] = ("iteration", "skipped_steps", "rng_seed", "ema_updates", "stage_entered")
    generator_name = "generator"
    max_nfe: int | None = None
    min_nfe: int = 1  # a method that needs several evaluations per sample (e.g. one per level of a cascade) raises it
    # Submodules `compile_networks` leaves eager: the networks a method differentiates in forward mode
    # (torch.func.jvp through a compiled module hits an internal assert in torch 2.14 with conv + GroupNorm).
    eager_networks: tuple[str, ...] = ()

    @property
    def default_nfe(self) -> int:
        """The step count the model is meant to be sampled with when none is asked for (the picture that ends a fit):
        a fixed-step generator's own count, else 35 (EDM's Heun budget for an ODE teacher). Few-step families
        override it."""
        return self.max_nfe or 35

    def __init__(self, ema_decay: float = 0.999, grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__()
        self._frozen: dict[str, FrozenNetwork] = {}  # first: train() reads it
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {ema_decay}.")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite: must be 'stop' or 'skip', got {nonfinite!r}.")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips: must be an integer >= 1, got {max_consecutive_skips!r}.")
        self.automatic_optimization = False
        self.strict_loading = False
        self.ema_decay = ema_decay
        self.grad_clip = grad_clip
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self._consecutive_skips = 0
        self.phases: list[Phase] = []
        self.stages: list[Stage] = []
        self.ema: nn.Module | None = None
        self._ema_profiles: dict[str, tuple[str, float]] = {}  # named EMAs beside `ema` (see add_ema)
        self.data_config: dict | None = None  # recorded at fit so `evaluate` knows the reference data
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # Seed of the training noise (set from seed_everything at fit); saved, so a resumed run keeps it.
        self.register_buffer("rng_seed", torch.zeros((), dtype=torch.long))
        # Generator EMA updates so far (the power-function profile needs it) and the last stage entered.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_entered", torch.full((), -1, dtype=torch.long))
        self._draws = 0
        self._compile_options: dict | None = None  # set by compile_networks

    # ----------------------------------------------------------------------------- networks
    @property
    def generator(self) -> nn.Module:
        return getattr(self, self.generator_name)

    def init_ema(self) -> None:
        """Call at the end of a subclass's __init__, once the generator exists."""
        if self.ema_decay > 0:
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)

    def add_ema(self, name: str, decay: float | None = None, gamma: float | None = None) -> None:
        """A further EMA of the generator, saved as ``ema_<name>`` and sampled with ``use_ema=name``.

        `decay`: a constant per-update decay (as `ema_decay`). `gamma`: EDM2's power-function profile
        (Karras et al. 2024), decay (1 - 1/n)^(gamma + 1) at the n-th update: after N updates the n-th weights
        count with (n^(gamma+1) - (n-1)^(gamma+1)) / N^(gamma+1), an average whose length grows with training
        (gamma = 6.94 gives EDM2's sigma_rel 0.10, 16.97 gives 0.05).
        """
        if (decay is None) == (gamma is None):
            raise ValueError(f"ema {name!r}: give exactly one of decay (constant) or gamma (power-function profile).")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema {name!r}: decay must be in (0, 1), got {decay}.")
        if gamma is not None and gamma <= 0:
            raise ValueError(f"ema {name!r}: gamma must be > 0, got {gamma}.")
        self._ema_profiles[name] = ("constant", float(decay)) if decay is not None else ("power", float(gamma))
        setattr(self, f"ema_{name}", copy.deepcopy(self.generator).requires_grad_(False))

    @property
    def ema_names(self) -> tuple[str, ...]:
        return tuple(self._ema_profiles)

    @property
    def averages(self) -> list[nn.Module]:
        """Every EMA of the generator: the sampling one (if any) and the named ones."""
        return ([self.ema] if self.ema is not None else []) + [getattr(self, f"ema_{name}") for name in self.ema_names]

    @torch.no_grad()
    def restart_emas(self) -> None:
        """Every EMA becomes a copy of the generator and the power profiles count their updates from here (a
        generator just initialised from a teacher or a previous stage, or starting a new objective, must not be
        averaged with the weights it replaced)."""
        for average in self.averages:
            average.load_state_dict(self.generator.state_dict())
        self.ema_updates.zero_()

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema_updates += 1
        averages = [(self.ema, self.ema_decay)] if self.ema is not None else []
        for name, (kind, value) in self._ema_profiles.items():
            n = int(self.ema_updates)
            averages.append((getattr(self, f"ema_{name}"), value if kind == "constant" else (1.0 - 1.0 / n) ** (value + 1.0)))
        for average, decay in averages:
            for p_ema, p in zip(average.parameters(), self.generator.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - decay)
            for b_ema, b in zip(average.buffers(), self.generator.buffers()):
                b_ema.copy_(b)

    def sampling_network(self, use_ema: bool | str = True) -> nn.Module:
        """The generator (False), its EMA (True) or a named EMA (its name)."""
        if isinstance(use_ema, str):
            if use_ema not in self._ema_profiles:
                raise ValueError(f"use_ema: {type(self).__name__} has no EMA named {use_ema!r}; it has "
                                 f"{['ema', *self.ema_names] if self.ema is not None else list(self.ema_names)}.")
            return getattr(self, f"ema_{use_ema}")
        return self.ema if (use_ema and self.ema is not None) else self.generator

    # ----------------------------------------------------------------------------- frozen networks
    # Teachers, guides, weak teachers and previous stages: frozen (no gradient, eval mode whatever Lightning or
    # `sample()` do with the module's mode), loaded once from a checkpoint and kept out of checkpoints, or made
    # in memory and saved with the module so a resumed run has them exactly.
    def register_frozen(self, name: str, path: str | None = None, module: nn.Module | None = None,
                        field: str | None = None) -> None:
        """Declare a frozen network `name`: from checkpoint `path` (loaded by `frozen_network` on first use,
        safe loading, never saved) or the in-memory `module` (saved in checkpoints)."""
        if (path is None) == (module is None):
            raise ValueError(f"frozen network {name!r}: give exactly one of path or module.")
        self._frozen[name] = FrozenNetwork(path, field or f"{name}_ckpt")
        prefix = f"{name}."
        unsaved = tuple(p for p in self.unsaved_prefixes if p != prefix)
        self.unsaved_prefixes = unsaved + ((prefix,) if path is not None else ())
        if module is not None:
            self._attach_frozen(name, module)
        elif name not in self._modules:
            setattr(self, name, None)

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(self._frozen)

    def frozen_network(self, name: str) -> nn.Module:
        """The frozen network `name`, loaded from its checkpoint now if it has not been yet."""
        module = getattr(self, name, None)
        if module is None:
            entry = self._frozen[name]
            module = self._attach_frozen(name, load_teacher(entry.path, field_name=entry.field))
        return module

    def _attach_frozen(self, name: str, module: nn.Module) -> nn.Module:
        like = next(self.generator.parameters(), None) if self.generator_name in self._modules else None
        module = module.to(device=self.device if like is None else like.device,
                           dtype=None if like is None else like.dtype)
        for sub in module.modules():  # a deep copy of a compiled network would still run the original's weights
            sub._compiled_call_impl = None
        setattr(self, name, float32_outputs(module.requires_grad_(False).eval()))
        if self._compile_options is not None:
            self._compile(module, name)
        return module

    # ----------------------------------------------------------------------------- torch.compile
    def compile_networks(self, **options) -> list[str]:
        """`torch.compile` the networks in place (``nn.Module.compile``: checkpoints keep their keys): every
        preconditioned network and every other network held directly by the module (heads, discriminators), except
        `eager_networks`; frozen networks loaded later are compiled as they load. `options` go to torch.compile.
        Returns the names compiled. The CLI's ``--compile true`` calls it before fit."""
        self._compile_options = dict(options)
        compiled = []
        for name, network in self.named_children():
            compiled += self._compile(network, name)
        return compiled

    def _compile(self, network: nn.Module, name: str) -> list[str]:
        eager = tuple(self.eager_networks)
        if name in eager:
            return []
        found = [(f"{name}.{sub}" if sub else name, module) for sub, module in network.named_modules()
                 if isinstance(module, PreconditionedNet)]
        found = [(path, module) for path, module in found if not path.startswith(tuple(f"{e}." for e in eager))]
        if not found and any(True for _ in network.parameters()):
            found = [(name, network)]  # a plain network (a GAN head): compiled whole
        for _, module in found:
            module.compile(**self._compile_options)
        return [path for path, _ in found]

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, "_frozen", ()):
            if self._modules.get(name) is not None:
                self._modules[name].eval()  # frozen: eval mode whatever the caller asked
        return self

    @property
    def num_classes(self) -> int:
        return int(getattr(self.generator, "num_classes", 0))

    @property
    def data_shape(self) -> tuple[int, ...]:
        net = getattr(self.generator, "net", self.generator)
        res = getattr(net, "img_resolution", None)
        return (net.in_channels,) if res is None else (net.in_channels, res, res)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of the unit noise `sample` draws for one sample: `data_shape`, unless the method models
        another space (Analog Bits diffuses the data's bits)."""
        return self.data_shape

    # ----------------------------------------------------------------------------- optimization
    def set_stages(self, stages: list[Stage]) -> None:
        """Declare the schedule as stages: each stage's phases run only inside its iteration range (a phase's own
        `start` counts from the stage's start), and its `on_enter` hook runs once when the stage begins."""
        previous_stop = 0
        for stage in stages:
            if stage.start < previous_stop or (stage.stop is not None and stage.stop <= stage.start):
                raise ValueError(f"stages: stage {stage.name!r} [{stage.start}, {stage.stop}) overlaps the previous "
                                 "one or is empty; give increasing, disjoint iteration ranges.")
            if stage.on_enter is not None and not callable(getattr(self, stage.on_enter, None)):
                raise ValueError(f"stages: stage {stage.name!r} names on_enter {stage.on_enter!r}, which is not a "
                                 f"method of {type(self).__name__}.")
            previous_stop = stage.stop if stage.stop is not None else float("inf")
            for phase in stage.phases:
                phase.start = stage.start + phase.start
                phase.stop = stage.stop if phase.stop is None else min(stage.start + phase.stop, stage.stop or math.inf)
        self.stages = list(stages)
        self.phases = [phase for stage in stages for phase in stage.phases]

    def _enter_stages(self, iteration: int) -> None:
        """Run the `on_enter` hook of every stage that has begun by `iteration` and was not entered yet."""
        for index, stage in enumerate(self.stages):
            if index > int(self.stage_entered) and stage.start <= iteration:
                if stage.on_enter is not None:
                    getattr(self, stage.on_enter)()
                self.stage_entered.fill_(index)

    def _phase_parameter_groups(self, phase: Phase) -> list[list[nn.Parameter]]:
        groups = [[p for path in ((entry,) if isinstance(entry, str) else entry)
                   for p in self.get_submodule(path).parameters() if p.requires_grad] for entry in phase.networks]
        return groups if phase.separate else [[p for group in groups for p in group]]

    def configure_optimizers(self):
        if not self.phases:
            raise RuntimeError(f"{type(self).__name__} declares no update phases.")
        optimizers = []
        for phase in self.phases:
            for params in self._phase_parameter_groups(phase):
                kwargs = {"lr": phase.lr, "betas": phase.betas, "weight_decay": phase.weight_decay}
                optimizers.append(OPTIMIZERS[phase.optimizer](params, **kwargs))
        return optimizers

    def _optimizers_by_phase(self) -> list[list]:
        """The optimizers of each phase, in `self.phases` order (several for a `separate` phase)."""
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        grouped = []
        for phase in self.phases:
            count = len(phase.networks) if phase.separate else 1
            grouped.append(opts[:count])
            opts = opts[count:]
        return grouped

    def optimizer_steps_for(self, iterations: int) -> int:
        """Lightning's `max_steps` for a run of `iterations` iterations: it counts every optimizer step, so a
        5:1 critic/generator schedule takes 1.2 per iteration and a `separate` phase one per network."""
        return sum(self._phase_steps_before(phase, iterations) * (len(phase.networks) if phase.separate else 1)
                   for phase in self.phases)

    def iterations_for(self, optimizer_steps: int) -> int | None:
        """The iteration at which Lightning's `max_steps=optimizer_steps` ends the run (the inverse of
        `optimizer_steps_for`, for the current phases); None if the schedule never takes that many steps."""
        low, high = 0, 1
        while self.optimizer_steps_for(high) < optimizer_steps:
            low, high = high, high * 2
            if high > 2**40:
                return None
        while high - low > 1:  # optimizer_steps_for never decreases: bisect for the first iteration that gets there
            middle = (low + high) // 2
            low, high = (low, middle) if self.optimizer_steps_for(middle) >= optimizer_steps else (middle, high)
        return high

    def _phase_steps_before(self, phase: Phase, iteration: int) -> int:
        """Optimizer steps the phase took before `iteration` (derived from the schedule: resume-exact)."""
        if iteration <= phase.start:
            return 0
        end = iteration if phase.stop is None else min(iteration, phase.stop)
        return -(-(end - phase.start) // phase.every) * phase.repeats

    def _saved_state(self) -> str:
        """What a user can resume from right now, for error messages."""
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = callback and (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", ""))
        if last and os.path.isfile(last):
            return f"the last checkpoint written is {last}"
        resumed = self.trainer.ckpt_path if self._trainer is not None else None
        if resumed:
            return f"no checkpoint was written since resuming from {resumed}"
        return "no checkpoint has been written in this run yet"

    def _nonfinite(self, what: str, phase: Phase, *opts) -> None:
        """Stop with a message naming method, phase, step and tensor, or skip the step and count it."""
        message = (f"{type(self).__name__}: non-finite {what} in phase {phase.name!r} at iteration "
                   f"{int(self.iteration)} (loss method {phase.loss!r}).")
        if self.nonfinite == "stop":
            raise NonFiniteError(f"{message} Stopped; {self._saved_state()}. Lower the learning rate, enable "
                                 "grad_clip, or set nonfinite: skip.")
        self.skipped_steps += 1
        # An optimizer step without gradients changes no parameter and no optimizer state, but Lightning counts
        # it: max_steps (optimizer steps) is then reached at the scheduled iteration, skips or not.
        for opt in opts:
            opt.zero_grad(set_to_none=True)
            if self._grad_scaler is None:
                opt.step()
            else:  # the scaler refuses a step without gradients: count the step as Lightning's step() would
                opt._on_before_step()
                opt._on_after_step()

    def training_step(self, batch, batch_idx):
        # Dropout draws from torch's global RNG, which checkpoints do not hold: run the iteration on a global RNG
        # seeded from (seed, iteration, rank), so dropout masks come back exactly on resume (and differ per rank).
        rank = self.trainer.global_rank if self._trainer is not None else 0
        key = f"{int(self.rng_seed)}/{int(self.iteration)}/global/{rank}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._train_iteration(batch)

    def _train_iteration(self, batch) -> None:
        self._draws = 0
        iteration = int(self.iteration)
        self._enter_stages(iteration)
        skipped_before = int(self.skipped_steps)
        for phase, opts in zip(self.phases, self._optimizers_by_phase()):
            if not phase.active(iteration):
                continue
            for repeat in range(phase.repeats):
                loss = getattr(self, phase.loss)(batch)
                if not torch.isfinite(loss):
                    self._nonfinite("loss", phase, *opts)
                    continue
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                self.manual_backward(loss.float())
                # Under 16-mixed the gradients are loss-scaled and overflow now and then by design: the grad scaler
                # then skips the step and lowers the scale. Only without one is a non-finite gradient an error.
                bad = None if self._grad_scaler is not None else next(
                    (f"{net}.{n}" for net in phase.network_paths for n, p in self.get_submodule(net).named_parameters()
                     if p.grad is not None and not torch.isfinite(p.grad).all()), None)
                if bad is not None:
                    self._nonfinite(f"gradient of {bad}", phase, *opts)
                    continue
                if phase.scheduled:
                    lr = phase.lr_at(self._phase_steps_before(phase, iteration) + repeat)
                for opt in opts:
                    if phase.scheduled:
                        for group in opt.param_groups:
                            group["lr"] = lr
                    opt.step()  # clipped in on_before_optimizer_step
                if phase.updates_ema:
                    self.update_ema()
                self.log(f"train/{phase.name}_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
                # named after the phase (lr/critic), not the optimizer class and index a LearningRateMonitor uses
                self.log(f"lr/{phase.name}", float(opts[0].param_groups[0]["lr"]), on_step=True, on_epoch=False)
        self.iteration += 1
        # One x axis in TensorBoard, the iteration (iterations done, this one included): Lightning logs everything
        # of this batch (losses, learning rates, throughput) at a logged "step" value instead of its batch count,
        # and the callbacks draw pictures and sweeps at `iteration` too. (ModelCheckpoint's "{step}" in file names
        # reads the same value, so periodic checkpoints are named by iteration.)
        self.log("step", float(self.iteration), on_step=True, on_epoch=False)
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
            self._consecutive_skips = self._consecutive_skips + 1 if int(self.skipped_steps) > skipped_before else 0
            if self._consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{type(self).__name__}: {self._consecutive_skips} iterations in a row (up to iteration "
                    f"{int(self.iteration) - 1}) skipped a non-finite step, {int(self.skipped_steps)} skipped in all; "
                    f"stopped ({self._saved_state()}). Lower the learning rate or enable grad_clip; "
                    "max_consecutive_skips sets this limit.")

    @property
    def _grad_scaler(self):
        """The fp16 loss scaler of a 16-mixed run (None otherwise)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this inside opt.step(), after a 16-mixed run's gradients are unscaled: clipping here
        # bounds the true gradient norm in every precision (before opt.step it would clip the scaled gradients).
        if self.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    # ----------------------------------------------------------------------------- randomness
    # Training noise comes from generators keyed by (seed, iteration, draw index), and each DDP rank
    # takes its rows of one draw for the global batch (rank r of W: rows r, r + W, ...). So a resumed run, and a run on any number of
    # processes at the same global batch, see exactly the noise of the uninterrupted single process,
    # whatever else touched torch's global RNG in between (validation, callbacks, data loading).
    def _iteration_generator(self, device: torch.device) -> torch.Generator:
        key = f"{int(self.rng_seed)}/{int(self.iteration)}/{self._draws}".encode()
        self._draws += 1
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)

    def _global_draw(self, sampler, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None,
                     shared: bool = False) -> Tensor:
        if generator is not None:  # validation / explicit seeding
            return sampler(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
        if shared:  # one value for every rank (e.g. which generator step to train this iteration)
            return sampler(shape, generator=self._iteration_generator(like.device), device=like.device, dtype=like.dtype)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        full = sampler((shape[0] * world, *shape[1:]), generator=self._iteration_generator(like.device),
                       device=like.device, dtype=like.dtype)
        return full[rank::world]  # interleaved, as EpochShuffleSampler deals samples to ranks

    def randn(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """N(0, 1) of `shape` (batch first) on like's device/dtype, reproducible across resume and DDP."""
        return self._global_draw(torch.randn, tuple(shape), like, generator)

    def rand(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None,
             shared: bool = False) -> Tensor:
        """U[0, 1) of `shape` (batch first); see `randn`. `shared`: the same draw on every rank."""
        return self._global_draw(torch.rand, tuple(shape), like, generator, shared)

    def randint(self, low: int, high: int, shape: tuple[int, ...], like: Tensor,
                generator: torch.Generator | None = None, shared: bool = False) -> Tensor:
        """Integers uniform in [low, high) (int64, on like's device); see `rand`."""
        u = self.rand(shape, like.float() if not like.is_floating_point() else like, generator, shared)
        return (low + (u.double() * (high - low)).floor().long()).clamp_(low, high - 1)

    # ----------------------------------------------------------------------------- teacher pairs
    def hold_pairs(self, pairs: dict, field: str = "pairs_path") -> None:
        """Keep a teacher's (noise, sample[, label]) pairs (`data.pairs.load_pairs`) as buffers that checkpoints do
        not hold (the file is read again at load), after checking them against this model's data and conditioning.
        Used by DMD's regression loss and CAF's couplings; `random_pairs` draws from them."""
        shape = tuple(pairs["noise"].shape[1:])
        if shape != tuple(self.data_shape):
            raise ValueError(f"{field}: pairs of shape {shape} but the networks make {tuple(self.data_shape)}; "
                             "make pairs with a teacher of this data.")
        if (pairs.get("labels") is None) != (self.num_classes == 0):
            raise ValueError(f"{field}: class labels of the pairs do not match the (un)conditional networks; make "
                             "pairs with a teacher of the same conditioning.")
        device = self.iteration.device
        self.register_buffer("pair_noise", pairs["noise"].float().to(device), persistent=False)
        self.register_buffer("pair_x", pairs["x"].float().to(device), persistent=False)
        labels = pairs.get("labels")
        self.register_buffer("pair_labels", None if labels is None else labels.long().to(device), persistent=False)

    def random_pairs(self, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(noise, sample, labels or None) of `n` pairs drawn uniformly with the module's resumable RNG."""
        index = self.randint(0, self.pair_x.shape[0], (n,), self.pair_x)
        labels = None if self.pair_labels is None else self.pair_labels[index]
        return self.pair_noise[index], self.pair_x[index], labels

    def on_fit_start(self) -> None:
        if int(self.iteration) == 0:  # a fresh run takes the seed of seed_everything; a resumed one keeps its own
            self.rng_seed.fill_(int(os.environ.get("PL_GLOBAL_SEED", 0)))

    def on_train_start(self) -> None:
        # Lightning 2.6 resuming from a checkpoint written after an epoch's last batch closes that epoch in
        # `fit_loop.reset()` but keeps its "restarted mid-epoch" mark, so the next epoch starts without being
        # counted (and without on_train_epoch_start). A checkpoint written in that epoch then reads as "epoch
        # finished", and resuming from it replays the epoch's data from its start: the second resume of a chain
        # was not exact. Clearing the mark once the epoch is closed lets the next epoch start as usual.
        loop = self.trainer.fit_loop if self._trainer is not None else None
        if (loop is not None and loop.restarted_mid_epoch and loop.epoch_loop.batch_progress.is_last_batch
                and loop.epoch_progress.current.completed == loop.epoch_progress.current.ready):
            loop.reset_restart_stage()

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FORMAT_KEY] = self._format_entry()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self.unsaved_prefixes)]:
            del state[key]

    def state_dict_to_save(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.unsaved_prefixes)}

    def prepare_state(self, state_dict: dict[str, Tensor]) -> None:
        """Give the module the structure of `state_dict` before it is loaded: the stages the saved run had entered
        run their `on_enter` hooks again (they make in-memory frozen networks, whose weights the state then
        overwrites). `utils.checkpoint.load_module` and resume call it."""
        entered = state_dict.get("stage_entered")
        if entered is not None and self.stages:
            self._enter_stages(self.stages[int(entered)].start if int(entered) >= 0 else -1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.prepare_state(checkpoint.get("state_dict", {}))

    def export(self, path: str, ema_only: bool = True, ema: str | None = None) -> None:
        """A small self-describing file for `sample`, `evaluate` and `teacher_ckpt` (atomic write).

        With `ema_only` the EMA weights are stored in the generator's slot and the raw weights are
        dropped (half the size); loading then starts the EMA from those weights. `ema` names the EMA
        (`add_ema`) that goes there instead of the sampling one: an averaging length chosen after training.
        """
        if ema is not None and not ema_only:
            raise ValueError("ema: a named EMA is exported in the generator's slot; set ema_only=True.")
        average = self.sampling_network(ema) if ema is not None else self.ema
        state = self.state_dict_to_save()
        if ema_only and average is not None:
            prefix = f"{self.generator_name}."
            named = tuple(f"ema_{name}." for name in self.ema_names)
            state = {k: v for k, v in state.items() if not k.startswith(("ema.", prefix, *named))}
            state.update({prefix + k: v for k, v in average.state_dict().items()})
        save = save_safetensors if str(path).endswith(".safetensors") else atomic_save  # .safetensors: no pickle
        save({FORMAT_KEY: self._format_entry(), "state_dict": state}, path)

    def on_load_state_dict_without_ema(self) -> None:
        """An EMA-only export holds no `ema.*` (nor named `ema_<name>.*`) keys: every EMA starts from the loaded
        generator."""
        self.restart_emas()

    def _format_entry(self) -> dict:
        return {"config": self.init_config, "data": self.data_config, "version": 1}

    # ----------------------------------------------------------------------------- sampling
    def check_nfe(self, nfe: int) -> None:
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe: must be an integer >= 1, got {nfe!r}.")
        if self.max_nfe is not None and nfe > self.max_nfe:
            raise ValueError(f"nfe: {type(self).__name__} samples with at most {self.max_nfe} evaluations, got {nfe}.")
        if nfe < self.min_nfe:
            raise ValueError(f"nfe: {type(self).__name__} samples with at least {self.min_nfe} evaluations, got {nfe}.")

    def check_class_labels(self, class_labels: Tensor | None, n: int) -> None:
        if class_labels is None:
            return
        if self.num_classes == 0:
            raise ValueError("class_labels: this model is unconditional; drop --class_labels.")
        if class_labels.shape != (n,):
            raise ValueError(f"class_labels: expected {n} labels (one per sample), got shape {tuple(class_labels.shape)}.")
        if class_labels.min() < 0 or class_labels.max() >= self.num_classes:
            raise ValueError(f"class_labels: labels must be in [0, {self.num_classes - 1}], got {class_labels.tolist()[:8]}.")

    def check_sample_options(self, options: dict) -> None:
        """Options a method's `_sample` does not take (e.g. --solver for a one-step generator) and non-finite
        guidance scales are refused here, instead of being ignored or turning every sample into NaN."""
        parameters = inspect.signature(self._sample).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            takes = [name for name in list(parameters)[4:] if not name.startswith("_")]
            unknown = sorted(set(options) - set(takes))
            if unknown:
                raise ValueError(f"{unknown[0]}: {type(self).__name__} takes no {unknown[0]!r} option at sampling "
                                 f"(it takes {takes or 'none'}); drop it.")
        scale = options.get("guidance_scale")
        if scale is not None and not bool(torch.isfinite(torch.as_tensor(scale, dtype=torch.float64)).all()):
            raise ValueError(f"guidance_scale: must be a finite number, got {scale}.")

    @torch.no_grad()
    def sample(self, n: int, nfe: int, class_labels: Tensor | None = None, generator: torch.Generator | None = None,
               use_ema: bool | str = True, cond: Conditioning | None = None, **options) -> Samples:
        """Draw n samples with `nfe` network evaluations each (guidance counts double).

        Class labels default to uniform draws from `generator` for class-conditional models. `cond` carries the
        rest of the conditioning (`lit_fewstep.conditioning`): a per-sample ``guidance_scale`` becomes the
        ``guidance_scale`` option; the other fields go to a method whose `_sample` takes ``cond``.
        """
        self.check_nfe(nfe)
        if cond is not None:
            class_labels, options = self._merge_conditioning(cond, class_labels, n, options)
        self.check_sample_options(options)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device)
        self.check_class_labels(class_labels, n)
        if class_labels is None and self.num_classes > 0:
            class_labels = torch.randint(0, self.num_classes, (n,), generator=generator).to(self.device)
        noise = torch.randn((n, *self.noise_shape), generator=generator).to(self.device)
        was_training = self.training
        self.eval()
        try:
            x, spent = self._sample(noise, class_labels, nfe, self.sampling_network(use_ema), **options)
        finally:
            self.train(was_training)
        return Samples(x=x, labels=class_labels, nfe=spent)

    def _sample(self, noise: Tensor, class_labels: Tensor | None, nfe: int, net: nn.Module, **options) -> tuple[Tensor, int]:
        raise NotImplementedError

    def _merge_conditioning(self, cond: Conditioning, class_labels, n: int, options: dict) -> tuple:
        if cond.batch_size not in (None, n):
            raise ValueError(f"cond: conditioning for {cond.batch_size} samples, but n = {n}.")
        if cond.class_labels is not None:
            if class_labels is not None:
                raise ValueError("class_labels: given both as an argument and in cond; give them once.")
            class_labels = cond.class_labels
        options = dict(options)
        if cond.guidance_scale is not None:
            if "guidance_scale" in options:
                raise ValueError("guidance_scale: given both as an option and in cond; give it once.")
            options["guidance_scale"] = cond.guidance_scale.to(self.device)
        rest = cond.replace(class_labels=None, guidance_scale=None)
        if rest.items():
            options["cond"] = rest.to(self.device)  # refused by check_sample_options unless _sample takes it
        return class_labels, options

    def split_batch(self, batch) -> tuple[Tensor, Conditioning]:
        """A training batch as (x, Conditioning): (x,), (x, class_labels) or (x, {field: tensor})."""
        return split_batch(batch)

    # ----------------------------------------------------------------------------- setup checks
    def configure_callbacks(self):
        callbacks = [PreemptionCheckpoint()]
        bar = self.trainer.progress_bar_callback if self._trainer is not None else None
        if type(bar) is TQDMProgressBar:  # Lightning's default bar, same settings, counting iterations of the run
            callbacks.append(IterationProgressBar.like(bar))
        return callbacks

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if precision in ("16-true", "bf16-true"):
            raise ValueError(f"trainer.precision: {precision!r} keeps parameters, optimizer states and EMAs in half "
                             "precision, which the methods need in float32; use bf16-mixed or 16-mixed.")
        for network in self.children():  # frozen networks loaded later get it in _attach_frozen
            float32_outputs(network)
        # Fails now, not at the first checkpoint, if an argument cannot be recorded; logged as the run's
        # hyper-parameters (hparams.yaml, TensorBoard), under "model" so no key clashes with the data module's.
        self.save_hyperparameters({"model": self.init_config}, logger=True)
        if self._trainer is not None and type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if isinstance(datamodule, Configurable):
            self.data_config = datamodule.init_config
        data_shape = tuple(getattr(datamodule, "data_shape", self.data_shape))
        if data_shape != self.data_shape:
            raise ValueError(
                f"model: network input shape {self.data_shape} does not match data shape {data_shape}; "
                "set the network's in_channels/img_resolution (or dim) to the data's."
            )
        if getattr(datamodule, "is_image", False) and hasattr(datamodule, "train_dataset"):
            datamodule.setup(stage)
            x = datamodule.train_dataset[0][0]
            if x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3:
                raise ValueError(
                    f"data: images must be scaled to [-1, 1], but the first training image spans "
                    f"[{x.min().item():.3g}, {x.max().item():.3g}]; rescale them (x / 127.5 - 1 for uint8)."
                )
        data_classes = int(getattr(datamodule, "num_classes", 0))
        if self.num_classes > 0 and data_classes == 0:
            raise ValueError(
                "model: class-conditional network but the data has no labels; set the network's num_classes "
                "to 0 or use a labelled data module."
            )
        if self.num_classes > 0 and data_classes != self.num_classes:
            raise ValueError(
                f"model: class-conditional network with num_classes={self.num_classes} but the data has "
                f"{data_classes} classes; set the network's num_classes to {data_classes}."
            )
