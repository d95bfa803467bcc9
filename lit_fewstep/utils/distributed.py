"""Leaving a torch.distributed process group cleanly at the end of a run."""

from __future__ import annotations


def leave_process_group() -> None:
    """Destroy this process's default group if one is up. Left to interpreter exit, gloo's threads can abort the
    process ("terminate called without an active exception", status -6) after the run itself succeeded. No barrier:
    a rank that failed must not leave the others waiting; the group's last collective has completed on every rank
    that gets here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
