"""Offline data modules: 2-D toys with exact samplers/densities and local image sets (nothing is downloaded).

Every data module yields ``(x, y)`` batches (``y`` int64 labels) and exposes ``data_shape``, ``num_classes``,
``sigma_data``, ``is_image`` and ``reference_samples(n, seed=0, split="val")``.
"""

from lit_fewstep.data.images import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    stratified_split,
)
from lit_fewstep.data.toy import (
    TOY_NAMES,
    Checkerboard,
    GaussianMixture2D,
    Toy2DDataModule,
    ToyDistribution,
    TwoMoons,
    TwoSpirals,
    eight_gaussians,
    make_toy,
    tree,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
    "stratified_split",
    "TOY_NAMES",
    "Checkerboard",
    "GaussianMixture2D",
    "Toy2DDataModule",
    "ToyDistribution",
    "TwoMoons",
    "TwoSpirals",
    "eight_gaussians",
    "make_toy",
    "tree",
]
