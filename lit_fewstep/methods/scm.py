"""Continuous-time consistency models on TrigFlow: sCD and sCT (Lu & Song 2024, "sCM").

TrigFlow path (diffusion/paths.py): x_t = cos(t) x + sin(t) z', z' ~ N(0, sigma_d^2 I), t in [0, pi/2];
sigma_EDM = sigma_d tan t. The student is a `PreconditionedNet(net, "trigflow")`: sigma_d F_theta(x_t/sigma_d, t)
is a velocity, and its x0 prediction is the consistency function (sCM Sec. 3, Eq. (7) (verify)). sCD can start
its student from an EDM teacher's weights with `PreconditionedNet(net, "trigflow_edm")`: the same function with
EDM's noise label and sign, which makes the teacher's denoiser a TrigFlow student.

    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),     f_theta(x, 0) = x.

Training minimizes, per sample, the stop-gradient regression whose gradient is the N -> inf limit of
discrete consistency training (sCM Sec. 4.2, with adaptive weighting w_phi):

    L = e^{w_phi(t)} / D ||F_theta - F_theta- - g||^2 - w_phi(t),
    g = -cos^2(t) (sigma_d F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta-/dt),

then tangent normalization g <- g / (||g|| + c), c = 0.1, and tangent warm-up r = min(1, k / warmup_steps).
dF_theta-/dt is the total derivative along the PF-ODE, a forward-mode JVP (`trigflow_jvp`).

- sCD: dx_t/dt is the frozen teacher's PF-ODE velocity on TrigFlow. Any lit_fewstep teacher (EDM, flow
  matching) serves: its x0 at the TrigFlow state comes from `PreconditionedNet.x0_from` (equal-SNR path
  conversion) and the velocity from `predictions.convert_prediction` - no path math in this file.
- sCT: dx_t/dt = cos(t) z' - sin(t) x, the conditional velocity (`GaussianPath.velocity`).

The JVP path is eager (torch.compile of jvp hits a torch 2.14 internal assert with conv + GroupNorm: `eager_networks`) and the
nets use explicit attention (the CPU SDPA kernel has no forward-mode AD). Dropout: the JVP pass and the
gradient pass replay the same RNG state, so both see the same masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..diffusion.paths import _bcast
from ..diffusion.precond import PreconditionedNet
from ..diffusion.predictions import convert_prediction
from ..nets.embeddings import positional_embedding
from .base import Phase, float32_jvp
from .consistency import ConsistencyFamily, same_dropout_masks

__all__ = ["AdaptiveWeight", "trigflow_jvp", "scm_tangent", "normalize_tangent", "SCM", "SCD", "SCT"]

TANGENT_NORMS = ("l2", "rms", "clip", "none")


class AdaptiveWeight(nn.Module):
    """w_phi(t): a small MLP on a positional embedding of t (sCM Sec. 4.2, adaptive weighting).

    t [B] -> [B]. The last layer starts at zero (w = 0: unit weight at the start).
    """

    def __init__(self, emb_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.emb_dim = emb_dim
        self.fc1 = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, t: Tensor) -> Tensor:
        # t in [0, pi/2]: scale so that the embedding's fastest frequencies resolve it.
        emb = positional_embedding(t * (1000.0 / (0.5 * math.pi)), self.emb_dim).to(self.fc1.weight.dtype)
        return self.fc2(torch.nn.functional.silu(self.fc1(emb))).squeeze(-1)


def trigflow_jvp(F_fn, x_t: Tensor, t: Tensor, dxdt: Tensor) -> tuple[Tensor, Tensor]:
    """(F, cos(t) sin(t) dF/dt): forward-mode derivative of (x_t, t) -> F(x_t, t) along the PF-ODE.

    Tangents (cos t sin t dx_t/dt, cos t sin t): the sin*cos factor of g is folded into the tangents
    (sCM Sec. 4.2; FastGen's sCM does the same) so the JVP stays finite near t = pi/2.
    """
    cs = torch.cos(t) * torch.sin(t)
    return float32_jvp(F_fn, (x_t, t), (_bcast(cs, x_t) * dxdt, cs))


def scm_tangent(F_minus: Tensor, cs_dF_dt: Tensor, dxdt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float,
                r: float) -> Tensor:
    """g = -cos^2(t) (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF-/dt)  (sCM Sec. 4.2).

    `cs_dF_dt` is the JVP output cos(t) sin(t) dF-/dt of `trigflow_jvp`.
    """
    cos, sin = _bcast(torch.cos(t), x_t), _bcast(torch.sin(t), x_t)
    return -cos * cos * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * cs_dF_dt)


def normalize_tangent(g: Tensor, kind: str = "l2", c: float = 0.1) -> Tensor:
    """Tangent normalization g / (||g|| + c) (sCM Sec. 4.2): "l2" per-sample Euclidean norm (the paper's),
    "rms" per-sample norm / sqrt(D) (FastGen's "spatially invariant" variant); "clip" clips every element to
    [-1, 1] (sCM Sec. 4.2's alternative, "tangent clipping"; c unused); "none" leaves g."""
    if kind == "none":
        return g
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    elif kind != "l2":
        raise ValueError(f"tangent_norm: choose one of {TANGENT_NORMS}, got {kind!r}.")
    return g / _bcast(norm + c, g)


class SCM(ConsistencyFamily):
    """Continuous-time consistency model on TrigFlow (shared by sCD and sCT; not used directly).

    Args:
        net: a JVP-safe `lit_fewstep.nets` network F_theta (fed c_noise(t) = t).
        sigma_data: sigma_d.
        P_mean, P_std: time proposal tau ~ N(P_mean, P_std^2), sigma = e^tau, t = arctan(sigma / sigma_d)
            (CIFAR-10 -1.0, 1.4; ImageNet-512 -0.8, 1.6).
        sigma_min, sigma_max: EDM range of the proposal (sCD: the teacher's) and of sampling (T = arctan(sigma_max/sigma_d)).
        tangent_norm: "l2" (paper), "rms" (FastGen), "clip" (the paper's alternative: g clipped to [-1, 1]) or
            "none" (ablation); tangent_c: the c of g / (||g|| + c).
        warmup_steps: tangent warm-up r(k) = min(1, k / warmup_steps) (0: r = 1 from the start).
        adaptive_weighting: learn w_phi(t) (its parameters share the student's optimizer); False: w = 0.
        prior_weighting: multiply the regression term by 1 / (sigma_d tan t) (FastGen's default; off in the paper's form).
        preconditioning: "trigflow" (sCM: F fed c_noise = t) or "trigflow_edm" (the same consistency function with
            EDM's noise label ln(sigma)/4 and sign, so that sCD's student can start from an EDM teacher's weights).
        lr_decay_after: EDM2's inverse-square-root learning-rate decay after this many steps (0: constant lr); the
            official ImageNet-64 sCD decays after 35k steps (`Phase.decay_after`).
        lr, betas, weight_decay, ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`.
    """
    eager_networks = ("student",)  # differentiated by torch.func.jvp: never compiled (FewStepModule.compile_networks)

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, tangent_norm: str = "l2", tangent_c: float = 0.1,
                 warmup_steps: int = 10_000, adaptive_weighting: bool = True, prior_weighting: bool = False,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 ema_decay: float = 0.9999, grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100, preconditioning: str = "trigflow", lr_decay_after: int = 0):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm: choose one of {TANGENT_NORMS}, got {tangent_norm!r}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min / sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        if preconditioning not in ("trigflow", "trigflow_edm"):
            raise ValueError(f"preconditioning: sCM lives on TrigFlow; choose 'trigflow' or 'trigflow_edm', got "
                             f"{preconditioning!r}.")
        self.student = PreconditionedNet(net, preconditioning, sigma_data)
        self.path = self.student.path
        self.sigma_data, self.sigma_min, self.sigma_max, self.t_min = sigma_data, sigma_min, sigma_max, 0.0
        self.P_mean, self.P_std = P_mean, P_std
        self.tangent_norm, self.tangent_c, self.warmup_steps = tangent_norm, tangent_c, warmup_steps
        self.prior_weighting = prior_weighting
        self.weighting = AdaptiveWeight() if adaptive_weighting else None
        networks = ("student", "weighting") if adaptive_weighting else ("student",)
        self.phases = [Phase("consistency", "scm_loss", networks, lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, decay_after=lr_decay_after, updates_ema=True)]
        self.init_ema()

    # -------------------------------------------------------------- pieces
    def tangent_warmup(self, k: int) -> float:
        """r(k) = min(1, k / warmup_steps)."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, k / self.warmup_steps)

    def sample_times(self, normal: Tensor) -> Tensor:
        """tau = P_mean + P_std normal, sigma = e^tau clipped to [sigma_min, sigma_max], t = arctan(sigma / sigma_d)."""
        sigma = torch.exp(self.P_mean + self.P_std * normal)
        return self.path.t_from_sigma(sigma.clamp(self.sigma_min, self.sigma_max))

    def dxdt(self, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """dx_t/dt at (x_t, t): sCD from the teacher, sCT from data."""
        raise NotImplementedError

    def F(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """F_theta(x_t / sigma_d, t): the raw network output (the student's velocity is sigma_d F)."""
        return self.student(x_t, t, class_labels=y) / self.sigma_data

    # -------------------------------------------------------------- loss
    def continuous_loss(self, x_t: Tensor, t: Tensor, dxdt: Tensor, y: Tensor | None, r: float) -> Tensor:
        """Per-sample sCM loss [B]: e^{w(t)}/D ||F_theta - F_theta- - g||^2 - w(t) (sCM Sec. 4.2)."""
        y_s = self._labels(self.student, y)
        with same_dropout_masks() as replay:
            with torch.no_grad():
                F_minus, cs_dF_dt = trigflow_jvp(lambda x_, t_: self.F(x_, t_, y_s), x_t, t, dxdt)
            replay()
            F_theta = self.F(x_t, t, y_s)
        g = scm_tangent(F_minus, cs_dF_dt, dxdt, x_t, t, self.sigma_data, r)
        g = normalize_tangent(g, self.tangent_norm, self.tangent_c)
        D = F_theta[0].numel()
        sq = (F_theta - F_minus - g).flatten(1).pow(2).sum(1)
        if self.prior_weighting:
            sq = sq / (self.sigma_data * torch.tan(t))
        w = self.weighting(t) if self.weighting is not None else torch.zeros_like(t)
        return torch.exp(w) / D * sq - w

    def scm_loss(self, batch) -> Tensor:
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        # noise from FewStepModule.randn: seeded per iteration and sliced per DDP rank (exact resume)
        t = self.sample_times(self.randn((x.shape[0],), x))
        z = self.randn(x.shape, x)
        x_t = self.path.noise(x, z, t)
        with torch.no_grad():
            dxdt = self.dxdt(x, z, x_t, t, y)
        r = self.tangent_warmup(int(self.iteration))
        loss = self.continuous_loss(x_t, t, dxdt, y, r).mean()
        if self._trainer is not None:
            self.log("train/tangent_warmup", r, on_step=True, on_epoch=False)
        return loss


class SCD(SCM):
    """sCD: continuous-time consistency distillation from a frozen diffusion teacher.

    Args:
        teacher_ckpt: an EDMDiffusion or FlowMatching checkpoint; its PF-ODE is moved onto TrigFlow.
        init_from_teacher: start the student (and its EMA) from an EDM teacher's raw weights, as sCM's students
            start from their teacher; needs preconditioning "trigflow_edm" and the teacher's net config.
        (other arguments: `SCM`; the teacher's sigma range bounds the time proposal)
    """

    def __init__(self, net: nn.Module, teacher_ckpt: str, sigma_data: float = 0.5, P_mean: float = -1.0,
                 P_std: float = 1.4, sigma_min: float = 0.002, sigma_max: float = 80.0, tangent_norm: str = "l2",
                 tangent_c: float = 0.1, warmup_steps: int = 10_000, adaptive_weighting: bool = True,
                 prior_weighting: bool = False, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, ema_decay: float = 0.9999, grad_clip: float = 0.0,
                 nonfinite: str = "stop", max_consecutive_skips: int = 100, preconditioning: str = "trigflow",
                 init_from_teacher: bool = False, lr_decay_after: int = 0):
        super().__init__(net, sigma_data, P_mean, P_std, sigma_min, sigma_max, tangent_norm, tangent_c, warmup_steps,
                         adaptive_weighting, prior_weighting, lr, betas, weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips, preconditioning, lr_decay_after)
        if init_from_teacher and preconditioning != "trigflow_edm":
            raise ValueError("init_from_teacher: an EDM teacher's weights expect the noise label ln(sigma)/4; set "
                             "preconditioning: trigflow_edm (or init_from_teacher: false).")
        self.teacher_ckpt, self.init_from_teacher = teacher_ckpt, init_from_teacher
        self.register_frozen("teacher", path=teacher_ckpt)

    def dxdt(self, x, z, x_t, t, y):
        """The teacher's PF-ODE velocity on TrigFlow, dx_t/dt = sigma_d F_teacher (converted through diffusion/)."""
        teacher = self._teacher()
        x0 = teacher.x0_from(x_t, t, self.path, class_labels=self._labels(teacher, y))
        return convert_prediction(x0, "x0", "velocity", x_t, t, self.path)


class SCT(SCM):
    """sCT: continuous-time consistency training from data, dx_t/dt = cos(t) z' - sin(t) x.

    Args: see `SCM` (sigma_max bounds the proposal; sCT may go past a teacher's 80, FastGen uses 800).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, tangent_norm: str = "l2", tangent_c: float = 0.1,
                 warmup_steps: int = 10_000, adaptive_weighting: bool = True, prior_weighting: bool = False,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 ema_decay: float = 0.9999, grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100, lr_decay_after: int = 0):
        super().__init__(net, sigma_data, P_mean, P_std, sigma_min, sigma_max, tangent_norm, tangent_c, warmup_steps,
                         adaptive_weighting, prior_weighting, lr, betas, weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips, lr_decay_after=lr_decay_after)

    def dxdt(self, x, z, x_t, t, y):
        return self.path.velocity(x, z, t)
