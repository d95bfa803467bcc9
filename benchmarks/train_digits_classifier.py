"""Train the digits classifier shipped as ``lit_fewstep/assets/digits_classifier.pt`` (offline FID feature net).

Reproduce the committed weights (CPU, ~1 min)::

    python benchmarks/train_digits_classifier.py

Data: the TRAIN split of ``lit_fewstep.data.DigitsDataModule(image_size=16, val_fraction=0.1, seed=0)``
(scikit-learn digits, x in [-1, 1], [B, 1, 16, 16]); accuracy is measured on that module's VAL split, which
is never used for training or model selection (the last epoch is saved). Augmentation: random shifts of
+-1 px (background -1 filled in). Everything is seeded; single-threaded deterministic CPU kernels, so the
same torch build on the same CPU reproduces the file bit for bit (other platforms reproduce the accuracy).

Result of the committed weights (also in the file's ``meta``; torch 2.14.1 CPU, ~50 s on 2 cores):
held-out val accuracy 0.9944 (178/179), train accuracy 0.9994 (1,618 train images), 392 KiB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.data.images import DigitsDataModule  # noqa: E402
from lit_fewstep.metrics.features import DigitsClassifier  # noqa: E402

# RESULT (committed weights): val accuracy 0.9944 (178/179) -- stored in meta["val_accuracy"].
COMMAND = "python benchmarks/train_digits_classifier.py"


def collect(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a (non-augmented) dataset, in stored order."""
    xs, ys = zip(*[(x, y) for x, y in DataLoader(dataset, batch_size=512, shuffle=False)])
    return torch.cat(xs).float(), torch.cat(ys).long()


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by an integer (dy, dx) in [-max_shift, max_shift]^2, filling with background (-1)."""
    b, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    d = torch.randint(0, 2 * p + 1, (b, 2), generator=g)
    rows = d[:, 0:1] + torch.arange(h)  # [B, H]
    cols = d[:, 1:2] + torch.arange(w)  # [B, W]
    return xp[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "lit_fewstep" / "assets" / "digits_classifier.pt"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    t0 = time.time()

    dm = DigitsDataModule(image_size=16, batch_size=256, val_fraction=0.1, seed=0)
    dm.setup("fit")
    xtr, ytr = collect(dm.train_dataset)  # all 1,618 train items (the module's loader drops the last batch)
    xva, yva = collect(dm.val_dataset)
    assert xtr.shape[1:] == (1, 16, 16) and xtr.min() >= -1 and xtr.max() <= 1, xtr.shape
    print(f"train {tuple(xtr.shape)}  val {tuple(xva.shape)}")

    net = DigitsClassifier(feature_dim=128, width=32)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        tot = 0.0
        for s in range(0, len(xtr), args.batch_size):
            idx = perm[s : s + args.batch_size]
            loss = F.cross_entropy(net(random_shift(xtr[idx], g)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {tot / len(xtr):.4f}  val_acc {accuracy(net, xva, yva):.4f}")

    val_acc = accuracy(net, xva, yva)
    train_acc = accuracy(net, xtr, ytr)
    meta = {
        "val_accuracy": val_acc,
        "train_accuracy": train_acc,
        "val_size": len(xva),
        "train_size": len(xtr),
        "image_size": 16,
        "feature_dim": 128,
        "width": 32,
        "epochs": args.epochs,
        "seed": args.seed,
        "data": "DigitsDataModule(image_size=16, val_fraction=0.1, seed=0)",
        "command": COMMAND + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])),
        "torch_version": str(torch.__version__),
    }
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, args.out)
    print(f"held-out val accuracy {val_acc:.4f} ({round(val_acc * len(xva))}/{len(xva)}), train accuracy {train_acc:.4f}")
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB) in {time.time() - t0:.0f} s")
    if val_acc < 0.97:
        raise SystemExit(f"val accuracy {val_acc:.4f} < 0.97")


if __name__ == "__main__":
    main()
