"""Run configs/dmd2/tree.yaml under 2-process gloo DDP for a few iterations; check both ranks end with the
same weights. Used by tests/test_dmd.py: python tests/ddp_dmd2.py TEACHER_CKPT OUT_DIR (Lightning re-launches
this script once per extra rank)."""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import yaml

from lit_fewstep.utils.config import instantiate
from lit_fewstep.utils.distributed import leave_process_group

ROOT = Path(__file__).resolve().parents[1]


def main(teacher_ckpt: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    config = yaml.safe_load((ROOT / "configs" / "dmd2" / "tree.yaml").read_text())
    config["model"]["init_args"]["teacher_ckpt"] = teacher_ckpt
    config["data"]["init_args"].update(batch_size=32, num_train=512)
    L.seed_everything(0)
    model = instantiate(config["model"])
    data = instantiate(config["data"])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=12,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out_dir, limit_val_batches=0)
    trainer.fit(model, data)
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if trainer.global_rank == 0:
        assert int(model.iteration) > 1, int(model.iteration)
        assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
        print(f"DDP OK: {int(model.iteration)} iterations, {flat.numel()} trained parameters identical on 2 ranks")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
