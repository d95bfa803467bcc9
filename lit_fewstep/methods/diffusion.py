"""Teachers: EDM denoising score matching and flow matching, each with an ODE sampler.

Both train a `PreconditionedNet` (the generator slot of `FewStepModule`) with one phase, keep an EMA,
and sample with the deterministic Heun/Euler PF-ODE solver in EDM coordinates (any teacher's
prediction is converted through its path), with optional classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..diffusion.guidance import autoguided_x0, guided_x0
from ..diffusion.paths import EDMPath
from ..diffusion.precond import PreconditionedNet
from ..diffusion.solvers import NFECounter, lognormal_sigmas, sample_edm_heun
from .base import FewStepModule, Phase

__all__ = ["DiffusionTeacher", "EDMDiffusion", "FlowMatching", "drop_labels"]


def drop_labels(class_labels: Tensor | None, num_classes: int, p: float, u: Tensor | None = None) -> Tensor | None:
    """Replace each label by the null label `num_classes` where the uniform draw u < p (CFG training)."""
    if class_labels is None or num_classes == 0:
        return None
    if p <= 0:
        return class_labels
    u = torch.rand(class_labels.shape, device=class_labels.device) if u is None else u
    return torch.where(u < p, torch.full_like(class_labels, num_classes), class_labels)


class DiffusionTeacher(FewStepModule):
    """Shared part of the two teachers: one phase, EMA, PF-ODE sampling with CFG.

    Args:
        net: a `lit_fewstep.nets` network.
        sigma_data: data standard deviation (0.5 for images in [-1, 1]).
        label_dropout: probability of the null label during training (enables CFG).
        guidance_scale: default CFG scale at sampling (1 = no guidance; EDM2 convention).
        lr, betas, weight_decay, ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule` and `Phase`.
    """

    generator_name = "model"
    preconditioning = "edm"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, label_dropout: float = 0.1, guidance_scale: float = 1.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 ema_decay: float = 0.999, grad_clip: float = 1.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        self.model = PreconditionedNet(net, self.preconditioning, sigma_data)
        self.sigma_data = sigma_data
        self.label_dropout = label_dropout
        self.guidance_scale = guidance_scale
        self.phases = [Phase("denoiser", "denoising_loss", ("model",), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, updates_ema=True)]
        self.init_ema()

    def denoising_loss(self, batch, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def maybe_drop_labels(self, y: Tensor, like: Tensor, generator=None) -> Tensor | None:
        """Null labels with probability label_dropout while training (never at validation)."""
        if not self.training or self.model.num_classes == 0:
            return drop_labels(y, self.model.num_classes, 0.0)
        return drop_labels(y, self.model.num_classes, self.label_dropout, self.rand((y.shape[0],), like, generator))

    def validation_step(self, batch, batch_idx):
        generator = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        loss = self.denoising_loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def _sample(self, noise, class_labels, nfe, net, guidance_scale: float | Tensor | None = None,
                solver: str = "heun", guide: nn.Module | None = None, grid: str = "karras"):
        """Heun (or Euler) on the PF-ODE in EDM coordinates; `guidance_scale` a float or one scale per sample;
        `solver` and `grid` (Karras or cosine noise levels) as in `sample_edm_heun`.

        Without `guide`: classifier-free guidance with the null label (unconditional draws are not guided).
        With `guide` (a trained lit_fewstep module or network of the same task, e.g. a smaller, shorter-trained
        one): autoguidance, D = D_guide + scale (D - D_guide) (Karras et al. 2024, Eq. 2), unconditional models too.
        Either way a guided step costs two network evaluations per sample, counted in the returned NFE.
        """
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        counter, edm = NFECounter(), EDMPath()
        if guide is not None:
            weak = guide.sampling_network(True) if isinstance(guide, FewStepModule) else guide
            if int(getattr(weak, "num_classes", 0)) != net.num_classes:
                raise ValueError(f"guide: the guide has num_classes={getattr(weak, 'num_classes', 0)} but the model "
                                 f"{net.num_classes}; a guide must be trained on the same task and conditioning.")
            weak = weak.to(noise.device).eval()
            x0_fn = lambda x_t, t: autoguided_x0(net, weak, x_t, t, scale, class_labels, path=edm,  # noqa: E731
                                                 counter=counter)
        else:
            if class_labels is None:
                scale = 1.0  # an unconditional draw is not guided by CFG
            x0_fn = lambda x_t, t: guided_x0(net, x_t, t, class_labels, scale, path=edm, counter=counter)  # noqa: E731
        return sample_edm_heun(x0_fn, noise, nfe, method=solver, grid=grid), counter.count


class EDMDiffusion(DiffusionTeacher):
    """Karras et al. 2022 (EDM): denoising score matching with lognormal sigma and EDM weighting.

    Args:
        P_mean, P_std: ln(sigma) ~ N(P_mean, P_std^2) during training.
    """

    preconditioning = "edm"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
                 label_dropout: float = 0.1, guidance_scale: float = 1.0, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.999,
                 grad_clip: float = 1.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(net, sigma_data, label_dropout, guidance_scale, lr, betas, weight_decay, ema_decay,
                         grad_clip, nonfinite,
                         max_consecutive_skips)
        self.P_mean, self.P_std = P_mean, P_std

    def denoising_loss(self, batch, generator=None):
        """Eq. 2 + Table 1 of Karras et al. 2022: lambda(sigma) ||D(x + sigma n, sigma) - x||^2, mean over elements."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        y = self.maybe_drop_labels(y, x, generator)
        sigma = lognormal_sigmas(self.randn((x.shape[0],), x, generator), self.P_mean, self.P_std)
        n = self.randn(x.shape, x, generator)
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        D = self.model(x + sigma_b * n, sigma, class_labels=y)
        weight = (sigma_b**2 + self.sigma_data**2) / (sigma_b * self.sigma_data) ** 2
        return (weight * (D - x) ** 2).mean()


class FlowMatching(DiffusionTeacher):
    """Lipman et al. 2023 / Liu et al. 2023: regress the linear path's velocity z - x.

    Args:
        time_distribution: "uniform" t ~ U[0, 1], or "logit_normal" t = sigmoid(N(P_mean, P_std^2)) (SD3).
    """

    preconditioning = "velocity"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, time_distribution: str = "logit_normal",
                 P_mean: float = 0.0, P_std: float = 1.0, label_dropout: float = 0.1, guidance_scale: float = 1.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 ema_decay: float = 0.999, grad_clip: float = 1.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        if time_distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"time_distribution: choose 'uniform' or 'logit_normal', got {time_distribution!r}.")
        super().__init__(net, sigma_data, label_dropout, guidance_scale, lr, betas, weight_decay, ema_decay,
                         grad_clip, nonfinite,
                         max_consecutive_skips)
        self.time_distribution, self.P_mean, self.P_std = time_distribution, P_mean, P_std

    def sample_times(self, normal: Tensor, uniform: Tensor) -> Tensor:
        """Training times from a standard normal draw (logit-normal) or a uniform one."""
        if self.time_distribution == "uniform":
            return uniform
        return torch.sigmoid(self.P_mean + self.P_std * normal)

    def denoising_loss(self, batch, generator=None):
        """Conditional flow matching: ||F(x_t, t) - (z - x)||^2 on x_t = (1 - t) x + t z, mean over elements."""
        x, cond = self.split_batch(batch)
        y = cond.class_labels
        y = self.maybe_drop_labels(y, x, generator)
        t = self.sample_times(self.randn((x.shape[0],), x, generator), self.rand((x.shape[0],), x, generator))
        z = self.randn(x.shape, x, generator)
        path = self.model.path
        v = self.model(path.noise(x, z, t), t, class_labels=y)
        return ((v - path.velocity(x, z, t)) ** 2).mean()
