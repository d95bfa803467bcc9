"""configs/trainer/slurm_ddp.yaml and benchmarks/slurm/*.sbatch, under simulated SLURM variables.

The fit command is the one train.sbatch runs (CPU and one task instead of GPUs): SIGUSR1 must write
hpc_ckpt_1.ckpt and call `scontrol requeue <job id>`, and the rerun with the same run dir must resume from it.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def slurm_env(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"  # records its arguments instead of talking to a controller
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                SLURM_JOB_ID="4242", SLURM_JOB_NAME="lit_fewstep", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                SLURM_NNODES="1", SLURM_NODELIST="127.0.0.1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def fit_command(run_dir, max_steps: int) -> list[str]:
    # train.sbatch's srun line, with CPU in place of GPUs
    return [sys.executable, "-m", "lit_fewstep", "fit", "--config", "configs/edm/tree.yaml",
            "--config", "configs/trainer/slurm_ddp.yaml", "--trainer.accelerator", "cpu",
            "--trainer.num_nodes", "1", "--trainer.devices", "1", "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.max_steps", str(max_steps),
            "--trainer.enable_progress_bar", "true", "--data.init_args.batch_size", "64",
            "--data.init_args.num_train", "640",
            "--trainer.check_val_every_n_epoch", "100"]


class Output:
    """Collects a process's merged stdout/stderr in a thread (the progress bar writes without newlines)."""

    def __init__(self, proc):
        self.proc, self.chunks = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read(256), ""):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, condition, seconds: float, what: str):
        deadline = time.time() + seconds
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"fit exited early ({self.proc.returncode}) waiting for {what}:\n{self.text[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"no {what} within {seconds} s:\n{self.text[-3000:]}")
            time.sleep(0.2)


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_rerun_resumes(tmp_path):
    env, run_dir = slurm_env(tmp_path), tmp_path / "run"
    proc = subprocess.Popen(fit_command(run_dir, 100_000), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        # the progress bar (iterations of the run, the epoch among its values) reaches epoch 1 after 10 batches:
        # training is under way
        output.wait_for(lambda: "epoch=1" in output.text, 120, "second epoch")
        proc.send_signal(signal.SIGUSR1)
        output.wait_for((tmp_path / "scontrol.log").exists, 60, "scontrol call")
    finally:
        proc.terminate()  # SLURM would kill the job here
        proc.wait(timeout=60)
        output.thread.join(timeout=10)
    assert "Handling auto-requeue signal" in output.text, output.text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    step, iteration = saved["global_step"], int(saved["state_dict"]["iteration"])
    assert step > 0 and not any(k.startswith("teacher.") for k in saved["state_dict"])
    # PreemptionCheckpoint defers Lightning's save to the end of the batch: a whole iteration (one optimizer
    # step per iteration for this teacher), never a file written between the optimizer step and `iteration += 1`
    assert iteration == step

    # the requeued job: same variables, same run dir, no ckpt_path -> resumes from hpc_ckpt_1 and runs 3 more steps
    rerun = subprocess.run(fit_command(run_dir, step + 3), cwd=ROOT, env=slurm_env(tmp_path), capture_output=True,
                           text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"Restored all states from the checkpoint at .*hpc_ckpt_1\.ckpt", rerun.stdout + rerun.stderr)
    # the rerun logs to a new version folder (never over the first run's); latest points to it
    assert (run_dir / "edm_tree" / "latest").resolve() == (run_dir / "edm_tree" / "version_1").resolve()
    exported = torch.load(run_dir / "edm_tree" / "latest" / "model.pt", map_location="cpu", weights_only=True)
    assert int(exported["state_dict"]["iteration"]) == iteration + 3  # 3 more one-phase iterations


@pytest.mark.parametrize("name", ["train.sbatch", "evaluate.sbatch"])
def test_sbatch_templates(name):
    text = (ROOT / "benchmarks" / "slurm" / name).read_text()
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0
    for directive in ("--signal=", "--requeue", "--gpus-per-task=1", "--open-mode=append"):
        assert re.search(rf"^#SBATCH {directive}", text, re.M), directive
    assert re.search(r"^srun .*python -m lit_fewstep (fit|evaluate)", text, re.M)
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for path in re.findall(r"configs/\S+\.yaml", commands):
        assert (ROOT / path).exists(), path
    if name == "train.sbatch":
        assert "#SBATCH --signal=SIGUSR1@90" in text and "configs/trainer/slurm_ddp.yaml" in text
