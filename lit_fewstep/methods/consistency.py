"""Consistency models on the EDM path: CD and CT (Song, Dhariwal, Chen & Sutskever 2023) and iCT (Song & Dhariwal 2023).

The consistency function (`PreconditionedNet(..., "consistency")`, diffusion/precond.py) is

    f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, ln(sigma) / 4),   f_theta(x, eps) = x,

and training compares it at adjacent points of a Karras grid eps = sigma_1 < ... < sigma_N = T:

    L = lambda(sigma_n, sigma_{n+1}) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x̂_n, sigma_n)),  x_{n+1} = x + sigma_{n+1} z.

The three methods differ only in the pieces below; each piece is one method of `ConsistencyModel`:

=================  ===========================  ===========================  ======================================
piece              CD                           CT                           iCT (what it changes in CT)
=================  ===========================  ===========================  ======================================
x̂_n (`previous`)   one teacher Heun/Euler step  x + sigma_n z, same z        same as CT
N (`scales`)       fixed                        N(k), square-root curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1
theta- (`target`)  EMA, fixed mu (0 = stopgrad) EMA, mu(k)                   no EMA: theta- = stopgrad(theta)
d (`distance`)     l2 / l1 / lpips              l2 / l1 / lpips              pseudo-Huber, c = 0.00054 sqrt(dim)
lambda (`weight`)  1                            1                            1 / (sigma_{n+1} - sigma_n)
n (`draw_index`)   uniform                      uniform                      discrete lognormal (P_mean -1.1, P_std 2)
=================  ===========================  ===========================  ======================================

The target network theta- is its own frozen submodule (`self.target`, saved in checkpoints), updated after
every optimizer step with rate mu(k); the sampling EMA (`self.ema`, FewStepModule) is a separate role.
Reductions: l1 / l2 average over the elements of a sample (openai's `mean_flat`), pseudo-Huber uses the
per-sample Euclidean norm; the batch mean follows.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion.precond import PreconditionedNet
from ..diffusion.solvers import (NFECounter, consistency_sigmas, discrete_lognormal_probs, euler_step, gaussian_noise,
                                 heun_step, karras_sigmas, multistep_consistency_sample)
from ..metrics.lpips import LPIPS
from .base import FewStepModule, Phase

__all__ = [
    "FixedScales", "SqrtScales", "ExponentialScales", "TargetRate", "DISTANCES", "consistency_distance",
    "digits_features", "PerceptualDistance", "pseudo_huber_c", "LPIPS", "ConsistencyModel", "CD", "CT", "ICT",
]


# ----------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class FixedScales:
    """N(k) = N: a fixed discretization (CD: 18 on CIFAR-10, 40 on ImageNet-64)."""

    N: int

    def __call__(self, k: int) -> int:
        return self.N


@dataclass(frozen=True)
class SqrtScales:
    """CT's curriculum (Song et al. 2023, Appendix C): N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1.

    k is clamped to K (the official code keeps growing past K; we hold N at s1 + 1).
    """

    s0: int
    s1: int
    K: int

    def __call__(self, k: int) -> int:
        k = min(k, self.K)
        return max(2, math.ceil(math.sqrt(k / self.K * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1) + 1)


@dataclass(frozen=True)
class ExponentialScales:
    """iCT's curriculum (Song & Dhariwal 2023, Sec. 3.4): N(k) = min(s0 2^floor(k/K'), s1) + 1,
    K' = floor(K / (log2 floor(s1/s0) + 1)): N doubles every K' iterations, from s0 + 1 up to s1 + 1."""

    s0: int
    s1: int
    K: int

    @property
    def K_prime(self) -> int:
        return max(1, math.floor(self.K / (math.log2(math.floor(self.s1 / self.s0)) + 1)))

    def __call__(self, k: int) -> int:
        return min(self.s0 * 2 ** (k // self.K_prime), self.s1) + 1


@dataclass(frozen=True)
class TargetRate:
    """Rate mu(k) of the target update theta- <- mu theta- + (1 - mu) theta.

    kind ``"fixed"``: mu(k) = mu; mu = 0 means theta- = stopgrad(theta) (no copy is kept).
    kind ``"adaptive"``: CT's mu(k) = exp(s0 ln(mu0) / N(k)) as printed (formula ``"paper"``), or
    exp(s0 ln(mu0) / (N(k) - 1)) as both official repositories compute it (formula ``"code"``, default):
    at N = 2 (k = 0 on CIFAR-10) 0.81 in code vs 0.90 in the paper.
    """

    kind: str = "fixed"
    mu: float = 0.0
    mu0: float = 0.9
    s0: int = 2
    formula: str = "code"

    def __post_init__(self):
        if self.kind not in ("fixed", "adaptive"):
            raise ValueError(f"target: kind must be 'fixed' or 'adaptive', got {self.kind!r}.")
        if self.formula not in ("code", "paper"):
            raise ValueError(f"mu_formula: must be 'code' or 'paper', got {self.formula!r}.")
        if not 0.0 <= self.mu < 1.0 or not 0.0 < self.mu0 < 1.0:
            raise ValueError(f"target_mu / mu0: need 0 <= mu < 1 and 0 < mu0 < 1, got {self.mu}, {self.mu0}.")

    @property
    def stopgrad(self) -> bool:
        return self.kind == "fixed" and self.mu == 0.0

    def __call__(self, k: int, N: int) -> float:
        if self.kind == "fixed":
            return self.mu
        return math.exp(self.s0 * math.log(self.mu0) / ((N - 1) if self.formula == "code" else N))


# ----------------------------------------------------------------------------------------------- distances
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips", "features")


def pseudo_huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(d) (Song & Dhariwal 2023, Sec. 3.3): 0.0299 on CIFAR-10, 0.0043 on 8x8 digits."""
    return 0.00054 * math.sqrt(dim)


FEATURE_SHAPES = ((1, 8, 8), (1, 16, 16))  # the sample shapes the shipped digits classifier reads


def digits_features() -> nn.Module:
    """The shipped digits classifier, frozen (gradients flow to its input): the perceptual distance "features" of
    8x8 digits, standing in for the papers' LPIPS, which has no meaning at that size."""
    from ..metrics.features import load_digits_classifier
    return load_digits_classifier()[0].requires_grad_(False).eval()


def consistency_distance(a: Tensor, b: Tensor, kind: str, c: float = 0.0, lpips: nn.Module | None = None,
                         features: nn.Module | None = None) -> Tensor:
    """d(a, b) per sample [B]: l2 / l1 = mean over elements; pseudo_huber = sqrt(||a - b||^2 + c^2) - c;
    lpips = LPIPS(a, b); features = mean squared difference of `features.features` (`digits_features`)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo_huber":
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c
    if kind == "lpips":
        return lpips(a, b)
    if kind == "features":
        if tuple(a.shape[1:]) not in FEATURE_SHAPES:
            raise ValueError(f"distance: 'features' is the shipped digits classifier's (1 x 8 x 8 or 1 x 16 x 16); it "
                             f"cannot compare samples of shape {tuple(a.shape[1:])}. Choose l2, pseudo_huber or lpips.")
        return (features.features(a) - features.features(b)).pow(2).mean(1)
    raise ValueError(f"distance: unknown {kind!r}; choose one of {DISTANCES}.")


class PerceptualDistance:
    """Mixin of the modules whose distance may be perceptual: "lpips" (a local LPIPS-VGG file) or "features" (the
    shipped digits classifier). Both frozen networks are built at first use on the module's device and never saved.
    The module sets `distance`, `huber_c` and `lpips_weights`, then calls `init_distance_networks()`."""

    def init_distance_networks(self) -> None:
        self.lpips, self.feature_net = None, None
        self.unsaved_prefixes = tuple(self.unsaved_prefixes) + ("lpips.", "feature_net.")

    def _lpips(self) -> LPIPS | None:
        if self.distance == "lpips" and self.lpips is None:
            self.lpips = LPIPS(self.lpips_weights).to(self.device)
        return self.lpips

    def _features(self) -> nn.Module:
        """The shipped digits classifier (frozen; gradients flow to its input)."""
        if self.feature_net is None:
            self.feature_net = digits_features().to(self.device)
        return self.feature_net

    def distance_between(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a, b) per sample [B] for the module's `distance` (`consistency_distance`)."""
        features = self._features() if self.distance == "features" else None
        return consistency_distance(a, b, self.distance, self.huber_c, self._lpips(), features)


# ----------------------------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def same_dropout_masks():
    """Yields `replay()`: restores the RNG state at entry, so two forward passes draw the same dropout masks
    (the CM code's trick for the online and target passes; sCM's for the JVP and gradient passes)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def replay():
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    yield replay


class ConsistencyFamily(FewStepModule):
    """What every consistency method shares: a student slot, an optional frozen teacher loaded lazily from
    `teacher_ckpt` (at `setup`, so configs parse before teachers exist and exported students load without
    them), and multistep sampling (Algorithm 1 of Song et al. 2023) with exactly `nfe` evaluations.

    Subclasses set `self.student` (a PreconditionedNet whose `x0` is the consistency function), `self.path`,
    `self.sigma_min`, `self.sigma_max` and `self.t_min` (the boundary time in path units).
    """

    generator_name = "student"
    default_nfe = 1  # a consistency model is a one-step generator first; multistep sampling is the option
    teacher_ckpt: str | None = None
    init_from_teacher: bool = False
    _initialized: bool = False

    # -------------------------------------------------------------- teacher
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.prepare_teacher(initialize=True)

    def prepare_teacher(self, initialize: bool = False) -> None:
        """Load the frozen teacher (and, on a fresh run with `init_from_teacher`, copy its raw network
        weights into the student, the target and the sampling EMA)."""
        if self.teacher_ckpt is None:
            return
        if self._modules.get("teacher") is None:
            teacher = self.frozen_network("teacher")  # the registry loads it (safe loading, frozen, never saved)
            if not isinstance(teacher, PreconditionedNet):
                raise ValueError(f"teacher_ckpt: {self.teacher_ckpt!r} holds a {type(teacher).__name__}, not a "
                                 "diffusion teacher; give an EDMDiffusion or FlowMatching checkpoint.")
            if teacher.num_classes != self.student.num_classes:
                raise ValueError(f"teacher_ckpt: teacher has num_classes={teacher.num_classes} but the student "
                                 f"net has num_classes={self.student.num_classes}; set net.num_classes to match.")
        if initialize and self.init_from_teacher and int(self.iteration) == 0 and not self._initialized:
            if self.teacher.preconditioning != "edm":
                raise ValueError(f"init_from_teacher: the student's c_in / c_noise are EDM's; a "
                                 f"{self.teacher.preconditioning!r} teacher's weights do not fit. Set "
                                 "init_from_teacher: false.")
            try:
                self.student.net.load_state_dict(self.teacher.net.state_dict())
            except RuntimeError as err:
                raise ValueError("init_from_teacher: the student net's architecture differs from the teacher's "
                                 f"({str(err).splitlines()[0][:100]}); copy the teacher's net config or set "
                                 "init_from_teacher: false.") from err
            if getattr(self, "target", None) is not None:
                self.target.load_state_dict(self.student.state_dict())
            self.restart_emas()
            self._initialized = True

    def _teacher(self) -> PreconditionedNet:
        if self._modules.get("teacher") is None:
            self.prepare_teacher()
        return self.teacher

    def _labels(self, net: nn.Module, y: Tensor | None) -> Tensor | None:
        return y if getattr(net, "num_classes", 0) > 0 else None

    # -------------------------------------------------------------- sampling
    def sample(self, n, nfe, class_labels=None, generator=None, use_ema=True, **options):
        """`FewStepModule.sample`; multistep sampling draws its fresh noise from the same `generator`.

        Options: ``sigmas``: the nfe - 1 intermediate EDM noise levels (default: `consistency_sigmas`,
        the Karras grid with nfe + 1 points; the CLI's ``--sigmas``; benchmarks/consistency_sigmas.py searches them).
        """
        return super().sample(n, nfe, class_labels=class_labels, generator=generator, use_ema=use_ema,
                              _generator=generator, **options)

    def _sample(self, noise, class_labels, nfe, net, _generator=None, sigmas=None, **unused):
        if unused:
            raise ValueError(f"sample: {type(self).__name__} takes no option(s) {sorted(unused)}; consistency models "
                             "take only sigmas=[...] (the nfe - 1 intermediate noise levels); guidance is not supported.")
        counter = NFECounter()
        labels = self._labels(net, class_labels)
        f = counter.counted(lambda x_t, t: net.x0(x_t, t, class_labels=labels))
        times = self.path.t_from_sigma(consistency_sigmas(nfe, self.sigma_min, self.sigma_max, sigmas=sigmas))

        draw = gaussian_noise(_generator)
        x = multistep_consistency_sample(f, noise, times, self.path, lambda: draw(noise), t_min=self.t_min)
        return x, counter.count


# ----------------------------------------------------------------------------------------------- CD / CT / iCT
class ConsistencyModel(PerceptualDistance, ConsistencyFamily):
    """Discrete-time consistency model on the EDM path (shared by CD, CT, iCT; not used directly).

    Args:
        net: a `lit_fewstep.nets` network F_theta.
        sigma_data, sigma_min (= eps), sigma_max (= T), rho: path and Karras grid.
        distance: "l2", "l1", "pseudo_huber", "lpips" (the CM paper's best) or "features" (the shipped digits
            classifier's features, digits only: LPIPS's stand-in there).
        huber_c: pseudo-Huber c (default 0.00054 sqrt(dim)).
        lpips_weights: local LPIPS-VGG state dict (distance "lpips").
        lr, betas, weight_decay, ema_decay (sampling EMA), grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, distance: str = "l2", huber_c: float | None = None,
                 lpips_weights: str | None = None, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, ema_decay: float = 0.9999, grad_clip: float = 0.0,
                 nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if distance not in DISTANCES:
            raise ValueError(f"distance: unknown {distance!r}; choose one of {DISTANCES}.")
        if distance == "lpips" and lpips_weights is None:
            raise ValueError("lpips_weights: distance 'lpips' needs a local LPIPS-VGG weights file; give "
                             "lpips_weights: PATH or choose distance l2 / l1 / pseudo_huber.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min / sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self.student = PreconditionedNet(net, "consistency", sigma_data, sigma_min)
        self.path = self.student.path
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.t_min = sigma_min
        self.distance = distance
        self.huber_c = pseudo_huber_c(math.prod(self.data_shape)) if huber_c is None else huber_c
        self.lpips_weights = lpips_weights
        self.init_distance_networks()  # LPIPS built at setup (or first use), never saved
        self._initialized = False
        self.phases = [Phase("consistency", "consistency_loss", ("student",), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, updates_ema=True)]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.distance == "lpips":
            self._lpips()

    def _finish_init(self) -> None:
        """Subclasses call this once `scales` and `target_rate` are set: target copy and sampling EMA."""
        self.target = None if self.target_rate.stopgrad else copy.deepcopy(self.student).requires_grad_(False)
        self.init_ema()

    # -------------------------------------------------------------- the pieces that differ (see module table)
    def grid(self, N: int) -> Tensor:
        """Karras grid sigma_1 = eps < ... < sigma_N = T (increasing, float64)."""
        return karras_sigmas(N, self.sigma_min, self.sigma_max, self.rho, append_zero=False).flip(0)

    def draw_index(self, u: Tensor, sigmas: Tensor) -> Tensor:
        """n ~ U{0, ..., N - 2} (0-based: pairs (sigma_n, sigma_{n+1})), from uniforms u [B] in [0, 1)."""
        return (u * (sigmas.numel() - 1)).long().clamp_max(sigmas.numel() - 2)

    def weight(self, sigma_n: Tensor, sigma_next: Tensor) -> Tensor:
        """lambda = 1 (all released CM commands use the uniform weight schedule)."""
        return torch.ones_like(sigma_n)

    def previous(self, x: Tensor, z: Tensor, x_next: Tensor, sigma_next: Tensor, sigma_n: Tensor,
                 y: Tensor | None) -> Tensor:
        """x̂_n, the point at sigma_n paired with x_{n+1}."""
        raise NotImplementedError

    def target_network(self) -> nn.Module:
        """theta-: the target copy, or the student itself under stop-gradient."""
        return self.student if self.target is None else self.target

    # -------------------------------------------------------------- loss
    def consistency_loss(self, batch) -> Tensor:
        """Eq. (7) (CD) / Eq. (10) (CT) of Song et al. 2023:
        E[lambda(sigma_n) d(f_theta(x + sigma_{n+1} z, sigma_{n+1}), f_theta-(x̂_n, sigma_n))]."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        k = int(self.iteration)
        sigmas = self.grid(self.scales(k)).to(device=x.device)
        # noise from FewStepModule.rand/randn: seeded per iteration and sliced per DDP rank (exact resume)
        n = self.draw_index(self.rand((x.shape[0],), x), sigmas).to(x.device)
        sigma_n, sigma_next = sigmas[n].to(x.dtype), sigmas[n + 1].to(x.dtype)
        z = self.randn(x.shape, x)
        x_next = self.path.noise(x, z, sigma_next)
        y_s = self._labels(self.student, y)
        with torch.no_grad():
            x_prev = self.previous(x, z, x_next, sigma_next, sigma_n, y)
        with same_dropout_masks() as replay:
            f_online = self.student.x0(x_next, sigma_next, class_labels=y_s)
            replay()
            with torch.no_grad():
                f_target = self.target_network().x0(x_prev, sigma_n, class_labels=y_s)
        d = self.distance_between(f_online, f_target)
        return (self.weight(sigma_n, sigma_next) * d).mean()

    # -------------------------------------------------------------- target update and logging
    def training_step(self, batch, batch_idx):
        k = int(self.iteration)
        super().training_step(batch, batch_idx)
        N, mu = self.scales(k), self.target_rate(k, self.scales(k))
        self.update_target(mu)
        self.log("train/num_scales", float(N), on_step=True, on_epoch=False)
        self.log("train/target_mu", float(mu), on_step=True, on_epoch=False)

    @torch.no_grad()
    def update_target(self, mu: float) -> None:
        """theta- <- mu theta- + (1 - mu) theta (Algorithm 2/3 of Song et al. 2023); no-op under stop-gradient."""
        if self.target is None:
            return
        for p_target, p in zip(self.target.parameters(), self.student.parameters()):
            p_target.lerp_(p.detach(), 1.0 - mu)
        for b_target, b in zip(self.target.buffers(), self.student.buffers()):
            b_target.copy_(b)


class CD(ConsistencyModel):
    """Consistency distillation (Song et al. 2023, Algorithm 2).

    x̂_n is one PF-ODE step of the frozen teacher from sigma_{n+1} to sigma_n (Heun, as in the paper, or
    Euler) through `diffusion.solvers`; any lit_fewstep teacher (EDM or flow matching) serves, converted
    to the EDM path by `PreconditionedNet.x0_from`.

    Args:
        teacher_ckpt: checkpoint of an EDMDiffusion / FlowMatching module (its EMA network is used).
        num_scales: N (18 on CIFAR-10, 40 on ImageNet-64).
        target_mu: fixed target rate mu (0 = stop-gradient, the official CIFAR-10 setting; 0.95 ImageNet-64).
        solver: "heun" (2 teacher NFE per step) or "euler" (1).
        init_from_teacher: start the student from the teacher's raw network weights (official setting).
        (other arguments: `ConsistencyModel`)
    """

    def __init__(self, net: nn.Module, teacher_ckpt: str, num_scales: int = 18, target_mu: float = 0.0,
                 solver: str = "heun", init_from_teacher: bool = True, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, distance: str = "l2",
                 huber_c: float | None = None, lpips_weights: str | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.9999,
                 grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(net, sigma_data, sigma_min, sigma_max, rho, distance, huber_c, lpips_weights, lr, betas,
                         weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips)
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver: choose 'heun' or 'euler', got {solver!r}.")
        if num_scales < 2:
            raise ValueError(f"num_scales: need N >= 2 grid points, got {num_scales}.")
        self.teacher_ckpt, self.solver, self.init_from_teacher = teacher_ckpt, solver, init_from_teacher
        self.register_frozen("teacher", path=teacher_ckpt)
        self.scales = FixedScales(num_scales)
        self.target_rate = TargetRate("fixed", mu=target_mu)
        self._finish_init()

    def previous(self, x, z, x_next, sigma_next, sigma_n, y):
        """One teacher ODE step sigma_{n+1} -> sigma_n (Eq. (6)/Algorithm 2 of Song et al. 2023)."""
        teacher = self._teacher()
        y_t = self._labels(teacher, y)
        step = heun_step if self.solver == "heun" else euler_step
        return step(lambda x_t, t: teacher.x0_from(x_t, t, self.path, class_labels=y_t), x_next, sigma_next,
                    sigma_n, self.path)


class CT(ConsistencyModel):
    """Consistency training (Song et al. 2023, Algorithm 3): x̂_n = x + sigma_n z with the same z.

    Args:
        s0, s1, total_steps (= K): the curriculum N(k) (`SqrtScales`); CIFAR-10 2, 150, 800k.
        mu0, mu_formula: the target rate mu(k) (`TargetRate`, "code" default, or "paper").
        teacher_ckpt: optional EDM checkpoint whose raw weights initialize the student (the official
            ImageNet/LSUN CT runs do this; the teacher never enters the loss). CIFAR-10 CT starts random.
        (other arguments: `ConsistencyModel`)
    """

    def __init__(self, net: nn.Module, s0: int = 2, s1: int = 150, total_steps: int = 800_000, mu0: float = 0.9,
                 mu_formula: str = "code", teacher_ckpt: str | None = None, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, distance: str = "l2",
                 huber_c: float | None = None, lpips_weights: str | None = None, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.9999,
                 grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(net, sigma_data, sigma_min, sigma_max, rho, distance, huber_c, lpips_weights, lr, betas,
                         weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips)
        if not 1 <= s0 <= s1 or total_steps < 1:
            raise ValueError(f"s0 / s1 / total_steps: need 1 <= s0 <= s1 and total_steps >= 1, got {s0}, {s1}, "
                             f"{total_steps}.")
        self.teacher_ckpt, self.init_from_teacher = teacher_ckpt, teacher_ckpt is not None
        self.teacher = None
        self.scales = self._scales(s0, s1, total_steps)
        self.target_rate = self._target_rate(mu0, s0, mu_formula)
        self._finish_init()

    def _scales(self, s0, s1, K):
        return SqrtScales(s0, s1, K)

    def _target_rate(self, mu0, s0, formula):
        return TargetRate("adaptive", mu0=mu0, s0=s0, formula=formula)

    def previous(self, x, z, x_next, sigma_next, sigma_n, y):
        """x̂_n = x + sigma_n z: the data point itself as the 'solver' (Eq. (10) of Song et al. 2023)."""
        return self.path.noise(x, z, sigma_n)


class ICT(CT):
    """Improved consistency training (Song & Dhariwal 2023). Each override below is one change to CT.

    Args:
        s0, s1, total_steps: exponential curriculum (10, 1280, K); P_mean, P_std: discrete lognormal draws.
        distance: "pseudo_huber" (default) with huber_c = 0.00054 sqrt(dim) unless given.
        (other arguments: `CT`; there is no mu: the target is stopgrad(theta))
    """

    def __init__(self, net: nn.Module, s0: int = 10, s1: int = 1280, total_steps: int = 400_000,
                 P_mean: float = -1.1, P_std: float = 2.0, teacher_ckpt: str | None = None,
                 sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 distance: str = "pseudo_huber", huber_c: float | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.9999,
                 grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(net, s0, s1, total_steps, 0.9, "code", teacher_ckpt, sigma_data, sigma_min, sigma_max, rho,
                         distance, huber_c, None, lr, betas, weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips)
        self.P_mean, self.P_std = P_mean, P_std

    # (1) exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1
    def _scales(self, s0, s1, K):
        return ExponentialScales(s0, s1, K)

    # (2) no EMA target: theta- = stopgrad(theta)
    def _target_rate(self, mu0, s0, formula):
        return TargetRate("fixed", mu=0.0)

    # (3) lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)
    def weight(self, sigma_n, sigma_next):
        return 1.0 / (sigma_next - sigma_n)

    # (4) n drawn from the discrete lognormal p(n) ∝ erf(ln sigma_{n+1}) - erf(ln sigma_n) (solvers.py)
    def draw_index(self, u, sigmas):
        cdf = discrete_lognormal_probs(sigmas, self.P_mean, self.P_std).cumsum(0).to(u.device)
        return torch.searchsorted(cdf, u.double().contiguous(), right=True).clamp_max(sigmas.numel() - 2)

    # (5) pseudo-Huber distance: the default `distance` argument above.
