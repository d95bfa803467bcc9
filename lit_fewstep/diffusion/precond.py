"""Preconditioning: how a raw network F becomes a prediction on a path.

A *preconditioning* is one small class per parameterization. It fixes

- the path the network lives on (`path`, a `diffusion.paths.GaussianPath`),
- what its preconditioned output is (`prediction`, a kind of `diffusion.predictions`),
- `inputs`: the map from the state (x_t, t[, s]) to what the raw network is fed (scaled input, noise
  label, and for two-time maps the label of the second time s),
- `output`: the map from the raw network output back to the prediction, and `raw_target`, its inverse
  (the regression target of the raw network, Eq. 8 of Karras et al. 2022 for EDM),
- `to_x0`: the data prediction implied by that prediction.

Class labels and any other conditioning (guidance scale, extra channels) are passed to the network
untouched; a preconditioning only rescales x and builds the time labels.

=====================  ==============  ============  ========================  ==========================
name (config string)   class           path          network input, labels     prediction
=====================  ==============  ============  ========================  ==========================
``"edm"``              EDM             EDM (sigma)   c_in x, ln(sigma)/4       x0 (denoiser D)
``"consistency"``      Consistency     EDM (sigma)   c_in x, ln(sigma)/4       x0 (consistency function)
``"trigflow"``         TrigFlow        TrigFlow      x / sigma_d, t            velocity sigma_d F
``"trigflow_edm"``     TrigFlowEDM     TrigFlow      x / sigma_d, ln(sigma)/4  velocity -sigma_d F
``"velocity"``         Velocity        linear        x, t                      velocity
``"vp_eps"``           VPEps           VP cosine     x, 1000 t                 eps
``"vp_v"``             VPV             VP cosine     x, 1000 t                 v = a eps - b x0
``"ctm"``              CTM             EDM (sigma)   c_in(t) x, ln t/4, ln s/4 x0 at s = t; jump G
``"flow_map"``         FlowMap         linear        x, t, s                   velocity at s = t; jump f
=====================  ==============  ============  ========================  ==========================

The last two are *two-time* maps (`TwoTimePreconditioning`): the network also sees a second time s and
the preconditioning adds `jump(pred, x_t, t, s)`, the state at time s reached from x_t along the
probability-flow ODE (CTM's G(x_t, t, s), the flow map f(x_t, t, s)). Both satisfy jump(x, t, t) = x
exactly.

`PreconditionedNet` is the one module every method holds for such a network (teacher, fake score,
student initialised from a teacher). It picks its preconditioning by name from `PRECONDITIONINGS` (the
string is what configs and checkpoints record), and always answers `x0(x_t, t)` in its own path's
coordinates, so samplers and distillation losses can use any teacher the same way (converting other
paths' states through `diffusion.paths.convert`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .paths import GaussianPath, _bcast, convert, make_path
from .predictions import to_x0_eps

__all__ = [
    "edm_coefficients",
    "consistency_coefficients",
    "trigflow_coefficients",
    "Preconditioning",
    "TwoTimePreconditioning",
    "EDMPreconditioning",
    "ConsistencyPreconditioning",
    "TrigFlowPreconditioning",
    "TrigFlowEDMPreconditioning",
    "VelocityPreconditioning",
    "VPEpsPreconditioning",
    "VPVPreconditioning",
    "VPXPreconditioning",
    "CTMPreconditioning",
    "FlowMapPreconditioning",
    "PRECONDITIONINGS",
    "make_preconditioning",
    "PreconditionedNet",
]


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


def _check_sigma_data(sigma_data) -> float:
    if not isinstance(sigma_data, (int, float)) or not 0.0 < float(sigma_data) < math.inf:
        raise ValueError(f"sigma_data: the data's standard deviation must be a positive number, got {sigma_data!r}; "
                         "use the data module's sigma_data (e.g. 0.5 for images in [-1, 1]).")
    return float(sigma_data)


# ----------------------------------------------------------------------------------------------------
# One-time parameterizations: the network sees (x_t, t).


class Preconditioning:
    """A parameterization of a network F on a path: (x_t, t) -> network inputs -> prediction.

    Subclasses set `name` (the config string), `prediction` (a kind of `diffusion.predictions`) and
    `path`, and implement `inputs`, `output` and `raw_target`. All maps are elementwise in the state,
    take per-sample times t of shape [B] and are safe under `torch.func.jvp` (no in-place ops).

    Args:
        sigma_data: data standard deviation sigma_d (used by the EDM-type and TrigFlow scalings).
        sigma_min: smallest time of the EDM-type paths: the boundary eps of the consistency function,
            CTM's "time 0" (ignored by the other parameterizations).
    """

    name: str = "abstract"
    prediction: str = "x0"
    two_time: bool = False
    path: GaussianPath

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        self.sigma_data = _check_sigma_data(sigma_data)
        self.sigma_min = float(sigma_min)

    def inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(network input, noise label [B]) for the state x_t [B, ...] at time t [B]."""
        raise NotImplementedError

    def output(self, F: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The prediction of kind `prediction` from the raw network output F at (x_t, t)."""
        raise NotImplementedError

    def raw_target(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Inverse of `output`: the raw output F for which `output(F, x_t, t) == pred`."""
        raise NotImplementedError

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Data prediction implied by `pred` (generic conversion of `diffusion.predictions`)."""
        if self.prediction in ("x0", "denoiser"):
            return pred
        return to_x0_eps(pred, self.prediction, x_t, t, self.path)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_data={self.sigma_data}, sigma_min={self.sigma_min})"


class EDMPreconditioning(Preconditioning):
    """Karras et al. 2022 (EDM) on the path x_sigma = x + sigma z, predicting x0.

    Eq. 7 of EDM: D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the
    Table 1 coefficients of `edm_coefficients` (unit-variance network input and target; c_noise = ln(sigma)/4).
    """

    name = "edm"
    prediction = "x0"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        self.path = make_path("edm")

    def _skip_out(self, t: Tensor) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _, _ = edm_coefficients(t, self.sigma_data)
        return c_skip, c_out

    def inputs(self, x_t, t):
        # EDM Eq. 7, inside F: c_in(sigma) x and c_noise(sigma) = ln(sigma) / 4 (Table 1)
        _, _, c_in, c_noise = edm_coefficients(t, self.sigma_data)
        return _bcast(c_in, x_t) * x_t, c_noise

    def output(self, F, x_t, t):
        # EDM Eq. 7: D = c_skip x + c_out F
        c_skip, c_out = self._skip_out(t)
        return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * F

    def raw_target(self, pred, x_t, t):
        # EDM Eq. 8: F_target = (D - c_skip x) / c_out
        c_skip, c_out = self._skip_out(t)
        return (pred - _bcast(c_skip, x_t) * x_t) / _bcast(c_out, x_t)


class ConsistencyPreconditioning(EDMPreconditioning):
    """Song et al. 2023 (consistency models), Eq. 5 with the coefficients of Appendix C, on the EDM path.

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, ln(sigma)/4), with c_skip, c_out shifted by the
    boundary time eps = `sigma_min` (`consistency_coefficients`) so that f(x, sigma_min) = x exactly.
    c_in and c_noise are EDM's, so a student can start from an EDM teacher's raw weights. Its x0 is the
    consistency function (the ODE's end point), not a posterior mean. `raw_target` divides by
    c_out(sigma_min) = 0 at the boundary.
    """

    name = "consistency"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        Preconditioning.__init__(self, sigma_data, sigma_min)
        self.path = make_path("edm", sigma_min=self.sigma_min)

    def _skip_out(self, t):
        # CM Eq. 5 with App. C's c_skip(t) = sigma_d^2 / ((t - eps)^2 + sigma_d^2), c_out = sigma_d (t - eps) / sqrt(sigma_d^2 + t^2)
        return consistency_coefficients(t, self.sigma_data, self.sigma_min)


class TrigFlowPreconditioning(Preconditioning):
    """Lu & Song 2024 (sCM, Sec. 3): TrigFlow path x_t = cos(t) x + sin(t) sigma_d z, t in [0, pi/2].

    The velocity is sigma_d F(x_t / sigma_d, t) (noise label t itself, not 1000 t). Its x0 is sCM's
    consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), the closed-form
    velocity -> x0 conversion written so that f(x, 0) = x exactly (`trigflow_coefficients`).
    """

    name = "trigflow"
    prediction = "velocity"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        self.path = make_path("trigflow", sigma_data=self.sigma_data)

    def inputs(self, x_t, t):
        # sCM: F is fed x_t / sigma_d and c_noise(t) = t
        return x_t / self.sigma_data, t

    def output(self, F, x_t, t):
        # sCM: dx_t/dt = sigma_d F(x_t / sigma_d, t)
        return self.sigma_data * F

    def raw_target(self, pred, x_t, t):
        return pred / self.sigma_data

    def to_x0(self, pred, x_t, t):
        # sCM consistency function: f = cos(t) x_t - sin(t) sigma_d F, with F = pred / sigma_d
        c_skip, c_out = trigflow_coefficients(t, self.sigma_data)
        return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * (pred / self.sigma_data)


class TrigFlowEDMPreconditioning(TrigFlowPreconditioning):
    """TrigFlow with EDM's noise label and sign, so an EDM network's raw weights are a TrigFlow network.

    At sigma = sigma_d tan t the EDM state is x_t / cos t, and EDM's c_in x_sigma = x_t / sigma_d, c_skip =
    cos^2 t, c_out = sigma_d sin t, so D = cos(t) x_t + sigma_d sin(t) F_EDM: the sCM consistency function
    cos(t) x_t - sigma_d sin(t) F_trig with F_trig = -F_EDM(x_t / sigma_d, ln(sigma_d tan t) / 4). sCD starts
    its student from an EDM teacher with it (sCM's own students start from a TrigFlow teacher fed c_noise =
    t, which an EDM teacher is not). Along sCM's JVP tangent (cos t sin t) the noise label moves at the
    constant rate d/dt ln(tan t) / 4 * cos t sin t = 1/4, so the time derivative stays bounded.
    """

    name = "trigflow_edm"

    def inputs(self, x_t, t):
        # sigma floored so that t = 0 (where f = x_t whatever F is) gets a finite label
        sigma = (self.sigma_data * torch.tan(t)).clamp_min(1e-12)
        return x_t / self.sigma_data, torch.log(sigma) / 4.0

    def output(self, F, x_t, t):
        return -self.sigma_data * F

    def raw_target(self, pred, x_t, t):
        return -pred / self.sigma_data


class VelocityPreconditioning(Preconditioning):
    """Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023) on x_t = (1 - t) x + t z.

    The raw output is the velocity d x_t / d t = z - x itself; the network sees x_t and t in [0, 1]
    unscaled. x0 = x_t - t v (through `diffusion.predictions`).
    """

    name = "velocity"
    prediction = "velocity"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        self.path = make_path("linear")

    def inputs(self, x_t, t):
        return x_t, t

    def output(self, F, x_t, t):
        # flow matching: F(x_t, t) regresses the conditional velocity a' x + b' z = z - x
        return F

    def raw_target(self, pred, x_t, t):
        return pred


class _VPPreconditioning(Preconditioning):
    """Variance-preserving cosine path x_t = cos(pi t / 2) x + sin(pi t / 2) z, t in [0, 1].

    DDPM-style: the network sees x_t unscaled (the path already keeps its variance near 1; sigma_d is not
    used) and the noise label 1000 t, the cosine-schedule time read as a DDPM timestep index. This is what
    the progressive-distillation code of Salimans & Ho 2022 feeds (its ``inv_cos`` input: the log-SNR
    mapped back to the cosine time, t = arctan(exp(-lambda / 2)) / (pi / 2), times 1000), which the
    guided distillation of Meng et al. 2023 builds on. The label is order 1000, which the nets'
    sinusoidal embedding (frequencies down to 1e-4) resolves.
    """

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        self.path = make_path("vp_cosine")

    def inputs(self, x_t, t):
        # DDPM / PD: unscaled x_t, timestep label 1000 t
        return x_t, t * 1000.0

    def output(self, F, x_t, t):
        # the raw output is the prediction itself (DDPM's eps-hat or PD's v-hat)
        return F

    def raw_target(self, pred, x_t, t):
        return pred


class VPEpsPreconditioning(_VPPreconditioning):
    """Ho et al. 2020 (DDPM) noise prediction on the VP cosine path: F = E[z | x_t].

    x0 = (x_t - b eps) / a (DDPM Eq. 15 with a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)); ill-conditioned
    as a -> 0 near t = 1. See `_VPPreconditioning` for the inputs.
    """

    name = "vp_eps"
    prediction = "eps"


class VPVPreconditioning(_VPPreconditioning):
    """Salimans & Ho 2022 (progressive distillation, Sec. 4) v-prediction on the VP cosine path.

    F = v = a eps - b x0; x0 = a x_t - b v (a^2 + b^2 = 1), well conditioned at both ends. See
    `_VPPreconditioning` for the inputs.
    """

    name = "vp_v"
    prediction = "v"


class VPXPreconditioning(_VPPreconditioning):
    """Data (x0) prediction on the VP cosine path: F = E[x | x_t] directly.

    Analog Bits (Chen et al. 2022) regresses the clean bits with an MSE loss, and its samplers clip this x0 to
    the bit range. See `_VPPreconditioning` for the inputs.
    """

    name = "vp_x"
    prediction = "x0"


# ----------------------------------------------------------------------------------------------------
# Two-time maps: the network sees (x_t, t, s) and the preconditioning jumps from t to s.


class TwoTimePreconditioning(Preconditioning):
    """A map (x_t, t, s) -> the PF-ODE state at time s <= t, from a network conditioned on both times.

    `inputs(x_t, t, s)` returns (network input, noise label of t, label of s), the last one for the
    networks' ``s_labels`` (nets built with ``second_time=True``). `output(F, x_t, t, s)` is the
    two-time prediction (CTM's g, the flow map's average velocity F); at s = t it is an ordinary
    prediction of kind `prediction` (CTM: a denoiser, flow map: the instantaneous velocity), which is
    what `to_x0` converts. `jump(pred, x_t, t, s)` is the trajectory map, with jump(x, t, t) = x
    exactly. `t_end` is the time a one-step sample jumps to ("time 0" of the map).
    """

    two_time = True
    t_end: float = 0.0

    def inputs(self, x_t: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        raise NotImplementedError

    def output(self, F: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        raise NotImplementedError

    def raw_target(self, pred: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        raise NotImplementedError

    def jump(self, pred: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The state at time s from the two-time prediction `pred` = output(F, x_t, t, s)."""
        raise NotImplementedError


class CTMPreconditioning(TwoTimePreconditioning):
    """Kim et al. 2024 (consistency trajectory models) on the EDM path, t = sigma.

    g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, ln(t)/4, ln(s)/4), EDM's Table 1 coefficients
    of t only (the official code's "edm" inner parameterization; its net labels are 250 ln t, 250 ln s,
    i.e. 1000 c_noise, while ours stay EDM's ln/4 so that a student starts from our EDM teachers), and
    the trajectory map ("euler" outer parameterization)
        G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s),
    so G(x, t, t) = x exactly and g(x_t, t, t) is a denoiser (its DSM loss and its score).
    Times are >= sigma_min > 0 (ln s); "time 0" is sigma_min, as in the official code (`t_end`).
    """

    name = "ctm"
    prediction = "x0"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        if not 0.0 < self.sigma_min < math.inf:
            raise ValueError(f"sigma_min: CTM's smallest time must be positive (its network sees ln(s)), got {sigma_min!r}.")
        self.path = make_path("edm", sigma_min=self.sigma_min)
        self.t_end = self.sigma_min

    def inputs(self, x_t, t, s):
        # CTM g: F(c_in(t) x_t, c_noise(t), c_noise(s)) with EDM's c_in, c_noise = ln(.)/4
        _, _, c_in, c_noise = edm_coefficients(t, self.sigma_data)
        return _bcast(c_in, x_t) * x_t, c_noise, torch.log(s) / 4.0

    def output(self, F, x_t, t, s):
        # CTM g(x_t, t, s) = c_skip(t) x_t + c_out(t) F  (EDM Eq. 7 with the coefficients of t)
        c_skip, c_out, _, _ = edm_coefficients(t, self.sigma_data)
        return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * F

    def raw_target(self, pred, x_t, t, s):
        c_skip, c_out, _, _ = edm_coefficients(t, self.sigma_data)
        return (pred - _bcast(c_skip, x_t) * x_t) / _bcast(c_out, x_t)

    def jump(self, pred, x_t, t, s):
        # CTM: G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s)
        ratio = _bcast(s / t, x_t)
        return ratio * x_t + (1.0 - ratio) * pred


class FlowMapPreconditioning(TwoTimePreconditioning):
    """Sabour, Fidler & Kreis 2025 (Align Your Flow) flow map on the linear path x_t = (1 - t) x + t z.

    Euler parameterization f(x_t, t, s) = x_t + (s - t) F(x_t, t, s): F is an average velocity over
    [s, t], the network sees x_t, t and s unscaled (as `VelocityPreconditioning`, so a flow-matching
    teacher's weights fit apart from the second-time embedding). f(x, t, t) = x exactly, s = 0 is a
    consistency model and F(x_t, t, t) is the flow-matching velocity. "Time 0" is 0 (`t_end`).
    """

    name = "flow_map"
    prediction = "velocity"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(sigma_data, sigma_min)
        self.path = make_path("linear")
        self.t_end = 0.0

    def inputs(self, x_t, t, s):
        return x_t, t, s

    def output(self, F, x_t, t, s):
        return F

    def raw_target(self, pred, x_t, t, s):
        return pred

    def jump(self, pred, x_t, t, s):
        # AYF: f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)
        return x_t + _bcast(s - t, x_t) * pred


PRECONDITIONINGS: dict[str, type[Preconditioning]] = {
    "edm": EDMPreconditioning,
    "velocity": VelocityPreconditioning,
    "trigflow": TrigFlowPreconditioning,
    "consistency": ConsistencyPreconditioning,
    "vp_eps": VPEpsPreconditioning,
    "vp_v": VPVPreconditioning,
    "vp_x": VPXPreconditioning,
    "trigflow_edm": TrigFlowEDMPreconditioning,
    "ctm": CTMPreconditioning,
    "flow_map": FlowMapPreconditioning,
}


def make_preconditioning(name: str, sigma_data: float = 0.5, sigma_min: float = 0.002) -> Preconditioning:
    """Preconditioning by its config string (a key of `PRECONDITIONINGS`)."""
    if name not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning: unknown value {name!r}; choose one of {tuple(PRECONDITIONINGS)}.")
    return PRECONDITIONINGS[name](sigma_data, sigma_min)


class PreconditionedNet(nn.Module):
    """A network with its path and parameterization.

    Args:
        net: a `lit_fewstep.nets` network, F(x, noise_labels, class_labels=..., ...); two-time
            parameterizations need one built with ``second_time=True`` (it takes ``s_labels``).
        preconditioning: a key of `PRECONDITIONINGS` (see the module docstring and each class):
            ``"edm"``: EDM path, D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4); predicts x0.
            ``"velocity"``: linear (flow-matching) path, F(x_t, t) is the velocity z - x.
            ``"trigflow"``: TrigFlow path, sigma_d F(x_t / sigma_d, t) is the velocity (sCM). Its x0 is
            the sCM consistency function cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), so x0(x, 0) = x.
            ``"trigflow_edm"``: the same path and consistency function with EDM's noise label and sign
            (-sigma_d F(x_t / sigma_d, ln(sigma_d tan t)/4) is the velocity): an EDM net's weights fit it.
            ``"consistency"``: EDM path, consistency function of Song et al. 2023 (Appendix C):
            f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4) with the boundary-shifted c_skip, c_out of
            `consistency_coefficients`, so x0(x, sigma_min) = x exactly; c_in and c_noise are EDM's, so a
            student can start from an EDM teacher's raw weights.
            ``"vp_eps"`` / ``"vp_v"`` / ``"vp_x"``: VP cosine path, F predicts eps / v = a eps - b x0 / x0, noise
            label 1000 t.
            ``"ctm"``: two-time CTM map G(x_t, t, s) on the EDM path (`CTMPreconditioning`).
            ``"flow_map"``: two-time flow map f(x_t, t, s) on the linear path (`FlowMapPreconditioning`).
        sigma_data: data standard deviation sigma_d.
        sigma_min: the boundary time eps of ``"consistency"``, CTM's smallest time (ignored otherwise).

    The preconditioning object is `self.precond` (plain attributes, no parameters: the state dict holds
    only ``net.*``). For the two-time kinds `forward(..., s=None)` is the two-time prediction at s
    (default s = t, the ordinary diffusion prediction: CTM's denoiser g(x, t, t), the flow map's velocity
    F(x, t, t)), `jump` is G / f, and `x0` / `x0_from` mean the jump to the map's "time 0" (`t_end`:
    CTM sigma_min, flow map 0): a one-step sample, not the posterior mean E[x | x_t].
    """

    def __init__(self, net: nn.Module, preconditioning: str = "edm", sigma_data: float = 0.5, sigma_min: float = 0.002):
        _check_sigma_data(sigma_data)
        super().__init__()
        precond = make_preconditioning(preconditioning, sigma_data, sigma_min)
        if precond.two_time and getattr(net, "second_time", True) is False:
            raise ValueError(f"net: preconditioning {preconditioning!r} is a two-time map and feeds the network a "
                             "second time s; build the network with second_time=True.")
        self.net = net
        self.preconditioning = preconditioning
        self.sigma_data = precond.sigma_data
        self.sigma_min = precond.sigma_min
        self.precond = precond
        self.path: GaussianPath = precond.path
        self.prediction = precond.prediction

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    @property
    def two_time(self) -> bool:
        return self.precond.two_time

    @staticmethod
    def _times(t, x_t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, return_features: bool = False,
                s: Tensor | None = None, **cond):
        """The prediction of kind `self.prediction` at (x_t, t); t of shape [B] (or a scalar).

        Two-time kinds: the two-time prediction at (x_t, t, s), s defaulting to t (see the class doc);
        one-time kinds take no s.
        """
        t = self._times(t, x_t)
        p = self.precond
        if p.two_time:
            s = t if s is None else self._times(s, x_t)
            x_in, noise_labels, s_labels = p.inputs(x_t, t, s)
            out = self.net(x_in, noise_labels, class_labels=class_labels, s_labels=s_labels,
                           return_features=return_features, **cond)
        else:
            if s is not None:
                raise ValueError(f"s: preconditioning {self.preconditioning!r} is a one-time parameterization; "
                                 "a second time s needs 'ctm' or 'flow_map'.")
            x_in, noise_labels = p.inputs(x_t, t)
            out = self.net(x_in, noise_labels, class_labels=class_labels, return_features=return_features, **cond)
        F, feats = out if return_features else (out, None)
        pred = p.output(F, x_t, t, s) if p.two_time else p.output(F, x_t, t)
        return (pred, feats) if return_features else pred

    def jump(self, x_t: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        """Two-time kinds only: the state at time s reached from x_t at time t (CTM's G, the flow map f)."""
        if not self.precond.two_time:
            raise ValueError(f"jump: preconditioning {self.preconditioning!r} is a one-time parameterization; "
                             "jumps need 'ctm' or 'flow_map'.")
        t, s = self._times(t, x_t), self._times(s, x_t)
        pred = self(x_t, t, class_labels=class_labels, s=s, **cond)
        return self.precond.jump(pred, x_t, t, s)

    def x0(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        """Data prediction E[x | x_t] in this network's own path coordinates (two-time kinds: the jump
        to time `precond.t_end`)."""
        t = self._times(t, x_t)
        if self.precond.two_time:
            return self.jump(x_t, t, self.precond.t_end, class_labels=class_labels, **cond)
        pred = self(x_t, t, class_labels=class_labels, **cond)
        return self.precond.to_x0(pred, x_t, t)

    def x0_from(self, x_t: Tensor, t: Tensor, path: GaussianPath, class_labels: Tensor | None = None, **cond) -> Tensor:
        """Data prediction for a state given on another path (x0 itself is path-independent)."""
        t = self._times(t, x_t)
        x_own, t_own = convert(x_t, t, path, self.path)
        return self.x0(x_own, t_own, class_labels=class_labels, **cond)
