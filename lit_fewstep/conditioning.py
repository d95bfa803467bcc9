"""Conditioning: everything besides the noisy state and its time that a network, a loss or a sampler may take,
carried as one structure from the data module through training, `sample()`, the command line and the callbacks.

============== ================ ==========================================================================
field          shape            meaning
============== ================ ==========================================================================
class_labels   [B] int64        class label; ``num_classes`` is the null label of classifier-free guidance
guidance_scale [B] float        per-sample guidance scale, EDM2 convention (1 = none; Meng et al.'s w is 1 + w)
s              [B] float        second time of a two-time map (CTM's G(x_t, t, s), a flow map f(x_t, t, s))
low_res        [B, C, h, w]     the upsampled lower-resolution image of a cascade (LowDiff)
self_cond      like x           the previous estimate of x0 (Analog Bits' self-conditioning; zeros at first)
============== ================ ==========================================================================

A batch from a data module is ``(x,)``, ``(x, class_labels)`` or ``(x, {field: tensor, ...})``;
`split_batch` turns any of them into ``(x, Conditioning)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning", "split_batch", "FIELDS"]

FIELDS = ("class_labels", "guidance_scale", "s", "low_res", "self_cond")


@dataclass
class Conditioning:
    class_labels: Tensor | None = None
    guidance_scale: Tensor | None = None
    s: Tensor | None = None
    low_res: Tensor | None = None
    self_cond: Tensor | None = None

    def __post_init__(self):
        sizes = {name: int(value.shape[0]) for name, value in self.items() if value.ndim > 0}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning: every field needs one entry per sample, got batch sizes {sizes}.")
        if self.class_labels is not None and self.class_labels.is_floating_point():
            raise ValueError("conditioning: class_labels must be integers (int64), got floating point values.")
        if self.guidance_scale is not None and not torch.isfinite(self.guidance_scale).all():
            raise ValueError("guidance_scale: every per-sample scale must be a finite number.")

    def items(self) -> list[tuple[str, Tensor]]:
        """The fields that are set, in `FIELDS` order."""
        return [(name, getattr(self, name)) for name in FIELDS if getattr(self, name) is not None]

    @property
    def batch_size(self) -> int | None:
        return next((int(v.shape[0]) for _, v in self.items() if v.ndim > 0), None)

    def replace(self, **fields: Any) -> "Conditioning":
        return dataclasses.replace(self, **fields)

    def to(self, device: torch.device | str) -> "Conditioning":
        return Conditioning(**{name: value.to(device) for name, value in self.items()})

    def select(self, index: Tensor | slice) -> "Conditioning":
        """The conditioning of the samples `index` (rows of every field)."""
        return Conditioning(**{name: value[index] for name, value in self.items()})

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Batch two conditionings (e.g. the conditional and the null-label halves of a CFG pass)."""
        if [n for n, _ in self.items()] != [n for n, _ in other.items()]:
            raise ValueError("conditioning: cannot concatenate conditionings with different fields.")
        return Conditioning(**{name: torch.cat([value, getattr(other, name)]) for name, value in self.items()})

    def network_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for a `PreconditionedNet` over a `lit_fewstep.nets` network: ``class_labels``,
        ``guidance`` (the per-sample scale, embedded as given: the net built with ``guidance_embed``), ``s`` (turned
        into the net's second noise label by the preconditioning) and ``extra`` (``low_res`` then ``self_cond``
        concatenated on the channel axis: the net built with ``extra_channels`` equal to their channels)."""
        inputs: dict[str, Tensor] = {}
        if self.class_labels is not None:
            inputs["class_labels"] = self.class_labels
        if self.guidance_scale is not None:
            inputs["guidance"] = self.guidance_scale
        if self.s is not None:
            inputs["s"] = self.s
        extra = [t for t in (self.low_res, self.self_cond) if t is not None]
        if extra:
            inputs["extra"] = torch.cat(extra, dim=1)
        return inputs


def split_batch(batch: Any) -> tuple[Tensor, Conditioning]:
    """A data module's batch as ``(x, Conditioning)``."""
    if isinstance(batch, Tensor):
        return batch, Conditioning()
    if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], Tensor):
        raise ValueError("batch: expected a tensor, (x,), (x, class_labels) or (x, {field: tensor}) from the data "
                         f"module, got {type(batch).__name__}.")
    if len(batch) == 1:
        return batch[0], Conditioning()
    if len(batch) != 2:
        raise ValueError(f"batch: expected (x, conditioning), got a sequence of {len(batch)} items.")
    x, cond = batch
    if cond is None:
        return x, Conditioning()
    if isinstance(cond, Conditioning):
        return x, cond
    if isinstance(cond, Tensor):
        return x, Conditioning(class_labels=cond)
    if isinstance(cond, dict):
        unknown = sorted(set(cond) - set(FIELDS))
        if unknown:
            raise ValueError(f"batch: unknown conditioning field(s) {unknown}; the fields are {list(FIELDS)}.")
        return x, Conditioning(**cond)
    raise ValueError(f"batch: the second item must be class labels or a dict of conditioning, got {type(cond).__name__}.")
