"""Nothing a user trained is lost: atomic checkpoint writes and a checkpoint on SIGTERM.

Under SLURM, Lightning's `SLURMEnvironment(auto_requeue=True)` saves `hpc_ckpt_N.ckpt` on the requeue signal
(SIGUSR1 with `#SBATCH --signal=SIGUSR1@90`) and requeues the job; a rerun restores it. `PreemptionCheckpoint`
moves that save to the end of the current batch, so the file always holds a whole iteration.
Outside SLURM a SIGTERM makes Lightning stop after the current batch; `PreemptionCheckpoint` writes
`<dirpath>/preempted.ckpt` first, so `fit --ckpt_path .../preempted.ckpt` continues exactly.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint import atomic_save, load_checkpoint, remove_stale_temporaries

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "preemption_checkpoint_dir"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but written to a temporary file and renamed into place:
    a kill during a save leaves the previous checkpoint readable."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        """`fit/validate/test --ckpt_path`: weights_only unless `--weights_only false`; errors in one line."""
        return load_checkpoint(path, trust=weights_only is False, field="ckpt_path", opt_in="--weights_only false")


def preemption_checkpoint_dir(trainer: Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (Lightning sets `trainer.received_sigterm`), save `preempted.ckpt` before the run stops.

    Under SLURM auto-requeue, Lightning saves `hpc_ckpt_N.ckpt` from inside the signal handler, that is
    wherever the training step happens to be (after an optimizer step, before the iteration counter moves):
    such a file does not resume exactly. This callback defers the requeue signal to the end of the batch.
    """

    def __init__(self, filename: str = "preempted.ckpt"):
        self.filename = filename
        self._requeue_signal = None
        self._lightning_handler = None
        self._pending = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # A process killed during a save leaves its temporary file (atomic_save's name pattern) behind.
        folders = {preemption_checkpoint_dir(trainer), Path(trainer.log_dir or trainer.default_root_dir)}
        if trainer.is_global_zero:
            for folder in sorted(folders):
                for path in remove_stale_temporaries(folder):
                    print(f"removed {path}, left by a save that was killed", flush=True)

        env = getattr(trainer.strategy, "cluster_environment", None)
        if not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._requeue_signal = env.requeue_signal or signal.SIGUSR1
        self._lightning_handler = signal.getsignal(self._requeue_signal)
        if callable(self._lightning_handler):
            signal.signal(self._requeue_signal, self._defer)

    def _defer(self, signum, frame) -> None:
        self._pending = (signum, frame)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._requeue_signal is not None and callable(self._lightning_handler):
            signal.signal(self._requeue_signal, self._lightning_handler)
        # Periodic saves every N steps miss the end of a run whose length N does not divide: write last.ckpt at the
        # end too, so it always holds the finished run (not on an interrupted one: that wrote preempted.ckpt).
        callback = trainer.checkpoint_callback
        if (callback is not None and getattr(callback, "save_last", False) and not trainer.interrupted
                and getattr(callback, "_last_global_step_saved", -1) != trainer.global_step and callback.dirpath):
            trainer.save_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self._pending is not None:  # the requeue signal came during this batch: let Lightning save and requeue now
            pending, self._pending = self._pending, None
            self._lightning_handler(*pending)
        if trainer.received_sigterm:
            path = preemption_checkpoint_dir(trainer) / self.filename
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                print(f"SIGTERM: saved {path}; resume with --ckpt_path {path}", flush=True)

    def state_dict(self) -> dict:
        return {}
