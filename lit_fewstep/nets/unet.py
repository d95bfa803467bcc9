"""EDM/ADM-style UNet: AdaGN residual blocks, self-attention at chosen resolutions, skip connections.

The net is fully convolutional, so with ``resolutions`` one set of weights serves several input
sizes (a cascade that generates at low resolution first, then refines at higher ones conditioned on
the upsampled result; a teacher used at another size than it was built for).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditionEmbedding, attention, check_resolutions, concat_extra, image_resolution
from ..utils.config import Configurable

__all__ = ["UNet"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= min(32, C // 4) that divides C (>= 4 channels per group)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups != 0:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """x [B, cin, H, W], e = silu(c) [B, cond_dim] -> [B, cout, H, W].

    The conditioning enters as adaptive scale/shift after the second GroupNorm (AdaGN, ADM/EDM).
    The last conv starts at zero so every block starts as (a projection of) the identity.

    With ``guidance_adapter`` the block has a second modulation layer of its own for guidance, fed the part of the
    conditioning that guidance adds (``e_guided``, exactly zero at the unguided scale): it starts at zero and has no
    bias, so at the unguided scale the block computes what it computes without it, bit for bit.

    With ``guidance_rank > 0`` the adapter also has a convolutional branch of that many channels, added to the block's
    output: conv_b(silu(conv_a(silu(norm1(x)))) * gate(e_guided)), the gate bias-free and conv_b starting at zero and
    bias-free, so it too is exactly zero at the unguided scale.
    """

    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float, guidance_adapter: bool = False,
                 guidance_rank: int = 0):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(cond_dim, 2 * cout)
        self.guidance_affine = nn.Linear(cond_dim, 2 * cout, bias=False) if guidance_adapter else None
        if self.guidance_affine is not None:
            nn.init.zeros_(self.guidance_affine.weight)
        self.guidance_branch = (_GuidanceBranch(cin, cout, cond_dim, guidance_rank)
                                if guidance_adapter and guidance_rank > 0 else None)
        self.norm2 = group_norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor, e_guided: Optional[torch.Tensor] = None) -> torch.Tensor:
        normed = F.silu(self.norm1(x))
        h = self.conv1(normed)
        modulation = self.affine(e)
        if self.guidance_affine is not None:
            modulation = modulation + self.guidance_affine(e_guided)
        scale, shift = modulation[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.drop(h))
        if self.guidance_branch is not None:
            return self.skip(x) + h + self.guidance_branch(normed, e_guided)
        return self.skip(x) + h


class _GuidanceBranch(nn.Module):
    """A ResBlock's convolutional guidance adapter: conv_b(silu(conv_a(h)) * gate(e_guided)), zero where e_guided is."""

    def __init__(self, cin: int, cout: int, cond_dim: int, rank: int):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, rank, 3, padding=1)
        self.gate = nn.Linear(cond_dim, rank, bias=False)
        self.conv_b = nn.Conv2d(rank, cout, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv_b.weight)

    def forward(self, h: torch.Tensor, e_guided: torch.Tensor) -> torch.Tensor:
        return self.conv_b(F.silu(self.conv_a(h)) * self.gate(e_guided)[:, :, None, None])


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; x [B, C, H, W] -> same."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels} at every attention level")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-2, -1).unbind(1)  # each [B, heads, HW, d]
        out = attention(q, k, v).transpose(-2, -1).reshape(B, C, H, W)
        return x + self.proj(out)


class _Level(nn.Module):
    """A ResBlock optionally followed by attention (ADM's per-resolution unit)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float, attn: bool, num_heads: int,
                 guidance_adapter: bool = False, guidance_rank: int = 0):
        super().__init__()
        self.res = ResBlock(cin, cout, cond_dim, dropout, guidance_adapter, guidance_rank)
        self.attn = AttnBlock(cout, num_heads) if attn else None

    def forward(self, x: torch.Tensor, e: torch.Tensor, e_guided: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.res(x, e, e_guided)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """3x3 conv, stride 2: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to an explicit size, then 3x3 conv.

    The target size comes from the matching skip so odd resolutions (28 -> 14 -> 7 -> 4) come back exactly.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(Configurable, nn.Module):
    """Conditional UNet: x [B, in_channels, R, R] -> [B, out_channels, R, R] with R = img_resolution
    (or any R listed in ``resolutions``).

    Args:
        img_resolution: input height = width (any size; each level halves it, rounding up). With
            ``resolutions`` it is the reference size: the one ``attn_resolutions`` and
            ``feature_shape`` refer to, and the default sample size; it must be listed.
        in_channels / out_channels: image channels (out_channels defaults to in_channels).
        model_channels: width of the first level; level i has ``model_channels * channel_mult[i]``.
        channel_mult: one entry per resolution level.
        num_blocks: residual blocks per level in the encoder (decoder has one more, as in ADM).
        attn_resolutions: resolutions (height) where self-attention follows each block; resolutions
            that never occur are simply unused (e.g. (8,) at img_resolution=28). The middle block
            (Res, Attn, Res, as in ADM) always attends.
        dropout: dropout inside residual blocks.
        num_classes: real classes (0 = unconditional); label ``num_classes`` is the null label.
        second_time: accept ``s_labels``. guidance_embed: accept ``guidance``.
        guidance_null: the guidance scale whose embedding is pinned at zero (`ConditionEmbedding`).
        guidance_adapter: give every residual block a modulation layer of its own for guidance (needs
            ``guidance_null``), fed silu(c) - silu(c at guidance_null): zero at the null scale, where the net then
            computes exactly what it computes without the adapters. Its weights start at zero. For a guidance-
            conditioned student that learns guidance in these layers while its other weights stay the teacher's.
        guidance_rank: with ``guidance_adapter``, also a convolutional branch of this many channels per residual block
            (gated by the same zero-at-null input; 0: modulation only).
        extra_channels: channels of the optional ``extra`` input concatenated to x.
        num_heads: attention heads (must divide the channel count at attention levels).
        resolutions: None (default) accepts only ``img_resolution`` and adds no parameters. A list,
            e.g. ``(8, 16, 32)``, makes the net accept any listed size and adds a learned embedding of
            the size's index (in sorted order) to the conditioning vector, so the blocks know which scale
            they work at. The layout does not change with the size: attention sits at the levels where
            it sits at ``img_resolution`` (so at another size it runs on a proportionally smaller or
            larger map), and every listed size must still be at least 2x2 before the last downsampling.

    Forward keywords: ``class_labels`` [B] int64; ``s_labels`` [B] (second time, with
    ``second_time``); ``guidance`` [B] (guidance scale, with ``guidance_embed``); ``extra``
    [B, extra_channels, R, R] (e.g. an upsampled low-resolution image and/or a self-conditioning
    estimate, concatenated to x; None reads as zeros); ``resolution`` (optional cross-check: the
    input's size); ``return_features``. An input the net was not built for raises ValueError.

    ``feature_channels`` = ``model_channels * channel_mult[-1]``: the bottleneck after the middle block.
    """

    def __init__(
        self,
        img_resolution: int = 16,
        in_channels: int = 1,
        out_channels: Optional[int] = None,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (8,),
        dropout: float = 0.0,
        num_classes: int = 0,
        second_time: bool = False,
        guidance_embed: bool = False,
        extra_channels: int = 0,
        num_heads: int = 1,
        resolutions: Optional[Sequence[int]] = None,
        guidance_null: Optional[float] = None,
        guidance_adapter: bool = False,
        guidance_rank: int = 0,
    ):
        super().__init__()
        if guidance_adapter and guidance_null is None:
            raise ValueError("guidance_adapter: the adapters are fed the conditioning's change from the null guidance "
                             "scale; set guidance_null (1.0 for EDM2 scales) with guidance_embed=True")
        if len(channel_mult) == 0:
            raise ValueError("channel_mult must have at least one level")
        self.resolutions = check_resolutions(resolutions, img_resolution)
        if self.resolutions is not None and len(channel_mult) > 1:
            # Each downsampling halves (rounding up): a 1x1 map before the last level cannot shrink further.
            smallest = 2 ** (len(channel_mult) - 2) + 1
            if self.resolutions[0] < smallest:
                raise ValueError(
                    f"resolutions: {self.resolutions[0]} is too small for {len(channel_mult)} levels of channel_mult "
                    f"(it reaches 1x1 before the last level); list sizes >= {smallest} or use fewer levels"
                )
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.second_time = second_time
        self.guidance_embed = guidance_embed
        self.extra_channels = extra_channels
        self.guidance_adapter = guidance_adapter
        if guidance_rank < 0 or (guidance_rank and not guidance_adapter):
            raise ValueError(f"guidance_rank: channels of the guidance adapters' convolutional branch, >= 0, with "
                             f"guidance_adapter=True; got {guidance_rank}")

        cond_dim = 4 * model_channels
        num_resolutions = 0 if self.resolutions is None else len(self.resolutions)
        self.cond = ConditionEmbedding(model_channels, cond_dim, num_classes, second_time, guidance_embed, num_resolutions,
                                       guidance_null)
        self.conv_in = nn.Conv2d(in_channels + extra_channels, model_channels, 3, padding=1)

        # Encoder: every module's output is kept as a skip for the decoder.
        self.enc = nn.ModuleList()
        skip_channels = [model_channels]
        ch, res = model_channels, img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(_Level(ch, model_channels * mult, cond_dim, dropout, res in attn_resolutions, num_heads,
                                       guidance_adapter, guidance_rank))
                ch = model_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.enc.append(Downsample(ch))
                skip_channels.append(ch)
                res = (res + 1) // 2
        self.bottom_resolution = res  # == self._level_resolution(len(channel_mult) - 1)

        self.mid = nn.ModuleList([
            _Level(ch, ch, cond_dim, dropout, True, num_heads, guidance_adapter, guidance_rank),
            _Level(ch, ch, cond_dim, dropout, False, num_heads, guidance_adapter, guidance_rank),
        ])
        self.feature_channels = ch

        # Decoder: num_blocks + 1 blocks per level, each eating one skip.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self._level_resolution(level)
            for _ in range(num_blocks + 1):
                cin = ch + skip_channels.pop()
                ch = model_channels * mult
                self.dec.append(_Level(cin, ch, cond_dim, dropout, res in attn_resolutions, num_heads, guidance_adapter,
                                        guidance_rank))
            if level != 0:
                self.dec.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _level_resolution(self, level: int) -> int:
        res = self.img_resolution
        for _ in range(level):
            res = (res + 1) // 2
        return res

    @property
    def feature_shape(self) -> tuple:
        return (self.feature_channels, self.bottom_resolution, self.bottom_resolution)

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
        (and the bottleneck [B, feature_channels, r, r] if ``return_features``)."""
        _, res_index = image_resolution(x, self.in_channels, self.img_resolution, self.resolutions, resolution)
        e = F.silu(self.cond(noise_labels, x.shape[0], class_labels, s_labels, guidance, res_index))
        e_guided = None
        if self.guidance_adapter:
            null = torch.full_like(self.cond.checked_guidance(guidance, x.shape[0]), self.cond.guidance_null)
            e_guided = e - F.silu(self.cond(noise_labels, x.shape[0], class_labels, s_labels, null, res_index))

        h = self.conv_in(concat_extra(x, extra, self.extra_channels))
        skips = [h]
        for m in self.enc:
            h = m(h) if isinstance(m, Downsample) else m(h, e, e_guided)
            skips.append(h)
        for m in self.mid:
            h = m(h, e, e_guided)
        features = h
        for m in self.dec:
            if isinstance(m, Upsample):
                h = m(h, skips[-1].shape[-2:])
            else:
                h = m(torch.cat([h, skips.pop()], dim=1), e, e_guided)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, features) if return_features else out
