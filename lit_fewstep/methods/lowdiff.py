"""LowDiff (Xu et al. 2025, "Efficient Diffusion Sampling with Low-Resolution Condition"): one network for a
cascade of resolutions.

One EDM denoiser D(x_sigma; sigma, r, c, y) serves every resolution r_0 < ... < r_K of a cascade: the net (a UNet
built with ``resolutions=`` listing them, so it embeds which size it works at) takes as extra input channels the
low-resolution condition c, the previous level brought up to r_k (zeros at r_0). Sampling runs K_0 steps at r_0
from pure noise, then K_k steps at each r_k from fresh noise conditioned on the upsampled r_(k-1) result; most
steps go to the cheap low resolutions, few to the expensive top one.

The paper has no public code. What is ours (see docs/lowdiff.md): every level is trained at every iteration
(the EDM loss at each r_k, averaged over levels); the low-resolution targets and conditions come from one
area-averaging pyramid of the training image; the condition is noised during training with sigma_c ~ U[0,
condition_sigma_max] (Ho et al. 2022's conditioning augmentation, without telling the net sigma_c) so the upper
levels tolerate the lower levels' own errors, and is given clean at sampling (``condition_sigma`` to change it);
every level starts at sigma_max on the same Karras grid as the plain sampler.

With ``resolutions=None`` the cascade has one level, the data's own shape, and the method is the EDM teacher
(same loss, same sampler): this is how it runs on non-image data.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..data.cascade import UPSAMPLE_MODES, check_cascade, downsample, upsample
from ..diffusion.guidance import guided_x0
from ..diffusion.paths import EDMPath
from ..diffusion.solvers import ODE_SOLVERS, NFECounter, lognormal_sigmas, sample_edm_heun
from .base import Samples
from .diffusion import EDMDiffusion

__all__ = ["LowDiff", "split_nfe"]


def split_nfe(nfe: int, weights: Sequence[int]) -> tuple[int, ...]:
    """`nfe` evaluations over the levels in proportion to `weights` (largest remainders), each level at least 1."""
    levels = len(weights)
    if nfe < levels:
        raise ValueError(f"nfe: a cascade of {levels} resolutions needs at least {levels} evaluations (one per "
                         f"level), got {nfe}.")
    total = float(sum(weights))
    raw = [nfe * w / total for w in weights]
    share = [max(1, int(r)) for r in raw]
    while sum(share) > nfe:  # the levels lifted to 1 are paid for by the largest one
        share[max(range(levels), key=lambda i: share[i])] -= 1
    order = sorted(range(levels), key=lambda i: (raw[i] - int(raw[i]), -i), reverse=True)
    for i in order[: nfe - sum(share)]:
        share[i] += 1
    return tuple(share)


class LowDiff(EDMDiffusion):
    """A resolution cascade in one EDM denoiser.

    Args:
        net: a `lit_fewstep.nets.UNet` built with ``resolutions`` listing every size of the cascade,
            ``img_resolution`` = the top one (the data's size) and ``extra_channels = in_channels`` (the
            condition). Any network when ``resolutions`` is None.
        resolutions: the cascade, low to high, e.g. [8, 16] or [7, 14, 28]; None: one level (plain EDM).
        steps: network evaluations per level at the default budget (Heun: 2 per step, the last step Euler),
            e.g. [25, 5]; ``default_nfe`` is their sum. A `sample` call with another total splits it in these
            proportions (at least 1 per level). Default: 35 at the first level, 5 at each further one.
        condition_sigma_max: training noise on the condition, sigma_c ~ U[0, condition_sigma_max] per sample.
        level_weights: weight of each level's loss (default: equal; the loss is their weighted mean).
        upsample_mode: "nearest" or "bilinear", how a level's result is brought up to the next size.
        upper_solver: the ODE step of the levels above the first ("euler" by default; the first level uses the
            `solver` sampling option, Heun by default). With the few evaluations an upper level gets, Heun's grid
            ends with a corrector from sigma_max straight into sigma_min, which multiplies the denoiser's small
            inconsistencies by sigma_max / sigma_min; Euler has no corrector (measured in docs/lowdiff.md).
        sigma_data, P_mean, P_std, label_dropout, guidance_scale, lr, betas, weight_decay, ema_decay, grad_clip,
        nonfinite, max_consecutive_skips: as in `EDMDiffusion`.
    """

    def __init__(self, net: nn.Module, resolutions: Sequence[int] | None = None, steps: Sequence[int] | None = None,
                 condition_sigma_max: float = 0.1, level_weights: Sequence[float] | None = None,
                 upsample_mode: str = "nearest", upper_solver: str = "euler", sigma_data: float = 0.5,
                 P_mean: float = -1.2, P_std: float = 1.2,
                 label_dropout: float = 0.1, guidance_scale: float = 1.0, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.999,
                 grad_clip: float = 1.0, nonfinite: str = "stop", max_consecutive_skips: int = 100):
        super().__init__(net, sigma_data, P_mean, P_std, label_dropout, guidance_scale, lr, betas, weight_decay,
                         ema_decay, grad_clip, nonfinite, max_consecutive_skips)
        self.resolutions = None if resolutions is None else check_cascade(list(resolutions), "resolutions")
        levels = 1 if self.resolutions is None else len(self.resolutions)
        if self.resolutions is not None:
            self._check_net(net, self.resolutions)
        steps = [35] + [5] * (levels - 1) if steps is None else list(steps)
        if len(steps) != levels or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
            raise ValueError(f"steps: give one positive integer per resolution ({levels}), got {steps!r}.")
        self.steps = tuple(steps)
        weights = [1.0] * levels if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != levels or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"level_weights: give {levels} non-negative numbers (not all zero), got {level_weights!r}.")
        self.level_weights = tuple(weights)
        if not condition_sigma_max >= 0:
            raise ValueError(f"condition_sigma_max: must be >= 0, got {condition_sigma_max}.")
        self.condition_sigma_max = float(condition_sigma_max)
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode: choose one of {list(UPSAMPLE_MODES)}, got {upsample_mode!r}.")
        self.upsample_mode = upsample_mode
        if upper_solver not in ODE_SOLVERS:
            raise ValueError(f"upper_solver: choose one of {list(ODE_SOLVERS)}, got {upper_solver!r}.")
        self.upper_solver = upper_solver
        self._sampling_generator: torch.Generator | None = None

    @staticmethod
    def _check_net(net: nn.Module, resolutions: tuple[int, ...]) -> None:
        accepted = getattr(net, "resolutions", None)
        if accepted is None and len(resolutions) == 1:  # one level: a fixed-size net of that size will do
            accepted = (getattr(net, "img_resolution", None),)
        if accepted is None or any(r not in accepted for r in resolutions):
            raise ValueError(f"net: a cascade over {list(resolutions)} needs an image net built with resolutions "
                             f"listing every size (e.g. UNet(resolutions={list(resolutions)})), got {accepted!r}.")
        if getattr(net, "img_resolution", None) != resolutions[-1]:
            raise ValueError(f"net: img_resolution must be the top of the cascade ({resolutions[-1]}), got "
                             f"{getattr(net, 'img_resolution', None)}.")
        if len(resolutions) > 1 and getattr(net, "extra_channels", 0) != net.in_channels:
            raise ValueError(f"net: the low-resolution condition needs extra_channels = in_channels "
                             f"({net.in_channels}), got {getattr(net, 'extra_channels', 0)}.")

    @property
    def default_nfe(self) -> int:
        return sum(self.steps)

    @property
    def levels(self) -> int:
        return 1 if self.resolutions is None else len(self.resolutions)

    @property
    def min_nfe(self) -> int:
        """One evaluation per level of the cascade at the least."""
        return self.levels

    # ----------------------------------------------------------------------------- condition
    def condition(self, lower: Tensor, resolution: int) -> Tensor:
        """The low-resolution condition at `resolution`: the lower level's image [B, C, r, r] brought up to it."""
        return upsample(lower, resolution, self.upsample_mode)

    def level_inputs(self, x: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """(target, clean condition) at every level for a top-resolution batch x: the pyramid level r_k and the
        upsampled level r_(k-1) (None at the first level)."""
        if self.resolutions is None:
            return [(x, None)]
        levels = [downsample(x, r) for r in self.resolutions]
        return [(levels[0], None)] + [(levels[k], self.condition(levels[k - 1], r))
                                      for k, r in enumerate(self.resolutions) if k > 0]

    # ----------------------------------------------------------------------------- training
    def denoising_loss(self, batch, generator=None):
        """Karras et al. 2022 Eq. 2 at every level: lambda(sigma) ||D(x_k + sigma n; sigma, r_k, c_k) - x_k||^2, mean
        over elements, then the level-weighted mean; c_k = up(x_(k-1)) + sigma_c n_c, sigma_c ~ U[0, max]."""
        x, cond = self.split_batch(batch)
        y = self.maybe_drop_labels(cond.class_labels, x, generator)  # one draw: the same labels at every level
        total, weights = x.new_zeros(()), sum(self.level_weights)
        for weight, (x_k, c_k) in zip(self.level_weights, self.level_inputs(x)):
            sigma = lognormal_sigmas(self.randn((x_k.shape[0],), x_k, generator), self.P_mean, self.P_std)
            n = self.randn(x_k.shape, x_k, generator)
            extra = {}
            if c_k is not None:
                sigma_c = self.condition_sigma_max * self.rand((x_k.shape[0],), x_k, generator)
                extra["extra"] = c_k + sigma_c.reshape(-1, 1, 1, 1) * self.randn(c_k.shape, c_k, generator)
            sigma_b = sigma.reshape(-1, *([1] * (x_k.ndim - 1)))
            D = self.model(x_k + sigma_b * n, sigma, class_labels=y, **extra)
            lam = (sigma_b**2 + self.sigma_data**2) / (sigma_b * self.sigma_data) ** 2
            total = total + weight * (lam * (D - x_k) ** 2).mean()
        return total / weights

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, nfe: int, class_labels: Tensor | None = None, generator: torch.Generator | None = None,
               use_ema: bool | str = True, cond=None, **options) -> Samples:
        """As `FewStepModule.sample`; the noise of the levels below the top is drawn from `generator` after the
        top-level noise (so a one-level cascade draws exactly what the plain sampler draws)."""
        self._sampling_generator = generator
        try:
            return super().sample(n, nfe, class_labels, generator, use_ema, cond, **options)
        finally:
            self._sampling_generator = None

    def _draw(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self._sampling_generator, dtype=like.dtype).to(like.device)

    def plan(self, nfe: int, steps: Sequence[int] | None = None) -> tuple[int, ...]:
        """Evaluations per level for a total of `nfe`: `steps` if given (must sum to nfe), the configured steps
        at their own total, else those proportions."""
        if steps is not None:
            steps = tuple(int(k) for k in steps)
            if len(steps) != self.levels or min(steps) < 1 or sum(steps) != nfe:
                raise ValueError(f"steps: give {self.levels} positive evaluation counts summing to nfe={nfe}, "
                                 f"got {list(steps)}.")
            return steps
        return self.steps if nfe == sum(self.steps) else split_nfe(nfe, self.steps)

    def cascade(self, noise: Tensor, class_labels: Tensor | None, steps: Sequence[int], net: nn.Module,
                guidance_scale: float | Tensor | None = None, solver: str = "heun", condition_sigma: float = 0.0,
                noises: Sequence[Tensor] | None = None) -> tuple[list[Tensor], list[int]]:
        """Run the cascade: level k gets `steps[k]` evaluations (guided ones count twice) of the EDM sampler
        (`solver` at the first level, `upper_solver` above it).

        noise: unit Gaussian at the top resolution; the lower levels draw theirs (or take `noises`, one per level
        below the top, low to high). Returns every level's result (low to high) and the evaluations each spent.
        """
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if class_labels is None:
            scale = 1.0  # an unconditional draw is not guided by CFG
        B, edm = noise.shape[0], EDMPath()
        sizes = [None] if self.resolutions is None else list(self.resolutions)
        if noises is None:
            noises = [self._draw((B, noise.shape[1], r, r), noise) for r in sizes[:-1]]
        noises = [*noises, noise]
        results, spent, lower = [], [], None
        for k, (r, z, nfe_k) in enumerate(zip(sizes, noises, steps)):
            counter, extra = NFECounter(), {}
            if lower is not None:
                c = self.condition(lower, r)
                if condition_sigma > 0:
                    c = c + condition_sigma * self._draw(c.shape, c)
                extra["extra"] = c
            x0_fn = lambda x_t, t, extra=extra, counter=counter: guided_x0(  # noqa: E731
                net, x_t, t, class_labels, scale, path=edm, counter=counter, **extra)
            lower = sample_edm_heun(x0_fn, z, nfe_k, method=solver if k == 0 else self.upper_solver)
            results.append(lower)
            spent.append(counter.count)
        return results, spent

    def _sample(self, noise, class_labels, nfe, net, guidance_scale: float | Tensor | None = None,
                solver: str = "heun", steps: Sequence[int] | None = None, condition_sigma: float = 0.0):
        """The cascade with `nfe` evaluations in all (`plan`); returns the top level and the evaluations spent."""
        results, spent = self.cascade(noise, class_labels, self.plan(nfe, steps), net, guidance_scale, solver,
                                      condition_sigma)
        return results[-1], sum(spent)
