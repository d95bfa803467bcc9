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
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
import torch
from torch import Tensor, nn

from ..utils.checkpoint import FORMAT_KEY, atomic_save, load_module
from ..utils.config import Configurable
from ..utils.preemption import AtomicCheckpointIO, PreemptionCheckpoint

# Lightning warns that under manual optimization a periodic checkpoint holds the weights after the optimizer step.
# Here that is the intended state: checkpoints fall between iterations, with `iteration` already advanced, which is
# what exact resume needs (tests/test_reliability.py).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)

__all__ = ["Phase", "Samples", "FewStepModule", "NonFiniteError", "load_teacher"]


@dataclass
class Phase:
    """One optimizer of the update schedule.

    Args:
        name: logged as ``train/<name>_loss``.
        loss: name of the module method ``loss(batch) -> scalar``.
        networks: attribute names of the submodules this phase's optimizer owns.
        every: run on iterations k with (k - start) % every == 0 and k >= start.
        repeats: optimizer steps per active iteration (same batch, fresh noise).
        lr, betas, weight_decay: AdamW settings.
        updates_ema: update the generator EMA after each step of this phase.
    """

    name: str
    loss: str
    networks: tuple[str, ...]
    every: int = 1
    repeats: int = 1
    start: int = 0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    updates_ema: bool = False

    def __post_init__(self):
        if self.every < 1 or self.repeats < 1 or self.start < 0:
            raise ValueError(
                f"schedule: phase {self.name!r} needs every >= 1, repeats >= 1 and start >= 0 "
                f"(got every={self.every}, repeats={self.repeats}, start={self.start})."
            )

    def active(self, iteration: int) -> bool:
        return iteration >= self.start and (iteration - self.start) % self.every == 0


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
    """The EMA generator of a trained lit_fewstep module, frozen (requires_grad False, eval mode).

    `opt_in`: how the caller's user allows pickle (e.g. "--trust_checkpoint true"); None where no opt-in is
    offered (a method's `teacher_ckpt`), and the error then says how to re-save a trusted file weights-only.
    """
    module = load_module(path, trust=trust, field=field_name, opt_in=opt_in)
    teacher = module.ema if getattr(module, "ema", None) is not None else module.generator
    teacher = copy.deepcopy(teacher)
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
    # Training bookkeeping that an exported file may lack (it then starts at zero).
    optional_state_keys: tuple[str, ...] = ("iteration", "skipped_steps", "rng_seed")
    generator_name = "generator"
    max_nfe: int | None = None

    def __init__(self, ema_decay: float = 0.999, grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__()
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
        self.ema: nn.Module | None = None
        self.data_config: dict | None = None  # recorded at fit so `evaluate` knows the reference data
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # Seed of the training noise (set from seed_everything at fit); saved, so a resumed run keeps it.
        self.register_buffer("rng_seed", torch.zeros((), dtype=torch.long))
        self._draws = 0

    # ----------------------------------------------------------------------------- networks
    @property
    def generator(self) -> nn.Module:
        return getattr(self, self.generator_name)

    def init_ema(self) -> None:
        """Call at the end of a subclass's __init__, once the generator exists."""
        if self.ema_decay > 0:
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        for p_ema, p in zip(self.ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - self.ema_decay)
        for b_ema, b in zip(self.ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    def sampling_network(self, use_ema: bool = True) -> nn.Module:
        return self.ema if (use_ema and self.ema is not None) else self.generator

    @property
    def num_classes(self) -> int:
        return int(getattr(self.generator, "num_classes", 0))

    @property
    def data_shape(self) -> tuple[int, ...]:
        net = getattr(self.generator, "net", self.generator)
        res = getattr(net, "img_resolution", None)
        return (net.in_channels,) if res is None else (net.in_channels, res, res)

    # ----------------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        if not self.phases:
            raise RuntimeError(f"{type(self).__name__} declares no update phases.")
        optimizers = []
        for phase in self.phases:
            params = [p for name in phase.networks for p in getattr(self, name).parameters() if p.requires_grad]
            optimizers.append(torch.optim.AdamW(params, lr=phase.lr, betas=phase.betas, weight_decay=phase.weight_decay))
        return optimizers

    def _optimizer_list(self) -> list:
        opts = self.optimizers()
        return opts if isinstance(opts, (list, tuple)) else [opts]

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

    def _nonfinite(self, what: str, phase: Phase, opt) -> None:
        """Stop with a message naming method, phase, step and tensor, or skip the step and count it."""
        message = (f"{type(self).__name__}: non-finite {what} in phase {phase.name!r} at iteration "
                   f"{int(self.iteration)} (loss method {phase.loss!r}).")
        if self.nonfinite == "stop":
            raise NonFiniteError(f"{message} Stopped; {self._saved_state()}. Lower the learning rate, enable "
                                 "grad_clip, or set nonfinite: skip.")
        self.skipped_steps += 1
        # An optimizer step without gradients changes no parameter and no optimizer state, but Lightning counts
        # it: max_steps (optimizer steps) is then reached at the scheduled iteration, skips or not.
        opt.zero_grad(set_to_none=True)
        opt.step()

    def training_step(self, batch, batch_idx):
        self._draws = 0
        iteration = int(self.iteration)
        optimizers = self._optimizer_list()
        skipped_before = int(self.skipped_steps)
        for phase, opt in zip(self.phases, optimizers):
            if not phase.active(iteration):
                continue
            for _ in range(phase.repeats):
                loss = getattr(self, phase.loss)(batch)
                if not torch.isfinite(loss):
                    self._nonfinite("loss", phase, opt)
                    continue
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                bad = next((f"{net}.{n}" for net in phase.networks for n, p in getattr(self, net).named_parameters()
                            if p.grad is not None and not torch.isfinite(p.grad).all()), None)
                if bad is not None:
                    self._nonfinite(f"gradient of {bad}", phase, opt)
                    continue
                if self.grad_clip > 0:
                    self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                if phase.updates_ema:
                    self.update_ema()
                self.log(f"train/{phase.name}_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.iteration += 1
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
            self._consecutive_skips = self._consecutive_skips + 1 if int(self.skipped_steps) > skipped_before else 0
            if self._consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{type(self).__name__}: {self._consecutive_skips} iterations in a row (up to iteration "
                    f"{int(self.iteration) - 1}) skipped a non-finite step, {int(self.skipped_steps)} skipped in all; "
                    f"stopped ({self._saved_state()}). Lower the learning rate or enable grad_clip; "
                    "max_consecutive_skips sets this limit.")

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

    def on_fit_start(self) -> None:
        if int(self.iteration) == 0:  # a fresh run takes the seed of seed_everything; a resumed one keeps its own
            self.rng_seed.fill_(int(os.environ.get("PL_GLOBAL_SEED", 0)))

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FORMAT_KEY] = self._format_entry()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self.unsaved_prefixes)]:
            del state[key]

    def state_dict_to_save(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.unsaved_prefixes)}

    def export(self, path: str, ema_only: bool = True) -> None:
        """A small self-describing file for `sample`, `evaluate` and `teacher_ckpt` (atomic write).

        With `ema_only` the EMA weights are stored in the generator's slot and the raw weights are
        dropped (half the size); loading then starts the EMA from those weights.
        """
        state = self.state_dict_to_save()
        if ema_only and self.ema is not None:
            prefix = f"{self.generator_name}."
            state = {k: v for k, v in state.items() if not k.startswith(("ema.", prefix))}
            state.update({prefix + k: v for k, v in self.ema.state_dict().items()})
        atomic_save({FORMAT_KEY: self._format_entry(), "state_dict": state}, path)

    def on_load_state_dict_without_ema(self) -> None:
        """An EMA-only export holds no `ema.*` keys: the EMA starts from the loaded generator."""
        if self.ema is not None:
            self.ema.load_state_dict(self.generator.state_dict())

    def _format_entry(self) -> dict:
        return {"config": self.init_config, "data": self.data_config, "version": 1}

    # ----------------------------------------------------------------------------- sampling
    def check_nfe(self, nfe: int) -> None:
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe: must be an integer >= 1, got {nfe!r}.")
        if self.max_nfe is not None and nfe > self.max_nfe:
            raise ValueError(f"nfe: {type(self).__name__} samples with at most {self.max_nfe} evaluations, got {nfe}.")

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
        if scale is not None and not math.isfinite(float(scale)):
            raise ValueError(f"guidance_scale: must be a finite number, got {scale}.")

    @torch.no_grad()
    def sample(self, n: int, nfe: int, class_labels: Tensor | None = None, generator: torch.Generator | None = None,
               use_ema: bool = True, **options) -> Samples:
        """Draw n samples with `nfe` network evaluations each (guidance counts double).

        Class labels default to uniform draws from `generator` for class-conditional models.
        """
        self.check_nfe(nfe)
        self.check_sample_options(options)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device)
        self.check_class_labels(class_labels, n)
        if class_labels is None and self.num_classes > 0:
            class_labels = torch.randint(0, self.num_classes, (n,), generator=generator).to(self.device)
        noise = torch.randn((n, *self.data_shape), generator=generator).to(self.device)
        was_training = self.training
        self.eval()
        try:
            x, spent = self._sample(noise, class_labels, nfe, self.sampling_network(use_ema), **options)
        finally:
            self.train(was_training)
        return Samples(x=x, labels=class_labels, nfe=spent)

    def _sample(self, noise: Tensor, class_labels: Tensor | None, nfe: int, net: nn.Module, **options) -> tuple[Tensor, int]:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- setup checks
    def configure_callbacks(self):
        return [PreemptionCheckpoint()]

    def setup(self, stage: str) -> None:
        self.init_config  # fail now, not at the first checkpoint, if an argument cannot be recorded
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
