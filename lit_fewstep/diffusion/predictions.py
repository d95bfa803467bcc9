"""Conversion between what a network predicts on a Gaussian path x_t = a x + b z.

Every parameterization is a linear function of the pair (x0, eps) given (x_t, t), so each converts
to (x0, eps) and back:

=============  ==================================  ==========================================
kind           definition                          used by
=============  ==================================  ==========================================
``x0``         E[x | x_t] (``denoiser`` alias)     EDM, consistency models, DMD
``eps``        E[z | x_t]                          DDPM, guided distillation
``v``          a eps - b x0                        progressive distillation (Salimans & Ho)
``velocity``   a' x0 + b' eps = E[dx_t/dt | x_t]   flow matching, TrigFlow (sCM), CAF, flow maps
``score``      grad log p_t(x_t) = -eps / b        score SDEs, DMD's real/fake scores
=============  ==================================  ==========================================
"""

from __future__ import annotations

from torch import Tensor

from .paths import GaussianPath, _bcast

__all__ = ["PREDICTION_KINDS", "to_x0_eps", "from_x0_eps", "convert_prediction"]

PREDICTION_KINDS = ("x0", "denoiser", "eps", "v", "velocity", "score")


def _check(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"prediction: unknown kind {kind!r}; choose one of {PREDICTION_KINDS}.")


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, t: Tensor, path: GaussianPath) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a prediction of `kind` at the state x_t [B, ...], time t [B]."""
    _check(kind)
    a, b = _bcast(path.a(t), x_t), _bcast(path.b(t), x_t)
    if kind in ("x0", "denoiser"):
        return pred, (x_t - a * pred) / b
    if kind == "eps":
        return (x_t - b * pred) / a, pred
    if kind == "score":
        eps = -b * pred
        return (x_t - b * eps) / a, eps
    if kind == "v":
        norm = a * a + b * b
        return (a * x_t - b * pred) / norm, (b * x_t + a * pred) / norm
    # velocity u = a' x0 + b' eps together with x_t = a x0 + b eps: a 2x2 linear system.
    da, db = _bcast(path.da(t), x_t), _bcast(path.db(t), x_t)
    det = a * db - b * da
    return (db * x_t - b * pred) / det, (a * pred - da * x_t) / det


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, t: Tensor, path: GaussianPath) -> Tensor:
    """The prediction of `kind` equal to the pair (x0, eps) at time t."""
    _check(kind)
    a, b = _bcast(path.a(t), x0), _bcast(path.b(t), x0)
    if kind in ("x0", "denoiser"):
        return x0
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / b
    if kind == "v":
        return a * eps - b * x0
    return _bcast(path.da(t), x0) * x0 + _bcast(path.db(t), x0) * eps


def convert_prediction(pred: Tensor, src_kind: str, dst_kind: str, x_t: Tensor, t: Tensor, path: GaussianPath) -> Tensor:
    """Re-express a prediction of `src_kind` as `dst_kind` on the same path and state."""
    if src_kind == dst_kind:
        return pred
    x0, eps = to_x0_eps(pred, src_kind, x_t, t, path)
    return from_x0_eps(x0, eps, dst_kind, t, path)
