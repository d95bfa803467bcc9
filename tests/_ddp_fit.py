"""Helper of test_ddp.py: fit a tiny EDM teacher for a few steps on 1 or N CPU processes and save its weights.

Run as a script (Lightning's DDP launcher re-executes this file once per extra rank):
    python tests/_ddp_fit.py --devices 2 --steps 6 --out weights.pt

Nothing here is special to the test: the real `EDMDiffusion` and `Toy2DDataModule`, per-process batch =
global batch / N. Equality with one process rests on the package's own design:
- data: the train loader's `EpochShuffleSampler` gives rank r the items perm[r::N] of the epoch's permutation,
  so the union of the ranks' k-th batches is the single-process k-th batch;
- noise: `FewStepModule.randn/rand` draw for the global batch from a generator keyed by (seed, iteration, draw)
  and hand each rank its slice.
An NFESweepCallback scores samples on rank 0 alone mid-training: it must neither hang nor disturb the ranks.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.methods import EDMDiffusion
from lit_fewstep.metrics import NFESweepCallback
from lit_fewstep.nets import MLP
from lit_fewstep.utils.distributed import leave_process_group

GLOBAL_BATCH = 64


def fit(devices: int, steps: int, seed: int = 0):
    """Returns (model, trainer, sweep); the sweep callback scores samples on rank 0 after iteration 3."""
    L.seed_everything(seed)
    net = MLP(dim=2, hidden=64, depth=2, emb_dim=32, num_classes=2)
    model = EDMDiffusion(net, sigma_data=1.062, lr=2e-3, ema_decay=0.9, label_dropout=0.1)
    data = Toy2DDataModule(name="tree", batch_size=GLOBAL_BATCH // devices, num_train=GLOBAL_BATCH * 8, seed=seed)
    sweep = NFESweepCallback(nfe=(1, 2), num=200, every_n_iterations=3, num_reference=400)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[sweep])
    trainer.fit(model, data)
    return model, trainer, sweep


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, trainer, sweep = fit(args.devices, args.steps)
    # every rank checks that it ends with the same weights as rank 0, then rank 0 writes them
    flat = torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])
    gathered = trainer.strategy.all_gather(flat)
    if trainer.is_global_zero:
        spread = float((gathered - gathered[0]).abs().max()) if gathered.dim() > 1 else 0.0
        torch.save({"state_dict": model.state_dict(), "rank_spread": spread, "world_size": trainer.world_size,
                    "iteration": int(model.iteration), "sweep": sweep.last}, args.out)
    leave_process_group()


if __name__ == "__main__":
    main()
