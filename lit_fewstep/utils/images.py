"""Pictures of samples: image grids and 2-D scatter plots written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["image_grid", "save_samples_png"]


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [H', W', C] uint8 grid (C = 1 or 3)."""
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = img.transpose(1, 2, 0)
    return ((np.clip(grid, -1, 1) + 1) * 127.5).round().astype(np.uint8)


def save_samples_png(samples: np.ndarray, path: str | Path, labels: np.ndarray | None = None, title: str = "") -> Path:
    """Images -> grid; 2-D points -> scatter (coloured by label when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        if labels is not None and len(labels) == len(samples):
            order = np.argsort(labels, kind="stable")
            samples = samples[order]
        grid = image_grid(samples)
        scale = max(1, 512 // grid.shape[0])  # small images: upscale for viewing
        grid = grid.repeat(scale, 0).repeat(scale, 1)
        plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    elif samples.ndim == 2 and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6, c=labels if labels is not None else None, cmap="tab10")
        ax.set_aspect("equal")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    else:
        raise ValueError(f"out: cannot draw samples of shape {samples.shape} as PNG; write .npz instead.")
    return path
