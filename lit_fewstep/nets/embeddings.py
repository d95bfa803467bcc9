"""Pieces shared by every network in ``lit_fewstep.nets``.

- :func:`positional_embedding` / :class:`TimeEmbedding`: sinusoidal embedding of a scalar per sample
  (noise level, second time, guidance scale) followed by a 2-layer MLP.
- :class:`ConditionEmbedding`: builds the single conditioning vector ``c`` [B, cond_dim] that all nets
  feed to their blocks, as the sum of noise / second-time / guidance / class / resolution embeddings.
  It also validates those inputs, so every net raises the same errors.
- :func:`concat_extra`: the ``extra`` input channels (self-conditioning, low-res condition).
- :func:`check_resolutions` / :func:`image_resolution`: the set of input sizes an image net accepts,
  and the validation of an input against it (shared by the UNet and the DiT).
- :func:`attention`: plain ``softmax(q k^T / sqrt(d)) v``, shared by the UNet and the DiT.

Everything here is safe under ``torch.func.jvp`` (no in-place ops on traced tensors, no fused
attention kernels), because continuous-time consistency models differentiate through the nets in
forward mode.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "positional_embedding",
    "TimeEmbedding",
    "ConditionEmbedding",
    "check_class_labels",
    "check_resolutions",
    "image_resolution",
    "concat_extra",
    "attention",
]


def positional_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(f_k t), sin(f_k t)]`` with ``f_k = max_period^(-k / (dim/2))``.

    Frequencies span ``[1/max_period, 1]`` (ADM/EDM convention), so labels of order 1 (``ln(sigma)/4``,
    TrigFlow ``t``) up to order 1000 (``1000 t``) are resolved; the MLP that follows does the rest.

    Args:
        t: [B] labels (any real dtype).
        dim: even embedding size.
    Returns:
        [B, dim], float32, or float64 when ``t`` is float64 (so float64 JVP checks stay exact);
        half-precision labels are lifted to float32 because ``f_k t`` loses all digits in fp16/bf16.
    """
    if dim % 2 != 0:
        raise ValueError(f"positional embedding dim must be even, got {dim}")
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    t = t.to(dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """Scalar label [B] -> positional embedding [B, freq_dim] -> Linear -> SiLU -> Linear -> [B, out_dim]."""

    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = positional_embedding(t, self.freq_dim)
        # The sinusoid is computed in (at least) float32; the MLP runs in the weights' dtype
        # (autocast, if active, still applies to the Linear layers).
        emb = emb.to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


def _check_scalar_per_sample(name: str, value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Accept a [B] tensor, or a 0-d tensor / Python number that is explicitly broadcast to [B]."""
    if not torch.is_tensor(value):
        value = torch.tensor(float(value))
    if value.dim() == 0:
        return value.expand(batch_size)
    if value.shape != (batch_size,):
        raise ValueError(f"{name} must have shape [B]=[{batch_size}] (or be a scalar), got {tuple(value.shape)}")
    return value


def check_class_labels(
    class_labels: Optional[torch.Tensor], num_classes: int, batch_size: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Validate class labels and replace ``None`` by the null label.

    Args:
        class_labels: int64 [B] in ``[0, num_classes]`` (``num_classes`` = null label) or None.
        num_classes: number of real classes; 0 means the module is unconditional.
    Returns:
        [B] int64 labels (``None`` -> all null), or None when ``num_classes == 0``.
    """
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("class_labels was given but the network was built with num_classes=0 (unconditional)")
        return None
    if class_labels is None:
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    if not torch.is_tensor(class_labels) or class_labels.is_floating_point() or class_labels.is_complex():
        raise ValueError("class_labels must be an integer tensor of shape [B] (int64), not one-hot or float")
    if class_labels.shape != (batch_size,):
        raise ValueError(f"class_labels must have shape [B]=[{batch_size}], got {tuple(class_labels.shape)}")
    lo, hi = int(class_labels.min()), int(class_labels.max())
    if lo < 0 or hi > num_classes:
        raise ValueError(
            f"class_labels must be in [0, {num_classes}] ({num_classes} is the null label for "
            f"classifier-free guidance); got values in [{lo}, {hi}]"
        )
    return class_labels.long()


class ConditionEmbedding(nn.Module):
    """Conditioning vector ``c = E_t(noise) [+ E_s(s)] [+ E_w(guidance)] [+ E_y(class)] [+ E_r(res)]``, [B, cond_dim].

    Each scalar input gets its own :class:`TimeEmbedding`: the noise label, the second time ``s`` of
    two-time maps (a consistency trajectory model's g(x_t, t, s), a flow map's f(x_t, t, s)), and the
    guidance scale ``w`` of a guidance-conditioned student (a Fourier-feature embedding of w followed
    by an MLP, as in guided distillation). The class table has ``num_classes + 1`` rows, the last one
    being the null label used for classifier-free guidance. With ``num_resolutions > 0`` a learned
    table of that many rows embeds the index of the input's resolution (a multi-resolution net tells
    the blocks which scale it is working at; at the lowest one of a cascade it also marks that the
    low-resolution condition is absent). The caller applies its own non-linearity (nets feed
    ``silu(c)`` to their modulation layers).

    With ``guidance_null`` set (the scale that means "no guidance", 1.0 for EDM2 scales) the guidance term is
    ``E_w(w) - E_w(guidance_null)``: exactly zero there whatever the weights, so learning other scales cannot
    move the net's unguided prediction through the guidance embedding. It adds no parameters (the same
    functions are reachable: the constant is absorbed by the other embeddings' biases); it changes only how
    training moves the unguided prediction.

    Optional embeddings exist only when switched on, so a net built without them has exactly the
    parameters (and state-dict keys) it had before they were added.
    """

    def __init__(
        self,
        freq_dim: int,
        cond_dim: int,
        num_classes: int = 0,
        second_time: bool = False,
        guidance_embed: bool = False,
        num_resolutions: int = 0,
        guidance_null: Optional[float] = None,
    ):
        super().__init__()
        if guidance_null is not None and not guidance_embed:
            raise ValueError("guidance_null: the scale pinned at a zero guidance embedding needs guidance_embed=True "
                             "(or leave guidance_null at None)")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if num_resolutions < 0:
            raise ValueError(f"num_resolutions must be >= 0, got {num_resolutions}")
        self.num_classes = num_classes
        self.second_time = second_time
        self.guidance_embed = guidance_embed
        self.noise = TimeEmbedding(freq_dim, cond_dim)
        self.s = TimeEmbedding(freq_dim, cond_dim) if second_time else None
        self.guidance = TimeEmbedding(freq_dim, cond_dim) if guidance_embed else None
        self.guidance_null = None if guidance_null is None else float(guidance_null)
        self.label = nn.Embedding(num_classes + 1, cond_dim) if num_classes > 0 else None
        # Built last, and only when asked: nets without it keep their parameters and random init.
        self.num_resolutions = num_resolutions
        self.resolution = nn.Embedding(num_resolutions, cond_dim) if num_resolutions > 0 else None

    def checked_guidance(self, guidance: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        """The guidance scales as a [batch_size] tensor; ValueError when missing or misshapen."""
        if guidance is None:
            raise ValueError("guidance is required: the network was built with guidance_embed=True")
        return _check_scalar_per_sample("guidance", guidance, batch_size)

    def forward(
        self,
        noise_labels: torch.Tensor,
        batch_size: int,
        class_labels: Optional[torch.Tensor] = None,
        s_labels: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
        resolution_index: Optional[int] = None,
    ) -> torch.Tensor:
        """Returns c [B, cond_dim]; raises ValueError naming the offending argument.

        ``resolution_index`` (a Python int, the same for the whole batch) selects a row of the
        resolution table; it is required exactly when the module was built with ``num_resolutions > 0``.
        """
        noise_labels = _check_scalar_per_sample("noise_labels", noise_labels, batch_size)
        c = self.noise(noise_labels)
        if self.second_time:
            if s_labels is None:
                raise ValueError("s_labels is required: the network was built with second_time=True")
            c = c + self.s(_check_scalar_per_sample("s_labels", s_labels, batch_size).to(noise_labels.device))
        elif s_labels is not None:
            raise ValueError("s_labels was given but the network was built with second_time=False")
        if self.guidance_embed:
            guidance = self.checked_guidance(guidance, batch_size).to(noise_labels.device)
            embedding = self.guidance(guidance)
            if self.guidance_null is not None:
                # the same batch shape as above, so a sample at the null scale subtracts bit-identical rows
                embedding = embedding - self.guidance(torch.full_like(guidance, self.guidance_null))
            c = c + embedding
        elif guidance is not None:
            raise ValueError("guidance was given but the network was built with guidance_embed=False")
        labels = check_class_labels(class_labels, self.num_classes, batch_size, c.device)
        if labels is not None:
            c = c + self.label(labels)
        if self.resolution is not None:
            if resolution_index is None:
                raise ValueError("resolution_index is required: the network was built with a list of resolutions")
            if not 0 <= resolution_index < self.num_resolutions:
                raise ValueError(f"resolution_index must be in [0, {self.num_resolutions}), got {resolution_index}")
            index = torch.full((batch_size,), int(resolution_index), dtype=torch.long, device=c.device)
            c = c + self.resolution(index)
        elif resolution_index is not None:
            raise ValueError("resolution_index was given but the network was built without resolutions")
        return c


def check_resolutions(
    resolutions: Optional[Sequence[int]], img_resolution: int, multiple_of: int = 1, what: str = ""
) -> Optional[tuple]:
    """Validate a net's ``resolutions`` option; returns the sorted tuple (or None for a fixed-size net).

    Every entry must be a positive int (a multiple of ``multiple_of``, e.g. the DiT's patch size),
    without repeats, and ``img_resolution`` (the reference size the net's layout is defined at) must
    be one of them. ``what`` explains ``multiple_of`` in the error message.
    """
    if resolutions is None:
        return None
    if isinstance(resolutions, (str, bytes)) or not isinstance(resolutions, Sequence) or len(resolutions) == 0:
        raise ValueError(f"resolutions must be a non-empty list of image sizes (or None), got {resolutions!r}")
    if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in resolutions):
        raise ValueError(f"resolutions must hold positive ints, got {list(resolutions)!r}")
    resolutions = [int(r) for r in resolutions]
    for r in resolutions:
        if r % multiple_of != 0:
            raise ValueError(f"resolutions: {r} is not divisible by {what or multiple_of} ({multiple_of})")
    if len(set(resolutions)) != len(resolutions):
        raise ValueError(f"resolutions must not repeat a size, got {list(resolutions)!r}")
    if img_resolution not in resolutions:
        raise ValueError(
            f"img_resolution={img_resolution} must be one of resolutions={list(resolutions)!r} "
            "(it is the reference size the network's layout is defined at)"
        )
    return tuple(sorted(resolutions))


def image_resolution(
    x: torch.Tensor,
    in_channels: int,
    img_resolution: int,
    resolutions: Optional[tuple],
    resolution: Optional[int] = None,
) -> tuple:
    """Check an image batch against what the net accepts; returns ``(r, index)``.

    ``x`` must be [B, in_channels, r, r] with ``r == img_resolution`` for a fixed-size net
    (``resolutions=None``; ``index`` is then None), or ``r`` one of ``resolutions`` (``index`` is its
    position in the sorted tuple). ``resolution``, when given, is a cross-check: it must equal ``r``.
    """
    if resolutions is None:
        expected = (in_channels, img_resolution, img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
    elif x.dim() != 4 or x.shape[1] != in_channels or x.shape[2] != x.shape[3]:
        raise ValueError(
            f"x must have shape [B, {in_channels}, r, r] with r one of resolutions={list(resolutions)}, got {list(x.shape)}"
        )
    r = int(x.shape[-1])
    if resolutions is not None and r not in resolutions:
        raise ValueError(
            f"x is {r}x{r}, which is not one of the network's resolutions={list(resolutions)}; "
            "resize the input or rebuild the network with that size listed"
        )
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution != r):
        raise ValueError(f"resolution={resolution!r} was given but x is {r}x{r}; pass the input's size or None")
    return r, (None if resolutions is None else resolutions.index(r))


def concat_extra(x: torch.Tensor, extra: Optional[torch.Tensor], extra_channels: int) -> torch.Tensor:
    """Concatenate ``extra`` [B, extra_channels, ...] to ``x`` [B, C, ...] along dim 1.

    ``extra=None`` with ``extra_channels > 0`` means "no condition" and is read as zeros (the usual
    convention for self-conditioning's first pass).
    """
    if extra_channels == 0:
        if extra is not None:
            raise ValueError("extra was given but the network was built with extra_channels=0")
        return x
    expected = (x.shape[0], extra_channels, *x.shape[2:])
    if extra is None:
        extra = x.new_zeros(expected)
    elif tuple(extra.shape) != expected:
        raise ValueError(f"extra must have shape {list(expected)} (extra_channels={extra_channels}), got {list(extra.shape)}")
    return torch.cat([x, extra.to(x.dtype)], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for q, k, v [B, heads, N, d] -> [B, heads, N, d].

    Written out instead of ``F.scaled_dot_product_attention`` because the default CPU SDPA kernel
    has no forward-mode AD (``torch.func.jvp`` fails). q is scaled before the product to keep fp16
    logits in range.
    """
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
    return weights @ v
