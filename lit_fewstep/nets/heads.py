"""Discriminator heads on a network's bottleneck features (DMD2, CTM, AYF adversarial fine-tuning)."""

from __future__ import annotations

import contextlib

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import check_class_labels
from .unet import group_norm
from ..utils.config import Configurable

__all__ = ["DiscriminatorHead"]


class DiscriminatorHead(Configurable, nn.Module):
    """Feature map [B, C, h, w] (or vector [B, C]) -> real/fake logit [B].

    Maps: 4x4 conv stride 2 -> GroupNorm -> SiLU -> global mean pool -> linear.
    Vectors ([B, C], e.g. MLP features) go through the same layers as a 1x1 map; the conv's padding
    grows so that its centre tap acts as a linear layer, i.e. a 2-layer MLP. One set of parameters
    serves both, so nothing is left unused under DDP.

    With ``num_classes > 0`` it is a projection discriminator: ``logit += <embed(y), pooled>``;
    label ``num_classes`` (or ``class_labels=None``) is the null label, as in the generators.

    Simpler than DMD2's official head (conv 4x4 / 2 -> GroupNorm -> SiLU -> conv 4x4 / 4 -> GroupNorm -> SiLU ->
    conv 1x1 on the encoder's 8x8 bottleneck): one strided conv and a mean pool instead of the second conv stage
    and the 1x1 conv, so it takes features of any size (our toys' vectors and 2x2 maps). See
    docs/distribution_matching.md for the comparison.
    """

    def __init__(self, in_channels: int, hidden: Optional[int] = None, num_classes: int = 0):
        super().__init__()
        hidden = in_channels if hidden is None else hidden
        self.in_channels = in_channels
        self.hidden = hidden
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, hidden, 4, stride=2, padding=1)
        self.norm = group_norm(hidden)
        self.fc = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None

    def forward(self, features: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features [B, C, h, w] or [B, C], class_labels int64 [B] or None -> logits [B]."""
        if features.dim() == 2:
            features = features[:, :, None, None]
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"features must have shape [B, {self.in_channels}, h, w] or [B, {self.in_channels}], got {list(features.shape)}"
            )
        if features.shape[-2:] == (1, 1):
            # One pixel (the toys' vectors): padded by 2 on each side, only the kernel's centre tap [2, 2] meets the
            # pixel, so the conv is exactly a linear layer with that tap; computed as one (on CPU the padded conv and
            # its backward took about 15x the time, a large share of a 2-D toy's GAN step).
            h = F.linear(features.flatten(1), self.conv.weight[:, :, 2, 2], self.conv.bias)[:, :, None, None]
        else:
            # A 4x4/stride-2 kernel needs >= 2 pixels with padding 1; on a size-1 axis pad 2 instead, so
            # exactly one tap (the centre) sees the pixel.
            padding = tuple(1 if n >= 2 else 2 for n in features.shape[-2:])
            # That padded case runs in float32 under autocast: torch 2.14's bf16 CPU kernel for the padded 1x1 map
            # returned a NaN weight gradient now and then (1 run in 30-40 here; never on 2x2 or larger maps).
            one_pixel = 2 in padding and torch.is_autocast_enabled(features.device.type)
            with torch.autocast(features.device.type, enabled=False) if one_pixel else contextlib.nullcontext():
                h = F.conv2d(features.float() if one_pixel else features, self.conv.weight, self.conv.bias,
                             stride=2, padding=padding)
        pooled = F.silu(self.norm(h)).mean(dim=(2, 3))  # [B, hidden]
        logits = self.fc(pooled).squeeze(1)
        labels = check_class_labels(class_labels, self.num_classes, features.shape[0], features.device)
        if labels is not None:
            logits = logits + (self.embed(labels) * pooled).sum(dim=1)
        return logits
