"""Helper of test_consistency.py: fit a consistency config for a few steps on N CPU processes (gloo DDP).

Run as a script (Lightning's DDP launcher re-executes this file once per extra rank):
    python tests/_consistency_ddp.py --config configs/scd/tree.yaml --teacher T.pt --devices 2 --steps 3 --out model.pt

The model and data come from the config's `model:` / `data:` sections (shrunk for speed); rank 0 exports the
trained module. (The CLI's `after_fit` export is not used: it queries `trainer.log_dir`, a collective, on rank 0 only.)
"""

from __future__ import annotations

import argparse

import lightning as L
import yaml

from lit_fewstep.utils.config import instantiate
from lit_fewstep.utils.distributed import leave_process_group

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = yaml.safe_load(open(args.config))
    model_cfg, data_cfg = config["model"], config["data"]
    model_cfg["init_args"]["net"]["init_args"].update(hidden=32, depth=2, emb_dim=16)
    if args.teacher is not None:
        model_cfg["init_args"]["teacher_ckpt"] = args.teacher
    data_cfg["init_args"].update(batch_size=32, num_train=256)
    L.seed_everything(0)
    model, data = instantiate(model_cfg), instantiate(data_cfg)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp_find_unused_parameters_true",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data)
    if trainer.is_global_zero:
        model.export(args.out)
        print(f"rank 0 exported after {int(model.iteration)} iterations on {trainer.world_size} processes")
    leave_process_group()
