"""DiT (Peebles & Xie, 2023) with adaLN-Zero blocks, built from timm's ``Mlp``.

With ``resolutions`` one DiT serves several input sizes: the token grid follows the input, and the
position embedding defined on the reference grid is resampled to it (bicubic on the 2-D grid, the way
pretrained vision transformers are fine-tuned at a new size).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, resample_abs_pos_embed
from torch import nn

from .embeddings import ConditionEmbedding, attention, check_resolutions, concat_extra, image_resolution
from ..utils.config import Configurable

__all__ = ["DiT", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim]: half the channels encode rows, half columns."""
    if dim % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        args = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class _SelfAttention(nn.Module):
    """Token self-attention [B, N, D] -> [B, N, D]; uses the explicit (forward-AD safe) attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        return self.proj(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x [B, N, D], e = silu(c) [B, D] -> [B, N, D]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = _SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        # adaLN-Zero: zero gates make every block the identity at init.
        self.ada = nn.Linear(hidden_size, 6 * hidden_size)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(e)[:, None, :].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(Configurable, nn.Module):
    """Diffusion transformer: x [B, in_channels, R, R] -> [B, out_channels, R, R].

    Args:
        img_resolution: R; must be divisible by ``patch_size``. With ``resolutions`` it is the
            reference size whose token grid the position embedding is defined on (and the default
            sample size); it must be listed.
        in_channels / out_channels: image channels (out_channels defaults to in_channels).
        patch_size: p; the sequence has N = (R/p)^2 tokens.
        hidden_size: token width D (``feature_channels``); divisible by 4 and by num_heads.
        depth, num_heads, mlp_ratio: transformer size.
        num_classes: real classes (0 = unconditional); label ``num_classes`` is the null label.
        second_time: accept ``s_labels``. guidance_embed: accept ``guidance``.
        guidance_null: the guidance scale whose embedding is pinned at zero (`ConditionEmbedding`).
        extra_channels: channels of the optional ``extra`` input concatenated to x before patching.
        resolutions: None (default) accepts only ``img_resolution`` and adds no parameters. A list,
            e.g. ``(8, 16, 32)`` (each divisible by ``patch_size``), makes the net accept any listed
            size: the input of size r is cut into (r/p)^2 tokens, the position embedding is resampled
            from the reference grid to the r/p grid (:meth:`position_embedding`), and a learned
            embedding of the size's index (in sorted order) is added to the conditioning vector.

    Forward keywords: ``class_labels`` [B] int64; ``s_labels`` [B] (second time, with
    ``second_time``); ``guidance`` [B] (guidance scale, with ``guidance_embed``); ``extra``
    [B, extra_channels, R, R] (e.g. an upsampled low-resolution image and/or a self-conditioning
    estimate; None reads as zeros); ``resolution`` (optional cross-check: the input's size);
    ``return_features``. An input the net was not built for raises ValueError.
    """

    def __init__(
        self,
        img_resolution: int = 16,
        in_channels: int = 1,
        out_channels: Optional[int] = None,
        patch_size: int = 2,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        second_time: bool = False,
        guidance_embed: bool = False,
        extra_channels: int = 0,
        resolutions: Optional[Sequence[int]] = None,
        guidance_null: Optional[float] = None,
    ):
        super().__init__()
        if img_resolution % patch_size != 0:
            raise ValueError(f"img_resolution={img_resolution} must be divisible by patch_size={patch_size}")
        self.resolutions = check_resolutions(resolutions, img_resolution, patch_size, "patch_size")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.second_time = second_time
        self.guidance_embed = guidance_embed
        self.extra_channels = extra_channels
        self.patch_size = patch_size
        self.grid = img_resolution // patch_size
        self.feature_channels = hidden_size

        num_resolutions = 0 if self.resolutions is None else len(self.resolutions)
        self.cond = ConditionEmbedding(256, hidden_size, num_classes, second_time, guidance_embed, num_resolutions,
                                       guidance_null)
        self.patch = nn.Conv2d(in_channels + extra_channels, hidden_size, patch_size, stride=patch_size)
        # Fixed, so not a parameter; non-persistent so checkpoints do not carry it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def feature_shape(self) -> tuple:
        return (self.feature_channels, self.grid, self.grid)

    def position_embedding(self, grid: int) -> torch.Tensor:
        """Position embedding [1, grid*grid, hidden_size] for a ``grid`` x ``grid`` token map.

        At the reference grid (``img_resolution / patch_size``) this is the stored buffer itself;
        at any other grid it is that buffer resampled bicubically as a 2-D map (timm's
        ``resample_abs_pos_embed``, computed in float32), so a token keeps the embedding of the same
        relative position in the image whatever the input size.
        """
        if grid == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, [grid, grid], old_size=[self.grid, self.grid], num_prefix_tokens=0)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        s_labels: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
        extra: Optional[torch.Tensor] = None,
        return_features: bool = False,
        resolution: Optional[int] = None,
    ):
        """x [B, in_channels, R, R], noise_labels [B] -> [B, out_channels, R, R]
        (and token features [B, hidden_size, R/p, R/p] if ``return_features``)."""
        r, res_index = image_resolution(x, self.in_channels, self.img_resolution, self.resolutions, resolution)
        grid = r // self.patch_size
        e = F.silu(self.cond(noise_labels, x.shape[0], class_labels, s_labels, guidance, res_index))

        h = self.patch(concat_extra(x, extra, self.extra_channels)).flatten(2).transpose(1, 2)  # [B, N, D]
        h = h + self.position_embedding(grid).to(h.dtype)
        for block in self.blocks:
            h = block(h, e)
        features = rearrange(h, "b (gh gw) d -> b d gh gw", gh=grid)

        shift, scale = self.ada_out(e)[:, None, :].chunk(2, dim=-1)
        out = self.out(_modulate(self.norm_out(h), shift, scale))
        out = rearrange(out, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=grid, p1=self.patch_size, p2=self.patch_size)
        return (out, features) if return_features else out
