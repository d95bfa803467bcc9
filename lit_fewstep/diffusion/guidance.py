"""Guidance as wrappers around data predictors.

One convention inside the package: the extrapolation form of Karras et al. 2024 (EDM2),
    D_guided = D_weak + scale * (D_good - D_weak),          scale = 1: no guidance,
where for classifier-free guidance D_weak is the unconditional model and for autoguidance a worse
version of the model itself. Other papers' weights convert at the edge:
Ho & Salimans / Meng et al. write (1 + w) D_cond - w D_uncond, i.e. scale = 1 + w (`scale_from_cfg_w`);
AYF writes lambda v_good + (1 - lambda) v_weak, i.e. scale = lambda.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .solvers import NFECounter

__all__ = ["scale_from_cfg_w", "guide", "ClassifierFreeGuidance", "Autoguidance"]


def scale_from_cfg_w(w: float) -> float:
    """Meng et al. / Ho & Salimans guidance weight w (w = 0: none) -> extrapolation scale 1 + w."""
    return 1.0 + w


def guide(d_good: Tensor, d_weak: Tensor, scale: float | Tensor) -> Tensor:
    """Eq. 2 of Karras et al. 2024 (autoguidance): D_weak + scale (D_good - D_weak)."""
    return d_weak + scale * (d_good - d_weak)


class ClassifierFreeGuidance:
    """x0(x_t, t) of a class-conditional `PreconditionedNet` under CFG with a fixed class label.

    The conditional and null-label passes share one batched forward, counted as 2 NFE per sample.
    At scale == 1 the unconditional pass is skipped and the result is the conditional model exactly.
    """

    def __init__(self, model: nn.Module, class_labels: Tensor, scale: float = 1.0, counter: NFECounter | None = None):
        if model.num_classes <= 0:
            raise ValueError("guidance: classifier-free guidance needs a class-conditional model (num_classes > 0).")
        self.model, self.class_labels, self.scale = model, class_labels, float(scale)
        self.counter = counter or NFECounter()

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            self.counter.add(1)
            return self.model.x0(x_t, t, class_labels=self.class_labels)
        self.counter.add(2)
        null = torch.full_like(self.class_labels, self.model.num_classes)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        both = self.model.x0(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([self.class_labels, null]))
        d_cond, d_uncond = both.chunk(2)
        return guide(d_cond, d_uncond, self.scale)


class Autoguidance:
    """Karras et al. 2024: guide a model with a smaller / less trained version of itself (2 NFE)."""

    def __init__(self, good: nn.Module, weak: nn.Module, scale: float, class_labels: Tensor | None = None,
                 counter: NFECounter | None = None):
        self.good, self.weak, self.scale, self.class_labels = good, weak, float(scale), class_labels
        self.counter = counter or NFECounter()

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.counter.add(2)
        d_good = self.good.x0(x_t, t, class_labels=self.class_labels)
        d_weak = self.weak.x0(x_t, t, class_labels=self.class_labels)
        return guide(d_good, d_weak, self.scale)
