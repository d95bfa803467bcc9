"""Nothing a user trained is lost: atomic checkpoint writes and a checkpoint on SIGTERM.

Under SLURM, Lightning's `SLURMEnvironment(auto_requeue=True)` already saves `hpc_ckpt_N.ckpt` on the
requeue signal (SIGUSR1 with `#SBATCH --signal=SIGUSR1@90`) and requeues the job; a rerun restores it.
Outside SLURM a SIGTERM makes Lightning stop after the current batch; `PreemptionCheckpoint` writes
`<dirpath>/preempted.ckpt` first, so `fit --ckpt_path .../preempted.ckpt` continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint import atomic_save

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "preemption_checkpoint_dir"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but written to a temporary file and renamed into place:
    a kill during a save leaves the previous checkpoint readable."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        atomic_save(checkpoint, path)


def preemption_checkpoint_dir(trainer: Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (Lightning sets `trainer.received_sigterm`), save `preempted.ckpt` before the run stops."""

    def __init__(self, filename: str = "preempted.ckpt"):
        self.filename = filename

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            path = preemption_checkpoint_dir(trainer) / self.filename
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                print(f"SIGTERM: saved {path}; resume with --ckpt_path {path}", flush=True)

    def state_dict(self) -> dict:
        return {}
