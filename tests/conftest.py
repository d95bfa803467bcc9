import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]

# Tiny networks run fastest single-threaded on the 2-core CI machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The long end-to-end tests (marked slow) first: under pytest-xdist the short ones then keep every worker busy to
    the end, instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300):
    """Run `python -m lit_fewstep ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lit_fewstep", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class StopAtIteration(Callback):
    """Stop on the module's own iteration counter: `max_steps` counts optimizer steps (several per TTUR batch)."""

    def __init__(self, iterations: int):
        self.iterations = iterations

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if int(pl_module.iteration) >= self.iterations:
            trainer.should_stop = True


@pytest.fixture
def float32_default_dtype():
    """Some test files set torch's default dtype to float64; training runs build float32 modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)
