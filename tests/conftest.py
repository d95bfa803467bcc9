import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny networks run fastest single-threaded on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300):
    """Run `python -m lit_fewstep ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lit_fewstep", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
