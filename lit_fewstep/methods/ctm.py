"""Consistency Trajectory Models (Kim et al. 2024, ICLR), distilled from an EDM teacher. Notes: docs/ctm.md.

One network g_theta(x_t, t, s) (`PreconditionedNet(net, "ctm")`, a net built with ``second_time=True``) gives the
trajectory map

    G_theta(x_t, t, s) = (s / t) x_t + (1 - s / t) g_theta(x_t, t, s),   G(x, t, t) = x,

from any time t to any s <= t along the teacher's probability-flow ODE, and g_theta(x_t, t, t) is a denoiser.
Training (one generator loss, `generator_loss`):

    L = L_CTM + w_DSM L_DSM + w_GAN lambda_GAN L_GAN

- L_CTM, soft consistency matching, as the authors' code (sony/ctm, `KarrasDenoiser.ctm_losses`) computes it:
  draw the number n of teacher Heun steps (P(n) proportional to n on 1..K), then the grid index i of t (index 0
  is sigma_max), u = sigma_{i+n}, and only then s uniformly among the grid levels from u down to sigma_min. So
  s <= u < t (s = u and s = sigma_min both possible; the paper writes t > u > s drawn otherwise).
      estimate = G_target(G_theta(x_t, t, s), s, sigma_min)     (target's parameters frozen, gradient through
                                                                  its input)
      target   = G_target(G_sg(Heun_teacher^n(x_t; t -> u), u, s), s, sigma_min)   (no gradient)
  The inner jump of the target uses the online network under no_grad (official default; `inner_target="target"`
  uses the EMA target). "Time 0" is sigma_min, not 0 (official code). The target network is an EMA of the
  student with a fixed rate (`target_mu`, 0.999 officially), kept in train mode as the official code does.
- L_DSM: EDM's denoising loss on g_theta(x, sigma, sigma), lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
  sigma half lognormal(-1.2, 1.2), half Karras-uniform over the first `dsm_large_fraction` (0.7) of the grid
  (large sigma), as the official "halflognormal" draw. Its weight w_DSM is adaptive (official, on by default):
  ||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4), detached, clamped to [0, 1e4], W the network's last layer.
- L_GAN (after `gan_start` iterations): -D(fake) for the generator, hinge loss for the discriminator; fake is the
  estimate above (the student's sample carried to sigma_min), real the data batch. w_GAN is the paper's adaptive
  weight ||grad_W L_CTM|| / (||grad_W L_GAN|| + 1e-4) clamped to [0.01, 10]. The discriminator is a trainable
  `DiscriminatorHead` on the data itself (``"raw"``: a 2-layer MLP on 2-D points, a small conv net on images) or
  on frozen features of the shipped digits classifier (``"digits_features"``); the official one is StyleGAN-XL's
  projected discriminator on frozen DeiT / EfficientNet features (not available offline).

Sampling (`_sample`): gamma-sampling on the Karras grid with nfe + 1 points from sigma_max to sigma_min,
`diffusion.solvers.TwoTimeJump` (gamma = 0 deterministic long jumps, gamma = 1 the consistency-model multistep
sampler), exactly nfe evaluations; or ``solver="heun"``: the same network as a diffusion model, EDM's Heun sampler
on the denoiser g(x, t, t).

Departures from the official code, each a constructor argument: distances l2 / pseudo-Huber / digits-classifier
features besides LPIPS (the official code has LPIPS and a CNN/ViT feature distance only); the s-embedding's last
layer starts at zero (`zero_s_embedding`, so the student starts as the teacher's denoiser for every s; the
official s-layers start random); with the GAN on, the discriminator steps every `discriminator_every` iterations
after the generator in the same iteration (the official code alternates: even iterations G, odd D).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.precond import PreconditionedNet
from ..diffusion.solvers import (NFECounter, TwoTimeJump, gaussian_noise, heun_step, karras_sigmas, run_steps,
                                 sample_edm_heun)
from ..nets.heads import DiscriminatorHead
from .base import FewStepModule, Phase
from .consistency import PerceptualDistance, pseudo_huber_c, same_dropout_masks
from .dmd import frozen

__all__ = ["CTM", "CTM_DISTANCES", "DISCRIMINATORS", "adaptive_weight", "balance_weight", "heun_step_probs", "last_layer",
           "layer_grad_norm", "output_grad", "with_gradient_of"]

CTM_DISTANCES = ("l2", "pseudo_huber", "lpips", "features")
DISCRIMINATORS = ("raw", "digits_features")


def last_layer(net: nn.Module) -> nn.Parameter:
    """The weight of a lit_fewstep network's output layer (UNet `conv_out`, MLP / DiT `out`), where the adaptive
    weights compare gradient norms (the official code: the UNet's last conv)."""
    inner = getattr(net, "net", net)
    for name in ("conv_out", "out"):
        layer = getattr(inner, name, None)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return layer.weight
    raise ValueError(f"adaptive weights: {type(inner).__name__} has no output layer named conv_out or out; "
                     "set dsm_weight / gan_weight to a number.")


def layer_grad_norm(output: Tensor, layer: nn.Parameter, grad_output: Tensor | None = None) -> Tensor:
    """||d L / d W|| for a loss L (``output`` a scalar loss, ``grad_output`` None) or from d L / d output of a tensor
    the loss depends on (chain rule: a backward only through the layers between W and ``output``); graph kept."""
    grad, = torch.autograd.grad(output, layer, grad_outputs=grad_output, retain_graph=True)
    return grad.norm()


def output_grad(loss: Tensor, output: Tensor) -> Tensor:
    """d loss / d output, keeping the graph: a backward from the loss down to ``output`` and no further."""
    grad, = torch.autograd.grad(loss, output, retain_graph=True)
    return grad


def balance_weight(norm_a: Tensor, norm_b: Tensor, eps: float = 1e-4, clamp: tuple[float, float] = (0.0, 1e4)) -> Tensor:
    """||grad_W L_a|| / (||grad_W L_b|| + eps), clamped and detached (CTM's balance weights; the VQGAN rule)."""
    return (norm_a / (norm_b + eps)).clamp(*clamp).detach()


def adaptive_weight(loss_a: Tensor, loss_b: Tensor, layer: nn.Parameter, eps: float = 1e-4,
                    clamp: tuple[float, float] = (0.0, 1e4)) -> Tensor:
    """`balance_weight` of two losses at layer W, each norm by its own backward down to W (both graphs kept)."""
    return balance_weight(layer_grad_norm(loss_a, layer), layer_grad_norm(loss_b, layer), eps, clamp)


def with_gradient_of(value: Tensor, output_grads: list[tuple[Tensor, Tensor]]) -> Tensor:
    """A scalar equal to ``value`` whose gradient is sum_k g_k^T d output_k / d theta for the pairs (output_k, g_k):
    backward from it continues each output's chain rule into the network, once."""
    surrogate = sum((output * grad.detach()).sum() for output, grad in output_grads)
    return surrogate + (value.detach() - surrogate.detach())


def heun_step_probs(max_steps: int, weighting: str = "weighted") -> Tensor:
    """P(n) for the number of teacher Heun steps n = 1..max_steps: proportional to n (official ``weighted``) or
    uniform."""
    n = torch.arange(1, max_steps + 1, dtype=torch.float64)
    p = n if weighting == "weighted" else torch.ones_like(n)
    return p / p.sum()


class CTM(PerceptualDistance, FewStepModule):
    """Consistency trajectory model distilled from an EDM(-path) teacher; see the module docstring.

    Args:
        net: a `lit_fewstep.nets` network built with ``second_time=True`` (the teacher's architecture plus the s
            embedding, for `init_from_teacher`).
        teacher_ckpt: an EDMDiffusion (or any EDM-path lit_fewstep) checkpoint; its EMA network is the teacher.
        num_scales: N, the Karras grid (18 CIFAR-10, 40 ImageNet-64).
        max_heun_steps: K, the most teacher Heun steps from t to u (N - 1 officially; default N - 1).
        heun_step_weighting: "weighted" (P(n) proportional to n, official) or "uniform".
        distance: "l2" (mean over elements), "pseudo_huber" (c = huber_c or 0.00054 sqrt(dim)), "lpips"
            (`lpips_weights`, a local file) or "features" (squared distance of the shipped digits classifier's
            features; digits only).
        target_mu: rate of the target EMA (0.999 official; 0 = the student under stop-gradient).
        inner_target: "online" (official default: the target's inner jump G(x_u, u, s) by the student under
            no_grad) or "target" (by the EMA target).
        dsm_weight: "adaptive" (official), a number (fixed weight), or 0 (no DSM).
        dsm_large_fraction: the Karras-uniform half of the DSM draws covers this fraction of the grid from
            sigma_max (official `diffusion_mult` 0.7); P_mean, P_std: the lognormal half.
        gan_start: iteration from which the GAN loss is on (None: no GAN).
        gan_weight: lambda_GAN, times the adaptive weight (or a fixed weight with `gan_adaptive` False).
        discriminator: "raw" or "digits_features" (see the module docstring); discriminator_hidden its width.
        discriminator_every: the discriminator steps every this many iterations once the GAN is on.
        lr, betas, optimizer: the student's optimizer (RAdam 4e-4 officially); d_lr, d_betas: the
            discriminator's (RAdam 2e-3, (0.5, 0.9) officially).
        init_from_teacher: start the student (and target, EMA) from the teacher's weights (the s embedding is new).
        zero_s_embedding: zero the s embedding's last layer at the start (ours; see the module docstring).
        ema_decay: the sampling EMA; grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`.
    """

    generator_name = "student"
    default_nfe = 1  # the anytime-to-anytime jump T -> 0

    def __init__(self, net: nn.Module, teacher_ckpt: str, num_scales: int = 18, max_heun_steps: int | None = None,
                 heun_step_weighting: str = "weighted", sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, distance: str = "l2", huber_c: float | None = None,
                 lpips_weights: str | None = None, target_mu: float = 0.999, inner_target: str = "online",
                 dsm_weight: float | str = "adaptive", dsm_large_fraction: float = 0.7, P_mean: float = -1.2,
                 P_std: float = 1.2, gan_start: int | None = None, gan_weight: float = 1.0, gan_adaptive: bool = True,
                 discriminator: str = "raw", discriminator_hidden: int = 64, discriminator_every: int = 1,
                 lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999), optimizer: str = "radam",
                 d_lr: float = 2e-3, d_betas: tuple[float, float] = (0.5, 0.9), init_from_teacher: bool = True,
                 zero_s_embedding: bool = True, ema_decay: float = 0.999, grad_clip: float = 0.0,
                 nonfinite: str = "stop", max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if num_scales < 2:
            raise ValueError(f"num_scales: need N >= 2 grid points, got {num_scales}.")
        max_heun_steps = num_scales - 1 if max_heun_steps is None else max_heun_steps
        if not 1 <= max_heun_steps <= num_scales - 1:
            raise ValueError(f"max_heun_steps: need 1 <= K <= num_scales - 1 = {num_scales - 1}, got {max_heun_steps}.")
        if heun_step_weighting not in ("weighted", "uniform"):
            raise ValueError(f"heun_step_weighting: choose 'weighted' or 'uniform', got {heun_step_weighting!r}.")
        if distance not in CTM_DISTANCES:
            raise ValueError(f"distance: unknown {distance!r}; choose one of {CTM_DISTANCES}.")
        if distance == "lpips" and lpips_weights is None:
            raise ValueError("lpips_weights: distance 'lpips' needs a local LPIPS-VGG weights file.")
        if inner_target not in ("online", "target"):
            raise ValueError(f"inner_target: choose 'online' or 'target', got {inner_target!r}.")
        if not (dsm_weight == "adaptive" or (isinstance(dsm_weight, (int, float)) and dsm_weight >= 0)):
            raise ValueError(f"dsm_weight: 'adaptive' or a number >= 0, got {dsm_weight!r}.")
        if discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator: choose one of {DISCRIMINATORS}, got {discriminator!r}.")
        if not 0.0 <= target_mu < 1.0:
            raise ValueError(f"target_mu: need 0 <= mu < 1, got {target_mu}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min / sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self.student = PreconditionedNet(net, "ctm", sigma_data, sigma_min)
        self.path = self.student.path
        self.teacher_ckpt = teacher_ckpt
        self.num_scales, self.max_heun_steps, self.heun_step_weighting = num_scales, max_heun_steps, heun_step_weighting
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.distance = distance
        self.huber_c = pseudo_huber_c(math.prod(self.data_shape)) if huber_c is None else huber_c
        self.lpips_weights = lpips_weights
        self.target_mu, self.inner_target = float(target_mu), inner_target
        self.dsm_weight, self.dsm_large_fraction, self.P_mean, self.P_std = dsm_weight, dsm_large_fraction, P_mean, P_std
        self.gan_start, self.gan_weight, self.gan_adaptive = gan_start, float(gan_weight), gan_adaptive
        self.discriminator_kind = discriminator
        self.init_from_teacher, self.zero_s_embedding = init_from_teacher, zero_s_embedding
        self._initialized = False
        self.register_frozen("teacher", path=teacher_ckpt)
        self.init_distance_networks()
        if zero_s_embedding:
            s_embedding = getattr(getattr(net, "cond", None), "s", None)
            if s_embedding is not None:
                nn.init.zeros_(s_embedding.fc2.weight)
                nn.init.zeros_(s_embedding.fc2.bias)
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.phases = [Phase("ctm", "generator_loss", ("student",), optimizer=optimizer, lr=lr, betas=tuple(betas),
                             updates_ema=True)]
        self.discriminator = None
        if gan_start is not None:
            if gan_start < 0 or discriminator_every < 1:
                raise ValueError(f"gan_start / discriminator_every: need >= 0 / >= 1, got {gan_start}, "
                                 f"{discriminator_every}.")
            channels = 128 if discriminator == "digits_features" else self.data_shape[0]
            self.discriminator = DiscriminatorHead(channels, discriminator_hidden, self.student.num_classes)
            self.phases.append(Phase("discriminator", "discriminator_loss", ("discriminator",), every=discriminator_every,
                                     start=gan_start, optimizer=optimizer, lr=d_lr, betas=tuple(d_betas)))
        self.init_ema()

    # -------------------------------------------------------------- teacher and frozen feature nets
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            teacher = self._teacher()
            if self.init_from_teacher and int(self.iteration) == 0 and not self._initialized:
                self._init_from(teacher)

    def _teacher(self) -> PreconditionedNet:
        teacher = self.frozen_network("teacher")
        if not isinstance(teacher, PreconditionedNet) or teacher.two_time:
            raise ValueError(f"teacher_ckpt: {self.teacher_ckpt!r} holds no one-time diffusion teacher.")
        if teacher.num_classes != self.student.num_classes:
            raise ValueError(f"teacher_ckpt: teacher has num_classes={teacher.num_classes}, the student net "
                             f"{self.student.num_classes}; set net.num_classes to match.")
        return teacher

    def _init_from(self, teacher: PreconditionedNet) -> None:
        """Teacher weights into the student by name; only the s embedding (`cond.s.*`) may be missing."""
        if teacher.preconditioning != "edm":
            raise ValueError(f"init_from_teacher: the student's c_in / c_noise are EDM's; a "
                             f"{teacher.preconditioning!r} teacher's weights do not fit. Set init_from_teacher: false.")
        result = self.student.net.load_state_dict(teacher.net.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("cond.s.")]
        if missing or result.unexpected_keys:
            raise ValueError("init_from_teacher: the student net differs from the teacher's beyond the s embedding "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); copy the teacher's "
                             "net config and add second_time: true.")
        self.target.load_state_dict(self.student.state_dict())
        self.restart_emas()
        self._initialized = True

    def _labels(self, net: nn.Module, y: Tensor | None) -> Tensor | None:
        return y if getattr(net, "num_classes", 0) > 0 else None

    # -------------------------------------------------------------- the CTM draw
    def grid(self) -> Tensor:
        """Karras grid, index 0 = sigma_max ... index N - 1 = sigma_min (float64), the official direction."""
        return karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho, append_zero=False)

    def draw_times(self, x: Tensor) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """(n, index of t, t, u, s) in the official order: n once per batch with P(n) proportional to n, then
        i ~ U{0..N-1-n}, u = sigma_{i+n}, then the index of s ~ U{i+n..N-1}."""
        N, B = self.num_scales, x.shape[0]
        cdf = heun_step_probs(self.max_heun_steps, self.heun_step_weighting).cumsum(0)
        r = self.rand((1,), x, shared=True).double().cpu()
        n = int(torch.searchsorted(cdf, r, right=True).clamp_max(self.max_heun_steps - 1)) + 1
        i = (self.rand((B,), x).double() * (N - n)).floor().long().clamp_max(N - 1 - n)
        j = i + n + (self.rand((B,), x).double() * (N - i - n)).floor().long()
        j = torch.minimum(j, torch.full_like(j, N - 1))
        sig = self.grid().to(x.device)
        return n, i, sig[i].to(x.dtype), sig[i + n].to(x.dtype), sig[j].to(x.dtype)

    def teacher_solve(self, x_t: Tensor, i: Tensor, n: int, y: Tensor | None) -> Tensor:
        """n Heun steps of the teacher along the grid from sigma_i to sigma_{i+n} (2n NFE, no gradient)."""
        teacher = self._teacher()
        y_t = self._labels(teacher, y)
        sig = self.grid().to(x_t.device)
        x = x_t
        for k in range(n):
            x = heun_step(lambda xx, tt: teacher.x0_from(xx, tt, self.path, class_labels=y_t), x,
                          sig[i + k].to(x.dtype), sig[i + k + 1].to(x.dtype), self.path)
        return x

    def to_time_zero(self, x_s: Tensor, s: Tensor, y: Tensor | None) -> Tensor:
        """G_target(x_s, s, sigma_min): the target network's map to "time 0" (sigma_min)."""
        return self.target.jump(x_s, s, self.sigma_min, class_labels=self._labels(self.target, y))

    def ctm_target(self, x_t: Tensor, i: Tensor, n: int, u: Tensor, s: Tensor, y: Tensor | None) -> Tensor:
        """G_target(G_sg(Heun_teacher^n(x_t; t -> u), u, s), s, sigma_min), without gradient. At u = s the inner jump
        is the identity (G(x, u, u) = x) and this is the teacher's solution carried to sigma_min by the target."""
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i, n, y)
            inner = self.student if self.inner_target == "online" else self.target
            return self.to_time_zero(inner.jump(x_u, u, s, class_labels=self._labels(inner, y)), s, y)

    def ctm_estimate(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(G_target(G_theta(x_t, t, s), s, sigma_min), the student's jump G_theta(x_t, t, s)): target parameters
        frozen, gradient through its input."""
        jump = self.student.jump(x_t, t, s, class_labels=self._labels(self.student, y))
        with frozen(self.target):
            return self.to_time_zero(jump, s, y), jump

    def ctm_terms(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(per-sample soft consistency distance [B], the estimate carried to sigma_min, the student's jump it
        carries: the one tensor through which both depend on the student)."""
        n, i, t, u, s = self.draw_times(x)
        x_t = self.path.noise(x, self.randn(x.shape, x), t)
        with same_dropout_masks() as replay:  # the official code's shared dropout masks for estimate and target
            estimate, jump = self.ctm_estimate(x_t, t, s, y)
            replay()
            target = self.ctm_target(x_t, i, n, u, s, y)
        return self.distance_between(estimate, target), estimate, jump

    # -------------------------------------------------------------- DSM
    def dsm_sigmas(self, x: Tensor) -> Tensor:
        """Half lognormal(P_mean, P_std), half Karras-uniform over the first `dsm_large_fraction` of the grid."""
        B = x.shape[0]
        half = B // 2
        normal = self.randn((B,), x)
        lognormal = torch.exp(self.P_mean + self.P_std * normal)
        frac = self.rand((B,), x) * self.dsm_large_fraction
        hi, lo = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
        karras = (hi + frac * (lo - hi)) ** self.rho
        return torch.where(torch.arange(B, device=x.device) < half, lognormal, karras)

    def dsm_terms(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(EDM's weighted denoising loss on g(x + sigma z, sigma, sigma), the denoiser output it is computed from)."""
        sigma = self.dsm_sigmas(x)
        z = self.randn(x.shape, x)
        denoised = self.student(self.path.noise(x, z, sigma), sigma, class_labels=self._labels(self.student, y))
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - x).flatten(1).pow(2).mean(1)).mean(), denoised

    def dsm_loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        """EDM's weighted denoising loss on g(x + sigma z, sigma, sigma)."""
        return self.dsm_terms(x, y)[0]

    # -------------------------------------------------------------- GAN
    def discriminate(self, x: Tensor, y: Tensor | None) -> Tensor:
        feats = self._features().features(x) if self.discriminator_kind == "digits_features" else x
        return self.discriminator(feats, self._labels(self.discriminator, y))

    def _log(self, name: str, value: Tensor) -> None:
        if self._trainer is not None:
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)

    def gan_on(self) -> bool:
        return self.discriminator is not None and int(self.iteration) >= self.gan_start

    # -------------------------------------------------------------- losses
    def generator_loss(self, batch) -> Tensor:
        """L_CTM + w_DSM L_DSM + w_GAN lambda_GAN L_GAN (Kim et al. 2024, Eq. 8 with the official weights).

        The value is that sum and so is its gradient, but each part of the graph is backpropagated once. The official
        code takes ||grad_W L|| at the last layer W by a backward of each loss through everything between it and W
        (target network, feature net, discriminator), then backpropagates the sum again. Here each loss is first
        differentiated down to the student's output it depends on (the jump G_theta for L_CTM and L_GAN, the denoiser
        output for L_DSM); ||grad_W L|| follows from that through the output layer alone, and the student's own
        backward runs once, from `with_gradient_of`."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        d, estimate, jump = self.ctm_terms(x, y)
        loss_ctm = d.mean()
        grad_ctm = output_grad(loss_ctm, jump)
        # ||grad_W L_CTM|| for both adaptive weights; only they need the last layer (any network without one can
        # train with fixed weights)
        adaptive = self.dsm_weight == "adaptive" or (self.gan_on() and self.gan_adaptive)
        layer = last_layer(self.student) if adaptive else None
        norm_ctm = layer_grad_norm(jump, layer, grad_ctm) if adaptive else None
        loss, output_grads = loss_ctm.detach(), [(jump, grad_ctm)]
        if self.dsm_weight != 0:
            loss_dsm, denoised = self.dsm_terms(x, y)
            grad_dsm = output_grad(loss_dsm, denoised)
            w_dsm = (balance_weight(norm_ctm, layer_grad_norm(denoised, layer, grad_dsm))
                     if self.dsm_weight == "adaptive" else torch.as_tensor(float(self.dsm_weight)))
            loss = loss + w_dsm * loss_dsm.detach()
            output_grads.append((denoised, w_dsm * grad_dsm))
            self._log("dsm_loss", loss_dsm.detach())
            self._log("dsm_weight", w_dsm.float())
        if self.gan_on():
            with frozen(self.discriminator):
                loss_gan = -self.discriminate(estimate, y).mean()
                grad_gan = output_grad(loss_gan, jump)
            w_gan = (self.gan_weight_for(norm_ctm, layer_grad_norm(jump, layer, grad_gan)) if self.gan_adaptive
                     else torch.ones((), device=jump.device))
            loss = loss + w_gan * self.gan_weight * loss_gan.detach()
            output_grads.append((jump, w_gan * self.gan_weight * grad_gan))
            self._log("gan_g_loss", loss_gan.detach())
            self._log("gan_weight", w_gan.float())
        self._log("ctm_distance", loss_ctm.detach())
        return with_gradient_of(loss, output_grads)

    @staticmethod
    def gan_weight_for(norm_ctm: Tensor, norm_gan: Tensor) -> Tensor:
        """The paper's adaptive GAN weight from ||grad_W L_CTM|| and ||grad_W L_GAN|| at the last layer:
        their ratio (+1e-4 below) clamped to [0.01, 10] (with `gan_adaptive` False the weight is 1)."""
        return balance_weight(norm_ctm, norm_gan, clamp=(0.01, 10.0))

    def discriminator_loss(self, batch) -> Tensor:
        """Hinge loss: relu(1 - D(real)) + relu(1 + D(fake)), fake = G_theta(x_t, t, s) carried to sigma_min."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        with torch.no_grad():
            n, i, t, u, s = self.draw_times(x)
            x_t = self.path.noise(x, self.randn(x.shape, x), t)
            fake = self.to_time_zero(self.student.jump(x_t, t, s, class_labels=self._labels(self.student, y)), s, y)
        real_logits, fake_logits = self.discriminate(torch.cat([x, fake]), None if y is None else torch.cat([y, y])).chunk(2)
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()

    # -------------------------------------------------------------- target update
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.update_target()

    @torch.no_grad()
    def update_target(self) -> None:
        """theta- <- mu theta- + (1 - mu) theta after each iteration's student step."""
        for p_target, p in zip(self.target.parameters(), self.student.parameters()):
            p_target.lerp_(p.detach(), 1.0 - self.target_mu)
        for b_target, b in zip(self.target.buffers(), self.student.buffers()):
            b_target.copy_(b)

    # -------------------------------------------------------------- sampling
    def sample(self, n, nfe, class_labels=None, generator=None, use_ema=True, **options):
        """`FewStepModule.sample`; options ``gamma`` (0 deterministic long jumps ... 1 consistency multistep) and
        ``solver`` ("jump", the default, or "heun": EDM's Heun sampler on the denoiser g(x, t, t)). The
        re-noising of gamma > 0 draws from the same `generator`."""
        return super().sample(n, nfe, class_labels=class_labels, generator=generator, use_ema=use_ema,
                              _generator=generator, **options)

    def sampling_grid(self, nfe: int) -> Tensor:
        """nfe + 1 Karras levels from sigma_max to sigma_min (the official ``exact`` sampler's grid)."""
        return karras_sigmas(nfe + 1, self.sigma_min, self.sigma_max, self.rho, append_zero=False)

    def _sample(self, noise, class_labels, nfe, net, gamma: float = 0.0, solver: str = "jump", _generator=None,
                **unused):
        if unused:
            name = sorted(unused)[0]
            raise ValueError(f"{name}: CTM takes no {name!r} option at sampling (it takes ['gamma', 'solver']); "
                             "drop it.")
        labels = self._labels(net, class_labels)
        counter = NFECounter()
        if solver == "heun":
            g = counter.counted(lambda x_t, t: net(x_t, t, class_labels=labels))  # g(x, t, t): a denoiser
            x = sample_edm_heun(g, noise, nfe, self.sigma_min, self.sigma_max, self.rho)
            return x, counter.count
        if solver != "jump":
            raise ValueError(f"solver: CTM samples with 'jump' (gamma-sampling) or 'heun' (its denoiser), got {solver!r}.")
        step = TwoTimeJump(self.path, float(gamma), gaussian_noise(_generator), t_min=self.sigma_min)
        state = run_steps(lambda x, t, s: net.jump(x, t, s, class_labels=labels), noise * self.sigma_max,
                          self.sampling_grid(nfe).to(noise.dtype), step, counter=counter)
        return state.x, counter.count
