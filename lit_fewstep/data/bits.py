"""Analog bits (Chen, Zhang & Hinton 2022): discrete values as {-b, +b} vectors a continuous diffusion can model.

`BitCodec` maps data units to integer tokens and back (uniform levels), tokens to bits (plain binary or Gray code,
most significant bit first) and bits to analog values ``b (2 bit - 1)``; decoding thresholds at 0. A value with K
levels takes ``ceil(log2 K)`` bits, so 17 grey levels (scikit-learn's digits, pixel values 0..16) take 5 bits and
a 16-level quantization 4. Codes beyond the last level (17..31 in 5 bits) decode to the last level.

Shapes: tokens ``[B, C, *rest]`` (images: C channels) or ``[B, D]`` (vectors) become bits ``[B, C n, *rest]``:
channel c owns the n consecutive bit channels ``c n .. c n + n - 1``, so a network sees the bits of one pixel at
the same spatial position.

`categorical_bits_x0` is the exact data predictor E[x_bits | x_t] when the bits follow a known categorical
distribution over codewords (a test oracle: a sampler fed with it draws exactly from that distribution).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BitCodec", "CODES", "gray_encode", "gray_decode", "categorical_bits_x0"]

CODES = ("binary", "gray")


def gray_encode(v: Tensor) -> Tensor:
    """Reflected binary (Gray) code of non-negative integers: g = v xor (v >> 1)."""
    return v ^ (v >> 1)


def gray_decode(g: Tensor, num_bits: int) -> Tensor:
    """Inverse of `gray_encode` for codes of `num_bits` bits: v = g xor (g >> 1) xor (g >> 2) xor ..."""
    v = g.clone()
    shift = 1
    while shift < num_bits:
        v = v ^ (v >> shift)
        shift *= 2
    return v


class BitCodec:
    """Data units <-> tokens <-> analog bits.

    Args:
        num_levels: K, the number of discrete values per channel (>= 2).
        low, high: the data values of token 0 and token K - 1 (levels evenly spaced in between).
        code: "binary" (token written in base 2) or "gray" (its Gray code: neighbouring levels differ in one bit).
        scale: b, the analog value of a 1 bit (a 0 bit is -b).
    """

    def __init__(self, num_levels: int = 17, low: float = -1.0, high: float = 1.0, code: str = "binary",
                 scale: float = 1.0):
        if not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels: need an integer >= 2 (values per channel), got {num_levels!r}.")
        if code not in CODES:
            raise ValueError(f"code: unknown bit code {code!r}; choose one of {CODES}.")
        if not high > low:
            raise ValueError(f"high: must be larger than low, got low={low}, high={high}.")
        if not scale > 0:
            raise ValueError(f"scale: the analog bit scale b must be > 0, got {scale}.")
        self.num_levels, self.low, self.high, self.code, self.scale = num_levels, float(low), float(high), code, float(scale)
        self.num_bits = max(1, math.ceil(math.log2(num_levels)))

    # ----------------------------------------------------------------------------- data units <-> tokens
    @property
    def step(self) -> float:
        return (self.high - self.low) / (self.num_levels - 1)

    def quantize(self, x: Tensor) -> Tensor:
        """Nearest level of each value (clamped to [low, high]) as int64 tokens 0..K-1."""
        return ((x.double() - self.low) / self.step).round().clamp(0, self.num_levels - 1).long()

    def dequantize(self, tokens: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The data value of each token: low + token (high - low) / (K - 1)."""
        return (self.low + tokens.double() * self.step).to(dtype)

    # ----------------------------------------------------------------------------- tokens <-> bits
    def _weights(self, like: Tensor) -> Tensor:
        return 2 ** torch.arange(self.num_bits - 1, -1, -1, device=like.device, dtype=torch.long)

    def to_bits(self, tokens: Tensor) -> Tensor:
        """{0, 1} int64 bits ``[B, C n, *rest]`` of tokens ``[B, C, *rest]``, most significant bit first."""
        if tokens.ndim < 2:
            raise ValueError(f"tokens: need shape [B, C, ...], got {tuple(tokens.shape)}.")
        if tokens.is_floating_point() or bool((tokens < 0).any()) or bool((tokens >= self.num_levels).any()):
            raise ValueError(f"tokens: need integers in [0, {self.num_levels - 1}].")
        v = gray_encode(tokens) if self.code == "gray" else tokens
        w = self._weights(v).view(1, 1, -1, *([1] * (v.ndim - 2)))
        bits = (v.unsqueeze(2) // w) % 2  # [B, C, n, *rest]
        return bits.flatten(1, 2)

    def from_bits(self, bits: Tensor) -> Tensor:
        """Tokens ``[B, C, *rest]`` from {0, 1} bits ``[B, C n, *rest]`` (codes past the last level clamp to it)."""
        if bits.ndim < 2 or bits.shape[1] % self.num_bits:
            raise ValueError(f"bits: need shape [B, C * {self.num_bits}, ...], got {tuple(bits.shape)}.")
        b = bits.long().unflatten(1, (bits.shape[1] // self.num_bits, self.num_bits))
        v = (b * self._weights(b).view(1, 1, -1, *([1] * (b.ndim - 3)))).sum(2)
        if self.code == "gray":
            v = gray_decode(v, self.num_bits)
        return v.clamp(max=self.num_levels - 1)

    # ----------------------------------------------------------------------------- tokens <-> analog bits
    def encode(self, tokens: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Analog bits b (2 bit - 1) in {-b, +b}."""
        return (self.to_bits(tokens).to(dtype) * 2.0 - 1.0) * self.scale

    def decode(self, analog: Tensor) -> Tensor:
        """Tokens from analog bits, thresholded at 0 (Analog Bits: bit = 1 where the value is > 0)."""
        return self.from_bits((analog > 0).long())

    def channels(self, data_channels: int) -> int:
        """Bit channels of `data_channels` data channels."""
        return data_channels * self.num_bits

    def codewords(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Analog codeword ``[K, n]`` of every token of one channel."""
        return self.encode(torch.arange(self.num_levels)[:, None], dtype)

    def __repr__(self) -> str:
        return (f"BitCodec(num_levels={self.num_levels}, bits={self.num_bits}, code={self.code!r}, "
                f"range=[{self.low}, {self.high}], scale={self.scale})")


def categorical_bits_x0(x_t: Tensor, a: Tensor, b: Tensor, codewords: Tensor, probs: Tensor) -> Tensor:
    """E[x | x_t] for x_t = a x + b z, x one of the analog `codewords` [M, D] with probabilities `probs` [M].

    The posterior over codewords is softmax_k(log p_k - |x_t - a c_k|^2 / (2 b^2)); x_t [B, D]; a, b [B] or
    scalars (b > 0). Computed in float64.
    """
    x = x_t.double()
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1, 1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 1, 1)
    c = codewords.double().to(x.device)
    logp = torch.log(probs.double().to(x.device))
    a, b = a[:, :, 0], b[:, :, 0]  # [B, 1]
    # -|x_t - a c|^2 / (2 b^2) up to the per-sample constant -|x_t|^2 / (2 b^2), which the softmax drops
    logits = logp[None] + (a * (x @ c.T) - 0.5 * a**2 * (c**2).sum(1)[None]) / b**2
    w = torch.softmax(logits, dim=1)
    return (w @ c).to(x_t.dtype)
