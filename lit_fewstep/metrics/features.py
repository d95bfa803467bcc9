"""A small digits classifier shipped with the package, used as an offline FID/KID/precision-recall feature net.

Weights: ``lit_fewstep/assets/digits_classifier.pt`` (a plain ``state_dict`` plus a metadata dict, loadable with
``weights_only=True``), trained by ``python benchmarks/train_digits_classifier.py`` on the train split of
``lit_fewstep.data.DigitsDataModule(image_size=16, val_fraction=0.1, seed=0)``; its held-out accuracy on that
module's val split is stored in the file's metadata (see :func:`load_digits_classifier`).
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsClassifier", "DigitsFeatures", "load_digits_classifier", "load_digits_features", "DIGITS_WEIGHTS"]

DIGITS_WEIGHTS = "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    """Tiny CNN for grayscale digits ``[N, 1, 16, 16]`` in [-1, 1] (``[N, 1, 8, 8]`` is bilinearly upsampled).

    ``features(x)`` -> penultimate activations ``[N, feature_dim]``; ``forward(x)`` -> logits ``[N, 10]``.
    """

    def __init__(self, feature_dim: int = 128, num_classes: int = 10, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.AdaptiveAvgPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """Check shape and bring 8x8 inputs to 16x16 (bilinear, ``align_corners=False``)."""
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) not in ((16, 16), (8, 8)):
            raise ValueError(f"DigitsClassifier: expected images [N, 1, 16, 16] or [N, 1, 8, 8], got {tuple(x.shape)}")
        x = x.float()
        if x.shape[-1] == 8:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class DigitsFeatures(nn.Module):
    """Images -> classifier features ``[N, num_features]``; usable as torchmetrics' ``feature=`` module.

    torchmetrics hands images to a custom feature module unchanged (its ``normalize`` flag only rescales for
    its built-in Inception), so this module accepts: float images in [-1, 1] (the package's data range), or
    uint8 images in [0, 255] (mapped to [-1, 1]); 1 or 3 channels (RGB is averaged to gray); 16x16 or 8x8.
    Always in eval mode, without gradients.
    """

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = int(classifier.feature_dim)

    def train(self, mode: bool = True) -> "DigitsFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        if x.dim() == 4 and x.shape[1] == 3:
            x = x.float().mean(1, keepdim=True)
        return self.classifier.features(x)


def _asset_bytes_path():
    return resources.files("lit_fewstep") / "assets" / DIGITS_WEIGHTS


def load_digits_classifier(path: str | None = None) -> tuple[DigitsClassifier, dict]:
    """Load the committed (or a given) classifier checkpoint with ``weights_only=True``.

    Returns ``(classifier in eval mode, metadata dict)``; metadata holds ``val_accuracy``, ``image_size``,
    ``feature_dim``, ``width`` and the ``command`` that trained it.
    """
    if path is None:
        with resources.as_file(_asset_bytes_path()) as p:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(ckpt.get("meta", {}))
    net = DigitsClassifier(feature_dim=int(meta.get("feature_dim", 128)), width=int(meta.get("width", 32)))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False), meta


def load_digits_features(path: str | None = None) -> DigitsFeatures:
    """The shipped digits feature net (``num_features`` = 128), ready for ``make_fid`` / ``make_kid``."""
    return DigitsFeatures(load_digits_classifier(path)[0])
