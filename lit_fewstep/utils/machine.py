"""One description of the machine a figure was measured on, for benchmark tables and `evaluate`'s JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "describe_machine"]


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(note: str | None = None) -> str:
    """CPU model and cores, torch threads, GPU (if any), versions; `note` is appended (e.g. who shared the CPU)."""
    import lightning

    parts = [f"{cpu_name()}, {os.cpu_count()} logical cores", f"torch threads {torch.get_num_threads()}",
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
                 f"{platform.system()} {platform.release()}")
    if note:
        parts.append(note)
    return "; ".join(parts)
