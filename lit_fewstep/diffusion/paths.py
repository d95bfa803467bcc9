"""Gaussian probability paths x_t = a(t) x + b(t) z, z ~ N(0, I).

Every path in the few-step literature is one of these with a different clock:

=============  =====================  ======================  ====================
path           a(t)                   b(t)                    t range (data -> noise)
=============  =====================  ======================  ====================
EDM / VE       1                      t  (t = sigma)          [0.002, 80]
VP cosine      cos(pi t / 2)          sin(pi t / 2)           [0, 1]
TrigFlow       cos t                  sigma_d sin t           [0, pi/2]
linear (RF)    1 - t                  t                       [0, 1]
=============  =====================  ======================  ====================

Two paths with the same log-SNR  lambda = ln(a / b)  describe the same noisy point up to the
scale a, so a state and time move from one path to another by matching lambda and rescaling
(`convert`). This is the only place where a(t), b(t) and their derivatives are written; methods
and samplers ask a path, they never re-derive them.

Conventions: time always runs from data (small t) to noise (large t). Papers that run the clock the
other way (CAF, pix2seq) convert at their edge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GaussianPath",
    "EDMPath",
    "VPCosinePath",
    "vp_cosine_time",
    "TrigFlowPath",
    "LinearPath",
    "convert",
    "make_path",
]


def _bcast(t: Tensor | float, like: Tensor) -> Tensor:
    """Make a per-sample time [B] broadcast against a state [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class GaussianPath:
    """x_t = a(t) x + b(t) z with derivatives and log-SNR. Times are tensors or floats."""

    name: str = "abstract"
    t_min: float
    t_max: float

    def a(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def b(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def da(self, t: Tensor) -> Tensor:
        """d a / d t."""
        raise NotImplementedError

    def db(self, t: Tensor) -> Tensor:
        """d b / d t."""
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of `log_snr`."""
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = ln(a(t) / b(t)), decreasing in t."""
        return torch.log(self.a(t)) - torch.log(self.b(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Equivalent EDM noise level b / a: the path's x_t / a(t) is x + sigma z."""
        return self.b(t) / self.a(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.t_from_log_snr(-torch.log(torch.as_tensor(sigma)))

    def noise(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Forward process: x_t = a(t) x + b(t) z, t of shape [B] or scalar."""
        return _bcast(self.a(t), x) * x + _bcast(self.b(t), x) * z

    def velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Conditional velocity d x_t / d t = a'(t) x + b'(t) z."""
        return _bcast(self.da(t), x) * x + _bcast(self.db(t), x) * z

    def transition(self, x_s: Tensor, s: Tensor | float, t: Tensor | float, z: Tensor) -> Tensor:
        """Sample q(x_t | x_s) for t >= s: x_t = (a_t / a_s) x_s + sqrt(b_t^2 - (a_t b_s / a_s)^2) z.

        Re-noises a state from time s to the later time t (consistency models' multistep sampling,
        Algorithm 1 of Song et al. 2023: on EDM x_t = x + sqrt(t^2 - eps^2) z; on TrigFlow from s = 0,
        x_t = cos t x + sigma_d sin t z).
        """
        s = torch.as_tensor(s, dtype=x_s.dtype, device=x_s.device)
        t = torch.as_tensor(t, dtype=x_s.dtype, device=x_s.device)
        ratio = self.a(t) / self.a(s)
        std = torch.sqrt((self.b(t) ** 2 - (ratio * self.b(s)) ** 2).clamp_min(0.0))
        return _bcast(ratio, x_s) * x_s + _bcast(std, x_s) * z

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EDMPath(GaussianPath):
    """Variance-exploding path of Karras et al. 2022: x_sigma = x + sigma z, t = sigma."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max = sigma_min, sigma_max

    def a(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def b(self, t):
        return torch.as_tensor(t)

    def da(self, t):
        return torch.zeros_like(torch.as_tensor(t))

    def db(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def t_from_log_snr(self, log_snr):
        return torch.exp(-torch.as_tensor(log_snr))


class VPCosinePath(GaussianPath):
    """Variance-preserving cosine path: a = cos(pi t / 2), b = sin(pi t / 2)."""

    name = "vp_cosine"

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4):
        self.t_min, self.t_max = t_min, t_max

    def a(self, t):
        return torch.cos(0.5 * math.pi * torch.as_tensor(t))

    def b(self, t):
        return torch.sin(0.5 * math.pi * torch.as_tensor(t))

    def da(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * torch.as_tensor(t))

    def db(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * torch.as_tensor(t))

    def t_from_log_snr(self, log_snr):
        return torch.atan(torch.exp(-torch.as_tensor(log_snr))) * (2.0 / math.pi)


def vp_cosine_time(sigma: float) -> float:
    """The time of `VPCosinePath` whose EDM noise level b / a is sigma: t = (2 / pi) atan(sigma) (a Python float, for
    grids and time ranges; `VPCosinePath.t_from_sigma` is the tensor version)."""
    return 2.0 / math.pi * math.atan(float(sigma))


class TrigFlowPath(GaussianPath):
    """TrigFlow of Lu & Song 2024 (sCM): x_t = cos(t) x + sin(t) z', z' ~ N(0, sigma_d^2 I).

    With unit noise z this is b(t) = sigma_d sin t, so that sigma = sigma_d tan t.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5, t_min: float = 0.0, t_max: float = 0.5 * math.pi):
        self.sigma_data = sigma_data
        self.t_min, self.t_max = t_min, t_max

    def a(self, t):
        return torch.cos(torch.as_tensor(t))

    def b(self, t):
        return self.sigma_data * torch.sin(torch.as_tensor(t))

    def da(self, t):
        return -torch.sin(torch.as_tensor(t))

    def db(self, t):
        return self.sigma_data * torch.cos(torch.as_tensor(t))

    def t_from_log_snr(self, log_snr):
        return torch.atan(torch.exp(-torch.as_tensor(log_snr)) / self.sigma_data)

    def __repr__(self):
        return f"TrigFlowPath(sigma_data={self.sigma_data})"


class LinearPath(GaussianPath):
    """Rectified-flow / flow-matching path: x_t = (1 - t) x + t z, velocity z - x."""

    name = "linear"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = t_min, t_max

    def a(self, t):
        return 1.0 - torch.as_tensor(t)

    def b(self, t):
        return torch.as_tensor(t)

    def da(self, t):
        return -torch.ones_like(torch.as_tensor(t))

    def db(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def t_from_log_snr(self, log_snr):
        # b / a = e^{-lambda}  =>  t = sigma / (1 + sigma) = sigmoid(-lambda)
        return torch.sigmoid(-torch.as_tensor(log_snr))


def convert(x_t: Tensor, t: Tensor, src: GaussianPath, dst: GaussianPath) -> tuple[Tensor, Tensor]:
    """Move a noisy state from path `src` at time t to the equal-SNR state on path `dst`.

    x_t / a_src(t) = x + sigma z is path-independent, so x_dst = a_dst(t') / a_src(t) * x_t with t'
    chosen so that both have the same log-SNR. Returns (x_dst, t_dst).
    """
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    t_dst = dst.t_from_log_snr(src.log_snr(t))
    scale = dst.a(t_dst) / src.a(t)
    return _bcast(scale, x_t) * x_t, t_dst


_PATHS = {"edm": EDMPath, "vp_cosine": VPCosinePath, "trigflow": TrigFlowPath, "linear": LinearPath}


def make_path(name: str, **kwargs) -> GaussianPath:
    """Path by name: 'edm', 'vp_cosine', 'trigflow' or 'linear'."""
    if name not in _PATHS:
        raise ValueError(f"path: unknown path {name!r}; choose one of {sorted(_PATHS)}.")
    return _PATHS[name](**kwargs)
