"""Preconditioning: how a raw network F becomes a prediction on a path.

`PreconditionedNet` is the one object every method holds for a diffusion-type network (teacher, fake
score, student initialised from a teacher). It knows its path and what it predicts, and always
answers `x0(x_t, t)` in its own path's coordinates, so samplers and distillation losses can use any
teacher the same way (converting other paths' states through `diffusion.paths.convert`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .paths import GaussianPath, _bcast, convert, make_path
from .predictions import to_x0_eps

__all__ = ["edm_coefficients", "consistency_coefficients", "trigflow_coefficients", "PreconditionedNet", "PRECONDITIONINGS"]


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Table 1 of Karras et al. 2022 (EDM): c_skip, c_out, c_in, c_noise."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1.0 / torch.sqrt(s2 + d2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def consistency_coefficients(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """Appendix C of Song et al. 2023 (CM): c_skip, c_out with f(x, sigma_min) = x exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / torch.sqrt(sigma_data**2 + sigma * sigma)
    return c_skip, c_out


def trigflow_coefficients(t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """sCM (Lu & Song 2024): f(x_t, t) = c_skip x_t + c_out F(x_t / sigma_d, t) with c_skip = cos t,
    c_out = -sigma_d sin t; exactly f(x, 0) = x (the velocity -> x0 conversion in closed form)."""
    return torch.cos(t), -sigma_data * torch.sin(t)


PRECONDITIONINGS = ("edm", "velocity", "trigflow", "consistency")


class PreconditionedNet(nn.Module):
    """A network with its path and parameterization.

    Args:
        net: a `lit_fewstep.nets` network, F(x, noise_labels, class_labels=..., ...).
        preconditioning:
            ``"edm"``: EDM path, D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4); predicts x0.
            ``"velocity"``: linear (flow-matching) path, F(x_t, t) is the velocity z - x.
            ``"trigflow"``: TrigFlow path, sigma_d F(x_t / sigma_d, t) is the velocity (sCM). Its x0 is
            the sCM consistency function cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), so x0(x, 0) = x.
            ``"consistency"``: EDM path, consistency function of Song et al. 2023 (Appendix C):
            f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4) with the boundary-shifted c_skip, c_out of
            `consistency_coefficients`, so x0(x, sigma_min) = x exactly; c_in and c_noise are EDM's, so a
            student can start from an EDM teacher's raw weights.
        sigma_data: data standard deviation sigma_d.
        sigma_min: the boundary time eps of ``"consistency"`` (ignored otherwise).
    """

    def __init__(self, net: nn.Module, preconditioning: str = "edm", sigma_data: float = 0.5, sigma_min: float = 0.002):
        if not isinstance(sigma_data, (int, float)) or not 0.0 < float(sigma_data) < math.inf:
            raise ValueError(f"sigma_data: the data's standard deviation must be a positive number, got {sigma_data!r}; "
                             "use the data module's sigma_data (e.g. 0.5 for images in [-1, 1]).")
        super().__init__()
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(
                f"preconditioning: unknown value {preconditioning!r}; choose one of {PRECONDITIONINGS}."
            )
        self.net = net
        self.preconditioning = preconditioning
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        if preconditioning == "edm":
            self.path: GaussianPath = make_path("edm")
            self.prediction = "x0"
        elif preconditioning == "consistency":
            self.path = make_path("edm", sigma_min=self.sigma_min)
            self.prediction = "x0"
        elif preconditioning == "velocity":
            self.path = make_path("linear")
            self.prediction = "velocity"
        else:
            self.path = make_path("trigflow", sigma_data=self.sigma_data)
            self.prediction = "velocity"

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, return_features: bool = False, **cond):
        """The prediction of kind `self.prediction` at (x_t, t); t of shape [B]."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        if self.preconditioning in ("edm", "consistency"):
            c_skip, c_out, c_in, c_noise = edm_coefficients(t, self.sigma_data)
            if self.preconditioning == "consistency":
                c_skip, c_out = consistency_coefficients(t, self.sigma_data, self.sigma_min)
            c_skip, c_out, c_in = (_bcast(c, x_t) for c in (c_skip, c_out, c_in))
            out = self.net(c_in * x_t, c_noise, class_labels=class_labels, return_features=return_features, **cond)
            F, feats = out if return_features else (out, None)
            pred = c_skip * x_t + c_out * F
        elif self.preconditioning == "velocity":
            out = self.net(x_t, t, class_labels=class_labels, return_features=return_features, **cond)
            pred, feats = out if return_features else (out, None)
        else:
            out = self.net(x_t / self.sigma_data, t, class_labels=class_labels, return_features=return_features, **cond)
            F, feats = out if return_features else (out, None)
            pred = self.sigma_data * F
        return (pred, feats) if return_features else pred

    def x0(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        """Data prediction E[x | x_t] in this network's own path coordinates."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        pred = self(x_t, t, class_labels=class_labels, **cond)
        if self.preconditioning == "trigflow":  # closed form, so that x0(x, 0) = x holds exactly
            c_skip, c_out = trigflow_coefficients(t, self.sigma_data)
            return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * (pred / self.sigma_data)
        return to_x0_eps(pred, self.prediction, x_t, t, self.path)[0]

    def x0_from(self, x_t: Tensor, t: Tensor, path: GaussianPath, class_labels: Tensor | None = None, **cond) -> Tensor:
        """Data prediction for a state given on another path (x0 itself is path-independent)."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        x_own, t_own = convert(x_t, t, path, self.path)
        return self.x0(x_own, t_own, class_labels=class_labels, **cond)
