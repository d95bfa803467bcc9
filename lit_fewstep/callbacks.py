"""Training callbacks that watch a FewStepModule: sample pictures, metric sweeps over NFE, throughput.

All three are plain Lightning callbacks with plain-value constructor arguments, so a YAML config lists them
under ``trainer.callbacks`` with ``class_path: lit_fewstep.metrics.SampleGridCallback`` etc. (``lit_fewstep.metrics``
names them lazily; they live here, above the methods they sample and next to `evaluation`, whose `Evaluator` scores
them: see the layer rule in `lit_fewstep/__init__.py`).

Schedules use the module's own counter ``pl_module.iteration`` (one per training batch), not
``trainer.global_step``, which under manual optimization counts optimizer steps (a 5:1 critic/generator schedule
makes 6 global steps per 5 batches). TensorBoard's x axis is that iteration too, for everything: pictures and
sweeps are written at ``pl_module.iteration``, and `FewStepModule.training_step` makes Lightning log losses,
learning rates and throughput at it (a logged ``step`` value).

Sampling and scoring run on global rank 0 only (the sampling network is a plain submodule, so no collective op
is involved); the other ranks wait at the next collective. Samples use a fixed seed, so pictures and metrics at
successive iterations show the same noise going through a changing model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from .evaluation import LABEL_DRAWS, Evaluator
from .methods.sampling import load_for_sampling
from .utils.images import image_grid

__all__ = ["SampleGridCallback", "NFESweepCallback", "ThroughputCallback"]


def _nfe_list(nfe, field: str) -> tuple[int, ...]:
    values = (nfe,) if isinstance(nfe, int) else tuple(nfe)
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in values):
        raise ValueError(f"{field}: expected a list of integers >= 1, got {nfe!r}.")
    return values


def _positive(value, field: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}: expected an integer >= 1{' or null' if allow_none else ''}, got {value!r}.")
    return value


def _due(pl_module, every: int | None) -> bool:
    """True right after iteration k = every, 2 every, ... (the counter is incremented at the end of training_step)."""
    iteration = int(pl_module.iteration)
    return every is not None and iteration > 0 and iteration % every == 0


def _tensorboard(trainer):
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _balanced_labels(pl_module, num: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ... for class-conditional models (a grid shows every class); None otherwise."""
    k = pl_module.num_classes
    return None if k == 0 else torch.arange(num) % k


class SampleGridCallback(Callback):
    """Pictures of samples at a few NFE to TensorBoard, every n iterations (rank 0 only).

    Images go in as one grid per NFE (``add_image``, tag ``samples/nfe<k>``, sorted by class); 2-D toy samples
    as a scatter plot coloured by class (``add_figure``, same tags). Needs a ``TensorBoardLogger`` among the
    trainer's loggers (warns once and does nothing otherwise).

    Args:
        every_n_iterations: draw after iterations n, 2n, ...
        nfe: network evaluations per sample; one picture each.
        num: samples per picture.
        seed: seed of the noise (the same every time).
        use_ema: sample from the EMA generator.
        extent: toys only, the plotted square [-extent, extent]^2.
        guidance_scale: guidance of the pictures (None: the model's default); with `guide`, autoguidance.
        guide: checkpoint of an autoguidance guide (a worse model of the same task), loaded once at first use.
    """

    def __init__(self, every_n_iterations: int = 500, nfe: Sequence[int] = (1, 2), num: int = 64, seed: int = 0,
                 use_ema: bool = True, extent: float = 3.5, guidance_scale: float | None = None,
                 guide: str | None = None):
        self.every_n_iterations = _positive(every_n_iterations, "SampleGridCallback.every_n_iterations")
        self.nfe = _nfe_list(nfe, "SampleGridCallback.nfe")
        self.num = _positive(num, "SampleGridCallback.num")
        self.seed, self.use_ema, self.extent = int(seed), bool(use_ema), float(extent)
        if guide is not None and guidance_scale is None:
            raise ValueError("SampleGridCallback.guidance_scale: give the autoguidance scale with guide (e.g. 2.0).")
        self.guidance_scale, self.guide_path, self._guide = guidance_scale, guide, None
        self._warned = False

    def sample_options(self, pl_module) -> dict:
        """The options every picture is drawn with (guidance, and the guide loaded on first use)."""
        options = {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}
        if self.guide_path is not None:
            if self._guide is None:
                self._guide = load_for_sampling(self.guide_path, pl_module.device, field="SampleGridCallback.guide")
            options["guide"] = self._guide
        return options

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and _due(pl_module, self.every_n_iterations):
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> None:
        logger = _tensorboard(trainer)
        if logger is None:
            if not self._warned:
                rank_zero_warn("SampleGridCallback: no TensorBoardLogger among trainer.loggers; no pictures are written.")
                self._warned = True
            return
        writer = logger.experiment
        labels = _balanced_labels(pl_module, self.num)
        for nfe in self.nfe:
            out = pl_module.sample(self.num, nfe, class_labels=labels, generator=torch.Generator().manual_seed(self.seed),
                                   use_ema=self.use_ema, **self.sample_options(pl_module))
            x = out.x.detach().float().cpu()
            y = None if out.labels is None else out.labels.cpu()
            tag = f"samples/nfe{nfe}"
            if x.dim() == 4:
                if y is not None:
                    x = x[torch.argsort(y, stable=True)]
                grid = image_grid(x.numpy(), nrow=int(math.ceil(math.sqrt(len(x)))))
                writer.add_image(tag, grid, global_step=int(pl_module.iteration), dataformats="HWC")
            elif x.dim() == 2 and x.shape[1] == 2:
                writer.add_figure(tag, self._scatter(x, y, f"NFE {out.nfe}, iteration {int(pl_module.iteration)}"),
                                  global_step=int(pl_module.iteration), close=True)
            else:
                raise ValueError(f"SampleGridCallback: cannot draw samples of shape {tuple(x.shape)}; "
                                 "expected images [N, C, H, W] or 2-D points [N, 2].")

    def _scatter(self, x: torch.Tensor, y: torch.Tensor | None, title: str):
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

        fig = Figure(figsize=(4, 4), dpi=80)
        ax = fig.add_subplot()
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=3, alpha=0.7, c=None if y is None else y.numpy(),
                   cmap="tab10", vmin=0, vmax=9)
        ax.set_xlim(-self.extent, self.extent)
        ax.set_ylim(-self.extent, self.extent)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return fig


class NFESweepCallback(Callback):
    """Scores samples at several NFE with `lit_fewstep.evaluation.Evaluator` and logs ``val/<metric>@<nfe>``.

    Metrics are those of ``python -m lit_fewstep evaluate`` (toys: sw2, mmd, nll, precision, recall; images: fid,
    precision, recall), against the trainer's datamodule (its ``reference_samples``).

    When: with ``every_n_iterations=None`` at the end of every validation epoch (sanity check skipped), logged
    with ``pl_module.log`` so ``ModelCheckpoint(monitor="val/fid@1")`` can use it (rank 0 computes, every rank
    logs the broadcast values). With ``every_n_iterations=n``, after iterations n, 2n, ..., written straight to
    the loggers at the iteration ``pl_module.iteration``, the x axis of the losses (a value logged from a training hook through ``pl_module.log`` only
    reaches the logger on ``log_every_n_steps`` boundaries).

    Args:
        nfe: NFE values of the sweep.
        num: generated samples per NFE.
        every_n_iterations: see above; None = on validation epoch end.
        num_reference: toy reference samples (images use the datamodule's training split).
        seed: sampling seed (the reference draw uses the Evaluator's own seed stream).
        use_ema: sample from the EMA generator.
        batch_size: samples per `sample()` call.
        class_labels: a class-conditional model's classes, "reference" (the reference set's proportions, as
            ``evaluate``) or "uniform" (random draws).
    """

    def __init__(self, nfe: Sequence[int] = (1, 2, 4), num: int = 1000, every_n_iterations: int | None = None,
                 num_reference: int = 5000, seed: int = 0, use_ema: bool = True, batch_size: int = 1000,
                 class_labels: str = "reference"):
        self.nfe = _nfe_list(nfe, "NFESweepCallback.nfe")
        self.num = _positive(num, "NFESweepCallback.num")
        self.every_n_iterations = _positive(every_n_iterations, "NFESweepCallback.every_n_iterations", allow_none=True)
        self.num_reference = _positive(num_reference, "NFESweepCallback.num_reference")
        self.batch_size = _positive(batch_size, "NFESweepCallback.batch_size")
        self.seed, self.use_ema = int(seed), bool(use_ema)
        if class_labels not in LABEL_DRAWS:
            raise ValueError(f"NFESweepCallback.class_labels: unknown {class_labels!r}; choose one of {LABEL_DRAWS}.")
        self.class_labels = class_labels
        self._evaluator = None
        self.last: dict[str, float] = {}  # the latest logged values (handy in tests and notebooks)

    def evaluator(self, trainer):
        if self._evaluator is None:
            datamodule = trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "reference_samples"):
                raise ValueError("NFESweepCallback: needs a lit_fewstep datamodule (trainer.fit(model, datamodule=...)) "
                                 "with reference_samples(); plain dataloaders carry no reference data.")
            self._evaluator = Evaluator(datamodule, num_reference=self.num_reference, seed=self.seed)
        return self._evaluator

    @torch.no_grad()
    def compute(self, trainer, pl_module) -> dict[str, float]:
        """``{"val/<metric>@<nfe>": value}`` for every NFE of the sweep (runs in this process only)."""
        evaluator = self.evaluator(trainer)
        out: dict[str, float] = {}
        for nfe in self.nfe:
            x, _, _, _ = evaluator.sample(pl_module, self.num, nfe, self.seed, self.use_ema, self.batch_size,
                                          self.class_labels)
            for name, value in evaluator.score(x).items():
                out[f"val/{name}@{nfe}"] = float(value)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (trainer.is_global_zero and _due(pl_module, self.every_n_iterations)):
            return
        self.last = self.compute(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=int(pl_module.iteration))

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.every_n_iterations is not None or trainer.sanity_checking:
            return
        metrics = self.compute(trainer, pl_module) if trainer.is_global_zero else None
        self.last = trainer.strategy.broadcast(metrics, src=0)
        for name, value in self.last.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)


class ThroughputCallback(Callback):
    """Logs ``perf/step_time_s`` (wall time of one training batch, all its phases, data loading excluded) and
    ``perf/samples_per_s`` (global batch size / step time) for every training batch.

    The values go through ``pl_module.log`` like the losses, so they reach the logger every
    ``log_every_n_steps``. CUDA work is synchronized before both clock reads.

    Args:
        prog_bar: also show samples/s in the progress bar.
    """

    def __init__(self, prog_bar: bool = False):
        self.prog_bar = bool(prog_bar)
        self._start: float | None = None
        self.last: dict[str, float] = {}

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @staticmethod
    def batch_size(batch) -> int:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict):
            x = next(iter(x.values()))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ThroughputCallback: cannot read a batch size from a batch of type {type(x).__name__}.")
        return int(x.shape[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        self._start = None
        samples = self.batch_size(batch) * trainer.world_size
        self.last = {"perf/step_time_s": seconds, "perf/samples_per_s": samples / seconds}
        pl_module.log("perf/step_time_s", seconds, on_step=True, on_epoch=False)
        pl_module.log("perf/samples_per_s", samples / seconds, on_step=True, on_epoch=False, prog_bar=self.prog_bar)
