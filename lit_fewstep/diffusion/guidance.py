"""Guidance: one implementation of classifier-free guidance and autoguidance for every caller.

One convention inside the package: the extrapolation form of Karras et al. 2024 (EDM2),
    D_guided = D_weak + scale * (D_good - D_weak),          scale = 1: no guidance,
where for classifier-free guidance D_weak is the unconditional model (the null label) and for
autoguidance a worse version of the model itself. Other papers' weights convert at the edge:
Ho & Salimans / Meng et al. write (1 + w) D_cond - w D_uncond, i.e. scale = 1 + w (`scale_from_cfg_w`);
AYF writes lambda v_good + (1 - lambda) v_weak, i.e. scale = lambda.

`guided_x0` and `autoguided_x0` are the functions every sampler, distillation loss and pair maker calls.
A scale is a number or a per-sample tensor [B] (broadcast over the data dimensions), so one batch can mix
guidance strengths (a guidance-conditioned student's training batch, a sweep in one call). Evaluations
are counted per sample: 2 when guided (conditional + unconditional, or good + weak model), 1 when every
scale is 1, in which case only the conditional / good model runs and its output is returned unchanged.
`ClassifierFreeGuidance` and `Autoguidance` bind the arguments into an `x0_fn(x_t, t)` for the solvers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .paths import GaussianPath, _bcast
from .solvers import NFECounter

__all__ = ["scale_from_cfg_w", "guide", "guided_x0", "autoguided_x0", "ClassifierFreeGuidance", "Autoguidance"]


def scale_from_cfg_w(w: float | Tensor) -> float | Tensor:
    """Meng et al. / Ho & Salimans guidance weight w (w = 0: none) -> extrapolation scale 1 + w."""
    return 1.0 + w


def guide(d_good: Tensor, d_weak: Tensor, scale: float | Tensor) -> Tensor:
    """Eq. 2 of Karras et al. 2024 (autoguidance): D_weak + scale (D_good - D_weak); `scale` a number or a
    tensor that broadcasts against the predictions."""
    return d_weak + scale * (d_good - d_weak)


def _guide_per_sample(d_good: Tensor, d_weak: Tensor, scale: float | Tensor) -> Tensor:
    """`guide`, where a per-sample scale of exactly 1 returns D_good itself (as an unguided call would)."""
    guided = guide(d_good, d_weak, scale)
    return torch.where(scale == 1.0, d_good, guided) if isinstance(scale, Tensor) else guided


def _is_unguided(scale: float | Tensor) -> bool:
    if isinstance(scale, Tensor):
        return bool((scale == 1.0).all())
    return float(scale) == 1.0


def _scale_like(scale: float | Tensor, like: Tensor) -> float | Tensor:
    """A number stays a number (the exact arithmetic of a scalar scale); a per-sample [B] tensor broadcasts
    over like's data dimensions in like's dtype."""
    if not isinstance(scale, Tensor):
        return float(scale)
    if scale.ndim == 0:
        return float(scale)
    if scale.ndim != 1 or scale.shape[0] != like.shape[0]:
        raise ValueError(f"guidance_scale: a per-sample scale must have shape [{like.shape[0]}] (one per sample), "
                         f"got {tuple(scale.shape)}.")
    return _bcast(scale.to(device=like.device, dtype=like.dtype), like)


def _x0(model: nn.Module, x_t: Tensor, t, class_labels, path: GaussianPath | None, **cond) -> Tensor:
    if path is None:
        return model.x0(x_t, t, class_labels=class_labels, **cond)
    return model.x0_from(x_t, t, path, class_labels=class_labels, **cond)


def guided_x0(model: nn.Module, x_t: Tensor, t: Tensor | float, class_labels: Tensor | None,
              scale: float | Tensor = 1.0, path: GaussianPath | None = None, counter: NFECounter | None = None,
              batched: bool = True, **cond) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) of a class-conditional model trained with label dropout:
    D = D(x | null) + scale (D(x | c) - D(x | null)), the null label being ``model.num_classes``.

    model: a `PreconditionedNet` (anything with ``x0(x, t, class_labels=...)`` and, when `path` is given,
        ``x0_from(x, t, path, class_labels=...)``) and ``num_classes``.
    t: per-sample times [B] or a scalar, in the coordinates of `path` (None: the model's own path).
    scale: a number or a per-sample tensor [B]; 1 everywhere: no guidance, one conditional pass, returned as is.
        In a mixed batch the samples with scale 1 get the conditional prediction exactly, the others the guided
        one, so every sample equals what it would get alone with its own scale.
    counter: gets 2 evaluations per sample when guided, 1 otherwise.
    batched: True runs the conditional and null-label passes as one forward of 2B samples (fast); False as two
        forwards of B, conditional first (half the peak memory). Mathematically equal; the last bits may differ.
    cond: further conditioning passed to both passes (tensors batch-first: repeated for the batched pass).
    """
    if _is_unguided(scale):
        if counter is not None:
            counter.add(1)
        return _x0(model, x_t, t, class_labels, path, **cond)
    num_classes = int(getattr(model, "num_classes", 0))
    if class_labels is None or num_classes <= 0:
        raise ValueError("guidance_scale: classifier-free guidance needs a class-conditional model trained with "
                         "label dropout and class labels; use a scale of 1.")
    if counter is not None:
        counter.add(2)
    s = _scale_like(scale, x_t)
    null = torch.full_like(class_labels, num_classes)
    if batched:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        both = _x0(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([class_labels, null]), path,
                   **{k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in cond.items()})
        d_cond, d_uncond = both.chunk(2)
    else:
        d_cond = _x0(model, x_t, t, class_labels, path, **cond)
        d_uncond = _x0(model, x_t, t, null, path, **cond)
    return _guide_per_sample(d_cond, d_uncond, s)


def autoguided_x0(good: nn.Module, weak: nn.Module, x_t: Tensor, t: Tensor | float, scale: float | Tensor = 1.0,
                  class_labels: Tensor | None = None, path: GaussianPath | None = None,
                  counter: NFECounter | None = None, **cond) -> Tensor:
    """Autoguidance (Karras et al. 2024): D = D_weak + scale (D_good - D_weak), the guide D_weak being a smaller
    and/or shorter-trained model of the same task and conditioning (works for unconditional models too).

    Both models see the same (x_t, t, class_labels); `scale`, `path`, `counter` as in `guided_x0` (2 evaluations
    per sample when guided; at scale 1 only `good` runs).
    """
    if _is_unguided(scale):
        if counter is not None:
            counter.add(1)
        return _x0(good, x_t, t, class_labels, path, **cond)
    if counter is not None:
        counter.add(2)
    s = _scale_like(scale, x_t)
    d_good = _x0(good, x_t, t, class_labels, path, **cond)
    d_weak = _x0(weak, x_t, t, class_labels, path, **cond)
    return _guide_per_sample(d_good, d_weak, s)


class ClassifierFreeGuidance:
    """`guided_x0` bound into a data predictor x0_fn(x_t, t) for the solvers, with fixed labels and scale.

    scale: a number or per-sample [B]; path: coordinates of (x_t, t) (None: the model's own); counter: see
    `guided_x0` (a fresh one when None, read it as ``.counter.count``).
    """

    def __init__(self, model: nn.Module, class_labels: Tensor, scale: float | Tensor = 1.0,
                 counter: NFECounter | None = None, path: GaussianPath | None = None, batched: bool = True):
        if int(getattr(model, "num_classes", 0)) <= 0:
            raise ValueError("guidance: classifier-free guidance needs a class-conditional model (num_classes > 0).")
        self.model, self.class_labels, self.path, self.batched = model, class_labels, path, batched
        self.scale = scale if isinstance(scale, Tensor) else float(scale)
        self.counter = counter or NFECounter()

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return guided_x0(self.model, x_t, t, self.class_labels, self.scale, path=self.path, counter=self.counter,
                         batched=self.batched)


class Autoguidance:
    """`autoguided_x0` bound into a data predictor x0_fn(x_t, t): guide `good` with `weak` (2 evaluations)."""

    def __init__(self, good: nn.Module, weak: nn.Module, scale: float | Tensor, class_labels: Tensor | None = None,
                 counter: NFECounter | None = None, path: GaussianPath | None = None):
        self.good, self.weak, self.class_labels, self.path = good, weak, class_labels, path
        self.scale = scale if isinstance(scale, Tensor) else float(scale)
        self.counter = counter or NFECounter()

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return autoguided_x0(self.good, self.weak, x_t, t, self.scale, class_labels=self.class_labels,
                             path=self.path, counter=self.counter)
