"""Pieces shared by every network in ``lit_fewstep.nets``.

- :func:`positional_embedding` / :class:`TimeEmbedding`: sinusoidal embedding of a scalar per sample
  (noise level, second time, guidance scale) followed by a 2-layer MLP.
- :class:`ConditionEmbedding`: builds the single conditioning vector ``c`` [B, cond_dim] that all nets
  feed to their blocks, as the sum of noise / second-time / guidance / class embeddings. It also
  validates those inputs, so every net raises the same errors.
- :func:`concat_extra`: the ``extra`` input channels (self-conditioning, low-res condition).
- :func:`attention`: plain ``softmax(q k^T / sqrt(d)) v``, shared by the UNet and the DiT.

Everything here is safe under ``torch.func.jvp`` (no in-place ops on traced tensors, no fused
attention kernels), because continuous-time consistency models differentiate through the nets in
forward mode.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "positional_embedding",
    "TimeEmbedding",
    "ConditionEmbedding",
    "check_class_labels",
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
    """Conditioning vector ``c = E_t(noise) [+ E_s(s)] [+ E_w(guidance)] [+ E_y(class)]``, [B, cond_dim].

    Each scalar input gets its own :class:`TimeEmbedding`; the class table has ``num_classes + 1``
    rows, the last one being the null label used for classifier-free guidance. The caller applies
    its own non-linearity (nets feed ``silu(c)`` to their modulation layers).
    """

    def __init__(
        self,
        freq_dim: int,
        cond_dim: int,
        num_classes: int = 0,
        second_time: bool = False,
        guidance_embed: bool = False,
    ):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.second_time = second_time
        self.guidance_embed = guidance_embed
        self.noise = TimeEmbedding(freq_dim, cond_dim)
        self.s = TimeEmbedding(freq_dim, cond_dim) if second_time else None
        self.guidance = TimeEmbedding(freq_dim, cond_dim) if guidance_embed else None
        self.label = nn.Embedding(num_classes + 1, cond_dim) if num_classes > 0 else None

    def forward(
        self,
        noise_labels: torch.Tensor,
        batch_size: int,
        class_labels: Optional[torch.Tensor] = None,
        s_labels: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Returns c [B, cond_dim]; raises ValueError naming the offending argument."""
        noise_labels = _check_scalar_per_sample("noise_labels", noise_labels, batch_size)
        c = self.noise(noise_labels)
        if self.second_time:
            if s_labels is None:
                raise ValueError("s_labels is required: the network was built with second_time=True")
            c = c + self.s(_check_scalar_per_sample("s_labels", s_labels, batch_size).to(noise_labels.device))
        elif s_labels is not None:
            raise ValueError("s_labels was given but the network was built with second_time=False")
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("guidance is required: the network was built with guidance_embed=True")
            c = c + self.guidance(_check_scalar_per_sample("guidance", guidance, batch_size).to(noise_labels.device))
        elif guidance is not None:
            raise ValueError("guidance was given but the network was built with guidance_embed=False")
        labels = check_class_labels(class_labels, self.num_classes, batch_size, c.device)
        if labels is not None:
            c = c + self.label(labels)
        return c


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
