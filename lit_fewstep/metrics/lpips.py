"""LPIPS-VGG (Zhang et al., CVPR 2018) from local files only: the distance of CM (consistency losses) and DMD
(regression, DMD Eq. 9). Nothing is downloaded.

Two file layouts are accepted (loaded with weights_only=True):
* the `lpips` package's ``LPIPS(net="vgg").state_dict()``: backbone ``net.slice{1..5}.*`` and heads
  ``lin{0..4}.model.1.weight`` in one file;
* torchvision's VGG16 state dict (``vgg16-397923af.pth``, keys ``features.{i}.*``): the backbone only; the heads
  are then the official v0.1 ones that torchmetrics ships (``torchmetrics/functional/image/lpips_models/vgg.pth``).
Images in [-1, 1], upsampled bilinearly to ``resolution`` (224 in CM and DMD), grey images repeated to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LPIPS", "torchmetrics_lpips_heads"]


def torchmetrics_lpips_heads() -> Path:
    """The official LPIPS v0.1 VGG linear heads as shipped in torchmetrics' wheel."""
    import torchmetrics

    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"


class LPIPS(nn.Module):
    """d(a, b) = sum_l mean_hw w_l . (f_l(a) / |f_l(a)| - f_l(b) / |f_l(b)|)^2, with f_l the VGG16 activations
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (unit-normalised over channels) and w_l >= 0 the learned heads.

    Args:
        weights_path: a local file in one of the two layouts of the module docstring.
        resolution: side both images are resized to before the backbone.
        field: the config field named in errors.
    """

    _SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision VGG16 `features` index ranges
    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, weights_path: str, resolution: int = 224, field: str = "lpips_weights"):
        super().__init__()
        from torchvision.models import vgg16

        if not isinstance(weights_path, (str, os.PathLike)) or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"{field}: {weights_path!r} does not exist; give a local LPIPS-VGG state dict (lpips package layout) "
                "or torchvision's vgg16-397923af.pth (LPIPS weights are never downloaded).")
        features = vgg16(weights=None).features
        self.slices = nn.ModuleList(nn.Sequential(*[features[i] for i in range(a, b)]) for a, b in self._SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self._CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.resolution = resolution
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{field}: {weights_path!r} is not a state dict.")
        if any(k.startswith("features.") for k in state):  # torchvision backbone + torchmetrics' heads
            state = {**state, **torch.load(torchmetrics_lpips_heads(), map_location="cpu", weights_only=True)}
        missing, _ = self.load_state_dict(self._mapped(state), strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]  # the official constants when absent
        if missing:
            raise ValueError(f"{field}: {weights_path!r} lacks {missing[:3]}...; expected the lpips package's "
                             "LPIPS(net='vgg') state dict or torchvision's VGG16 state dict.")
        self.requires_grad_(False).eval()

    def _mapped(self, state: dict) -> dict:
        """Keys of either layout -> ``slices.{s}.{j}.*``, ``lins.{l}.weight``, ``shift``/``scale``."""
        start = {a + j: (s, j) for s, (a, b) in enumerate(self._SLICES) for j in range(b - a)}
        mapped = {}
        for key, value in state.items():
            if key.startswith("net.slice"):  # lpips package: net.slice{s}.{torchvision index}.{name}
                s, rest = key[len("net.slice"):].split(".", 1)
                idx, name = rest.split(".", 1)
                mapped[f"slices.{int(s) - 1}.{int(idx) - self._SLICES[int(s) - 1][0]}.{name}"] = value
            elif key.startswith("features."):  # torchvision: features.{index}.{name}
                idx, name = key[len("features."):].split(".", 1)
                if int(idx) in start:
                    s, j = start[int(idx)]
                    mapped[f"slices.{s}.{j}.{name}"] = value
            elif key.startswith("lin") and key.endswith("model.1.weight"):
                mapped[f"lins.{int(key[3])}.weight"] = value
            elif key.startswith("scaling_layer."):
                mapped[key.split(".", 1)[1]] = value.reshape(1, 3, 1, 1)
        return mapped

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen feature network: stays in eval mode

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised activations of the five slices."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        h, feats = (x - self.shift) / self.scale, []
        for block in self.slices:
            h = block(h)
            feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b [B, C, H, W] in [-1, 1] -> [B]."""
        return sum(lin((fa - fb) ** 2).mean((1, 2, 3)) for lin, fa, fb in zip(self.lins, self.features(a),
                                                                                 self.features(b)))
