"""A progress bar in iterations: one bar for the whole run, the module's `iteration` out of the run's total.

Lightning's bar restarts every epoch and counts batches of that epoch (25 for the digits), with no total for a run
bounded by `max_steps` (optimizer steps, several per iteration under a two-time-scale schedule). `FewStepModule`
puts `IterationProgressBar` in place of Lightning's `TQDMProgressBar` (same settings) when the trainer shows one.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

__all__ = ["IterationProgressBar", "total_iterations"]


def total_iterations(trainer, module) -> int | None:
    """Iterations this fit will reach: the tighter of `max_steps` (through the module's schedule,
    `iterations_for`) and `max_epochs` x batches per epoch; None when neither bounds the run."""
    bounds = []
    max_steps = getattr(trainer, "max_steps", -1)
    iterations_for = getattr(module, "iterations_for", None)
    if max_steps is not None and max_steps > 0 and iterations_for is not None:
        iterations = iterations_for(max_steps)
        if iterations is not None:
            bounds.append(iterations)
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        bounds.append(int(trainer.max_epochs * batches))
    return min(bounds) if bounds else None


class IterationProgressBar(TQDMProgressBar):
    """`TQDMProgressBar` counting `pl_module.iteration` across epochs, out of `total_iterations`; the epoch is
    shown among the bar's values."""

    @classmethod
    def like(cls, bar: TQDMProgressBar) -> "IterationProgressBar":
        return cls(refresh_rate=bar.refresh_rate, process_position=bar.process_position, leave=bar._leave)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        total = total_iterations(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset()
        bar.total = total
        done = int(getattr(pl_module, "iteration", 0))
        bar.initial = done  # a resumed run: the rate counts this run's iterations only
        _update_n(bar, done)
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        """One bar for the run: nothing to restart."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = int(getattr(pl_module, "iteration", batch_idx + 1))
        bar = self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return {"epoch": trainer.current_epoch, **super().get_metrics(trainer, pl_module)}
