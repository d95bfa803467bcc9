"""Residual MLP for 2-D toy data (and any flat vector data)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditionEmbedding, concat_extra
from ..utils.config import Configurable

__all__ = ["MLP"]


class _FiLMBlock(nn.Module):
    """h + W2 silu(W1 (LN(h) * (1 + scale(c)) + shift(c))), h [B, hidden], c [B, cond_dim]."""

    def __init__(self, hidden: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.fc2(self.drop(F.silu(self.fc1(y))))
        return h + y


class MLP(Configurable, nn.Module):
    """Conditional residual MLP: x [B, dim] -> [B, dim].

    Args:
        dim: data dimension (``in_channels`` = ``out_channels`` = dim).
        hidden: width of the residual stream (``feature_channels``).
        depth: number of residual FiLM blocks.
        emb_dim: size of the sinusoidal embedding of each scalar input.
        num_classes: real classes (0 = unconditional); label ``num_classes`` is the null label.
        second_time: accept ``s_labels`` (two-time models: CTM, flow maps).
        guidance_embed: accept a guidance-scale input ``guidance``.
        guidance_null: the guidance scale whose embedding is pinned at zero (`ConditionEmbedding`).
        extra_channels: size of the optional ``extra`` vector concatenated to x.
        dropout: dropout inside each block.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        num_classes: int = 0,
        second_time: bool = False,
        guidance_embed: bool = False,
        extra_channels: int = 0,
        dropout: float = 0.0,
        guidance_null: Optional[float] = None,
    ):
        super().__init__()
        self.in_channels = dim
        self.out_channels = dim
        self.num_classes = num_classes
        self.img_resolution = None
        self.second_time = second_time
        self.guidance_embed = guidance_embed
        self.extra_channels = extra_channels
        self.feature_channels = hidden

        self.cond = ConditionEmbedding(emb_dim, hidden, num_classes, second_time, guidance_embed,
                                       guidance_null=guidance_null)
        self.inp = nn.Linear(dim + extra_channels, hidden)
        self.blocks = nn.ModuleList([_FiLMBlock(hidden, hidden, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # Zero output: the untrained net predicts 0 (a neutral start for any parameterization).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def feature_shape(self) -> tuple:
        return (self.feature_channels,)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        s_labels: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
        extra: Optional[torch.Tensor] = None,
        return_features: bool = False,
    ):
        """x [B, dim], noise_labels [B] -> out [B, dim] (and features [B, hidden] if asked)."""
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}], got {list(x.shape)}")
        c = F.silu(self.cond(noise_labels, x.shape[0], class_labels, s_labels, guidance))
        h = self.inp(concat_extra(x, extra, self.extra_channels))
        for block in self.blocks:
            h = block(h, c)
        features = F.silu(self.norm_out(h))
        out = self.out(features)
        return (out, features) if return_features else out
