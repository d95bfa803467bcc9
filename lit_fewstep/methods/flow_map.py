"""Align Your Flow (Sabour, Fidler & Kreis 2025): flow maps distilled from a teacher. Notes: docs/flow_map.md.

Linear path x_t = (1 - t) x + t z (t = 0 data, t = 1 noise). One network F_theta(x_t, t, s) (a net built with
``second_time=True``, `PreconditionedNet(net, "flow_map")`) gives the flow map in the "Euler" parameterization

    f_theta(x_t, t, s) = x_t + (s - t) F_theta(x_t, t, s),     f(x, t, t) = x exactly,

the state at time s <= t on the teacher's probability-flow ODE. s = 0 is a consistency model, s -> t flow matching.

Both objectives are written as a regression on a stop-gradient target whose gradient is a positive multiple
of the paper's continuous-time gradient, ||F_theta - sg(F_theta- - g)||^2 per element (gradient 2 g dF/dtheta):

- AYF-EMD (Eulerian, the paper's main loss), teacher velocity v = v_phi(x_t, t):
      g = (F_theta- - v) + r (t - s) dF_theta-/dt,    dF/dt = d_t F + (grad_x F) v,
  a forward-mode JVP with tangents (v, 1, 0) in (x_t, t, s). The discrete loss
  ||f_theta(x_t, t, s) - f_theta-(x_t + (t' - t) v, t', s)||^2, t' = t + eps (s - t), has gradient
  2 eps (t - s)^2 g^T dF/dtheta + O(eps^2): the (t - s)^2 is a time weighting we leave out.
- AYF-LMD (Lagrangian, distillation only): g = F_theta- + r (s - t) d_s F_theta- - v_phi(f_theta-(x_t, t, s), s),
  i.e. d f_theta-/ds minus the teacher's velocity at the predicted point (a JVP in s, one more teacher call).

At s = t both residuals are F - v (the flow-matching gradient). The sCM stabilizers apply to g: tangent
normalization g / (||g|| + c) and a warm-up factor r ramping 0 -> 1 on the derivative term (both taken from
`methods.scm`). Time pairs: two logit-normal draws sorted (t the larger), or a logit-normal gap (`time_sampling`),
with a fraction of pairs put on the diagonal s = t.

Teacher: any frozen lit_fewstep diffusion teacher (flow matching natively; EDM through `x0_from`), its velocity
`convert_prediction(x0, "x0", "velocity")` on the linear path. Autoguidance during distillation (`guide_ckpt`):
v = lambda v_good + (1 - lambda) v_weak with lambda ~ U[guidance_range] per sample (lambda = 1: the teacher
alone), through `diffusion.guidance.autoguided_x0` (x0 and v are affine in each other at fixed x_t, so guiding
x0 guides v); the student then also sees lambda (a net built with ``guidance_embed=True``) and samples at a
chosen lambda with N NFE (guidance is baked in).

Sampling: x_{t_{i+1}} = f_theta(x_{t_i}, t_i, t_{i+1}) on a uniform grid from t_max to 0, no re-noising
(`TwoTimeJump` with gamma = 0); N steps = N NFE.

No official code exists; the choices the paper leaves open (time proposal, the unweighted regression, the
teacher-initialised student with a zeroed s embedding) are constructor arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..diffusion.guidance import autoguided_x0
from ..diffusion.paths import _bcast
from ..diffusion.precond import PreconditionedNet
from ..diffusion.predictions import convert_prediction
from ..diffusion.solvers import NFECounter, TwoTimeJump, run_steps, uniform_times
from .base import FewStepModule, Phase, float32_jvp
from .consistency import same_dropout_masks
from .scm import SCM, TANGENT_NORMS, normalize_tangent

__all__ = ["AYF", "OBJECTIVES", "TIME_SAMPLINGS"]

OBJECTIVES = ("emd", "lmd", "emd+lmd")
TIME_SAMPLINGS = ("sorted", "gap")


class AYF(FewStepModule):
    """Align Your Flow: a flow map f_theta(x_t, t, s) distilled with AYF-EMD and/or AYF-LMD; see the module docstring.

    Args:
        net: a `lit_fewstep.nets` network built with ``second_time=True`` (and ``guidance_embed=True`` when
            distilled with autoguidance). With `init_from_teacher` it must be the teacher's net plus those embeddings.
        teacher_ckpt: a lit_fewstep diffusion teacher (FlowMatching natively; EDM works through its x0).
        guide_ckpt: the weak network of autoguidance (None: no guidance, `guidance_range` must be (1, 1)).
        guidance_range: lambda ~ U[lo, hi] per sample (AYF: [1, 3]; 1 = no guidance).
        sampling_guidance: the lambda `sample` uses when none is given (default: the middle of `guidance_range`).
        objective: "emd" (the paper's main loss), "lmd" or "emd+lmd" (EMD + lmd_weight LMD).
        lmd_weight: the LMD term's weight in "emd+lmd".
        time_sampling: "sorted" (two logit-normal(P_mean, P_std) times scaled by t_max, t the larger) or "gap"
            (d = t_max sigmoid(N(P_mean, P_std)), s ~ U[0, t_max - d], t = s + d).
        diagonal_fraction: fraction of pairs set to s = t (flow matching on the diagonal).
        t_max: the largest time (sampling starts at t_max z). 1 for flow-matching teachers; for an EDM teacher
            sigma_max / (1 + sigma_max) (0.9877 for 80), where the teacher is still defined.
        t_eps: the smallest time a teacher is evaluated at (its velocity divides by t).
        tangent_norm, tangent_c: sCM's tangent normalization ("l2", "rms", "clip" or "none"; g / (||g|| + c)).
        warmup_steps: tangent warm-up r = min(1, k / warmup_steps) on the derivative terms (0: none).
        init_from_teacher: start the student (and its EMA) from a flow-matching teacher's weights; the s (and
            guidance) embeddings' last layers start at zero, so F(x, t, s) = v_teacher(x, t) at the start.
        lr, betas, weight_decay, ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`.
    """
    eager_networks = ("student",)  # differentiated by torch.func.jvp: never compiled (FewStepModule.compile_networks)

    generator_name = "student"
    default_nfe = 1  # the one-step jump t_max -> 0; any N works (N NFE)

    def __init__(self, net: nn.Module, teacher_ckpt: str, guide_ckpt: str | None = None,
                 guidance_range: tuple[float, float] = (1.0, 1.0), sampling_guidance: float | None = None,
                 objective: str = "emd", lmd_weight: float = 1.0, time_sampling: str = "sorted",
                 P_mean: float = -0.8, P_std: float = 1.6, diagonal_fraction: float = 0.1, t_max: float = 1.0,
                 t_eps: float = 1e-3, tangent_norm: str = "l2", tangent_c: float = 0.1, warmup_steps: int = 1000,
                 init_from_teacher: bool = True, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, ema_decay: float = 0.999, grad_clip: float = 0.0,
                 nonfinite: str = "stop", max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: choose one of {OBJECTIVES}, got {objective!r}.")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling: choose one of {TIME_SAMPLINGS}, got {time_sampling!r}.")
        if tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm: choose one of {TANGENT_NORMS}, got {tangent_norm!r}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}.")
        if not 0.0 <= diagonal_fraction <= 1.0:
            raise ValueError(f"diagonal_fraction: must be in [0, 1], got {diagonal_fraction}.")
        if not 0.0 < t_eps < t_max <= 1.0:
            raise ValueError(f"t_eps / t_max: need 0 < t_eps < t_max <= 1 on the linear path, got {t_eps}, {t_max}.")
        lo, hi = (float(v) for v in guidance_range)
        if not lo <= hi:
            raise ValueError(f"guidance_range: need lo <= hi, got {guidance_range!r}.")
        self.guided = guide_ckpt is not None
        if not self.guided and (lo, hi) != (1.0, 1.0):
            raise ValueError(f"guidance_range: {guidance_range!r} needs a weak network; set guide_ckpt or use [1, 1].")
        if self.guided and not getattr(net, "guidance_embed", False):
            raise ValueError("net: autoguided distillation feeds the student lambda; build the net with "
                             "guidance_embed=True.")
        self.student = PreconditionedNet(net, "flow_map")
        self.path = self.student.path
        self.teacher_ckpt, self.guide_ckpt = teacher_ckpt, guide_ckpt
        self.guidance_range = (lo, hi)
        self.sampling_guidance = 0.5 * (lo + hi) if sampling_guidance is None else float(sampling_guidance)
        self.objective, self.lmd_weight = objective, float(lmd_weight)
        self.time_sampling, self.P_mean, self.P_std = time_sampling, float(P_mean), float(P_std)
        self.diagonal_fraction, self.t_max, self.t_eps = float(diagonal_fraction), float(t_max), float(t_eps)
        self.tangent_norm, self.tangent_c, self.warmup_steps = tangent_norm, float(tangent_c), int(warmup_steps)
        self.init_from_teacher = init_from_teacher
        self._initialized = False
        self.register_frozen("teacher", path=teacher_ckpt)
        if self.guided:
            self.register_frozen("guide", path=guide_ckpt)
        if init_from_teacher:  # the new embeddings start silent: F(x, t, s, lambda) = v_teacher(x, t)
            for name in ("s", "guidance"):
                emb = getattr(getattr(net, "cond", None), name, None)
                if emb is not None:
                    nn.init.zeros_(emb.fc2.weight)
                    nn.init.zeros_(emb.fc2.bias)
        self.phases = [Phase("flow_map", "flow_map_loss", ("student",), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, updates_ema=True)]
        self.init_ema()

    # -------------------------------------------------------------- frozen networks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            teacher = self._frozen_velocity_model("teacher")
            if self.guided:
                self._frozen_velocity_model("guide")
            if self.init_from_teacher and int(self.iteration) == 0 and not self._initialized:
                self._init_from(teacher)

    def _frozen_velocity_model(self, name: str) -> nn.Module:
        model = self.frozen_network(name)
        if not hasattr(model, "x0_from") or getattr(model, "two_time", False):
            raise ValueError(f"{name}_ckpt: {getattr(self, name + '_ckpt')!r} holds no one-time diffusion model; give "
                             "a FlowMatching or EDMDiffusion checkpoint.")
        if getattr(model, "num_classes", 0) != self.student.num_classes:
            raise ValueError(f"{name}_ckpt: it has num_classes={getattr(model, 'num_classes', 0)}, the student net "
                             f"{self.student.num_classes}; set net.num_classes to match.")
        return model

    def _init_from(self, teacher: nn.Module) -> None:
        """A flow-matching teacher's raw weights into the student; only the new embeddings may be missing."""
        if getattr(teacher, "preconditioning", None) != "velocity":
            raise ValueError("init_from_teacher: the flow map feeds its net (x_t, t, s) unscaled, as a flow-matching "
                             f"teacher does; a {getattr(teacher, 'preconditioning', type(teacher).__name__)!r} "
                             "teacher's weights do not fit. Set init_from_teacher: false.")
        result = self.student.net.load_state_dict(teacher.net.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("cond.s.", "cond.guidance."))]
        if missing or result.unexpected_keys:
            raise ValueError("init_from_teacher: the student net differs from the teacher's beyond the s / guidance "
                             f"embeddings (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); copy the "
                             "teacher's net config and add second_time: true.")
        self.restart_emas()
        self._initialized = True

    def _labels(self, net: nn.Module, y: Tensor | None) -> Tensor | None:
        return y if getattr(net, "num_classes", 0) > 0 else None

    # -------------------------------------------------------------- pieces
    def teacher_velocity(self, x_t: Tensor, t: Tensor, y: Tensor | None, lam: Tensor | None = None) -> Tensor:
        """v = lambda v_good + (1 - lambda) v_weak at (x_t, t) on the linear path (the teacher alone when unguided
        or where lambda = 1)."""
        teacher = self._frozen_velocity_model("teacher")
        labels = self._labels(teacher, y)
        if self.guided and lam is not None:
            guide = self._frozen_velocity_model("guide")
            x0 = autoguided_x0(teacher, guide, x_t, t, scale=lam, class_labels=labels, path=self.path)
        else:
            x0 = teacher.x0_from(x_t, t, self.path, class_labels=labels)
        return convert_prediction(x0, "x0", "velocity", x_t, t, self.path)

    def F(self, net: nn.Module, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None, lam: Tensor | None) -> Tensor:
        """The average velocity F(x_t, t, s[, lambda]) of `net` (a flow-map PreconditionedNet)."""
        cond = {"guidance": lam} if self.guided else {}
        return net(x_t, t, class_labels=self._labels(net, y), s=s, **cond)

    def tangent_warmup(self, k: int) -> float:
        # sCM's warm-up r(k) = min(1, k / warmup_steps), the same function (reads self.warmup_steps)
        return SCM.tangent_warmup(self, k)

    def sample_times(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t, s) with 0 <= s <= t <= t_max, t >= t_eps, a `diagonal_fraction` of the pairs on s = t."""
        B = like.shape[0]
        if self.time_sampling == "sorted":
            u = self.t_max * torch.sigmoid(self.P_mean + self.P_std * self.randn((2, B), like))
            t, s = u.max(0).values, u.min(0).values
        else:
            d = self.t_max * torch.sigmoid(self.P_mean + self.P_std * self.randn((B,), like))
            s = (self.t_max - d) * self.rand((B,), like)
            t = s + d
        t = t.clamp(self.t_eps, self.t_max)
        s = torch.minimum(s, t)
        diagonal = self.rand((B,), like) < self.diagonal_fraction
        return t, torch.where(diagonal, t, s)

    def sample_guidance(self, like: Tensor) -> Tensor | None:
        """lambda ~ U[lo, hi] per sample (None when unguided)."""
        if not self.guided:
            return None
        lo, hi = self.guidance_range
        return lo + (hi - lo) * self.rand((like.shape[0],), like)

    def emd_tangent(self, x_t: Tensor, t: Tensor, s: Tensor, v: Tensor, y: Tensor | None, lam: Tensor | None,
                    r: float = 1.0, net: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(F-, g) of AYF-EMD, unnormalized: g = (F- - v) + r (t - s) dF-/dt, dF/dt by a JVP with tangents
        (v, 1, 0) in (x_t, t, s). No gradient."""
        net = self.student if net is None else net
        with torch.no_grad():
            F_minus, dF_dt = float32_jvp(lambda x_, t_, s_: self.F(net, x_, t_, s_, y, lam), (x_t, t, s),
                                         (v, torch.ones_like(t), torch.zeros_like(s)))
        return F_minus, (F_minus - v) + r * _bcast(t - s, x_t) * dF_dt

    def lmd_tangent(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None, lam: Tensor | None, r: float = 1.0,
                    net: nn.Module | None = None, velocity=None) -> tuple[Tensor, Tensor]:
        """(F-, g) of AYF-LMD, unnormalized: g = d f-/ds - v_phi(f-, s) = F- + r (s - t) d_s F- - v_phi(f-, s)
        (a JVP in s; `velocity(x, s)` defaults to the teacher's, evaluated at s >= t_eps). No gradient."""
        net = self.student if net is None else net
        with torch.no_grad():
            F_minus, dF_ds = float32_jvp(lambda s_: self.F(net, x_t, t, s_, y, lam), (s,), (torch.ones_like(s),))
            f_minus = net.precond.jump(F_minus, x_t, t, s)
            s_eval = s.clamp_min(self.t_eps)
            v_f = (velocity(f_minus, s_eval) if velocity is not None
                   else self.teacher_velocity(f_minus, s_eval, y, lam))
        return F_minus, F_minus + r * _bcast(s - t, x_t) * dF_ds - v_f

    def regression(self, F_theta: Tensor, F_minus: Tensor, g: Tensor) -> Tensor:
        """Per-sample ||F_theta - sg(F_theta- - g)||^2 / D after tangent normalization (gradient 2 g dF/dtheta / D)."""
        g = normalize_tangent(g, self.tangent_norm, self.tangent_c)
        return (F_theta - F_minus + g).flatten(1).pow(2).mean(1)

    # -------------------------------------------------------------- loss
    def flow_map_loss(self, batch) -> Tensor:
        """AYF-EMD and/or AYF-LMD (Sabour et al. 2025, Sec. 3) as stop-gradient regressions of F_theta."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        t, s = self.sample_times(x)
        lam = self.sample_guidance(x)
        x_t = self.path.noise(x, self.randn(x.shape, x), t)
        r = self.tangent_warmup(int(self.iteration))
        loss = x.new_zeros(())
        with same_dropout_masks() as replay:  # the JVP passes and the gradient pass see the same dropout masks
            if self.objective in ("emd", "emd+lmd"):
                with torch.no_grad():
                    v = self.teacher_velocity(x_t, t, y, lam)
                F_minus, g = self.emd_tangent(x_t, t, s, v, y, lam, r)
                replay()
                F_theta = self.F(self.student, x_t, t, s, y, lam)
                emd = self.regression(F_theta, F_minus, g).mean()
                loss = loss + emd
                self._log("emd", emd.detach())
            if self.objective in ("lmd", "emd+lmd"):
                replay()
                F_minus, g = self.lmd_tangent(x_t, t, s, y, lam, r)
                if self.objective == "lmd":
                    replay()
                    F_theta = self.F(self.student, x_t, t, s, y, lam)
                lmd = self.regression(F_theta, F_minus, g).mean()
                loss = loss + (self.lmd_weight if self.objective == "emd+lmd" else 1.0) * lmd
                self._log("lmd", lmd.detach())
        self._log("tangent_warmup", torch.as_tensor(r))
        return loss

    def _log(self, name: str, value: Tensor) -> None:
        if self._trainer is not None:
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)

    # -------------------------------------------------------------- sampling
    def sampling_grid(self, nfe: int) -> Tensor:
        """nfe + 1 uniform times from t_max to 0."""
        return uniform_times(nfe, t_max=self.t_max, t_min=0.0)

    def _sample(self, noise, class_labels, nfe, net, guidance_scale=None):
        lam = None
        if self.guided:
            scale = self.sampling_guidance if guidance_scale is None else guidance_scale
            lam = torch.as_tensor(scale, dtype=noise.dtype, device=noise.device).expand(noise.shape[0])
        elif guidance_scale is not None and not bool((torch.as_tensor(guidance_scale) == 1.0).all()):
            raise ValueError("guidance_scale: this flow map was distilled without autoguidance (no guide_ckpt); "
                             "use 1 or drop it.")
        counter = NFECounter()
        state = run_steps(lambda x, t, s: net.precond.jump(self.F(net, x, _bcast_t(t, x), s, class_labels, lam), x,
                                                           _bcast_t(t, x), s),
                          self.t_max * noise, self.sampling_grid(nfe).to(noise.dtype), TwoTimeJump(self.path),
                          counter=counter)
        return state.x, counter.count


def _bcast_t(t, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
