"""Distribution Matching Distillation: DMD (Yin et al., CVPR 2024) and DMD2 (Yin et al., NeurIPS 2024).

Networks (attribute names, paper symbols):

==============  ==========  ==========================================================================
attribute       paper       role
==============  ==========  ==========================================================================
``G``           G_theta     generator; the teacher's network initialised from its weights; x̂0 = G(sigma z, sigma)
``teacher``     mu_real     frozen teacher denoiser (the "real" score), optionally CFG-guided; never saved
``fake_score``  mu_fake     copy of the teacher trained online on stop-grad generator samples (the critic)
``head``        D           DMD2 only: real/fake classifier on ``fake_score``'s bottleneck features
==============  ==========  ==========================================================================

All math is on the EDM path x_sigma = x + sigma eps (``diffusion.paths.EDMPath``); a teacher trained on
another path (flow matching) is queried through ``PreconditionedNet.x0_from``, which converts the state.
Scores never appear explicitly: on the EDM path s(x_sigma) = (mu(x_sigma) - x_sigma) / sigma^2 (Tweedie), so a
score difference is a denoiser difference over sigma^2, and the paper's weighting cancels the sigma^2.

What DMD2 changes (see `DMD2`):

=================  =================================  ==================================================
                   DMD                                DMD2
=================  =================================  ==================================================
generator loss     L_DM + lambda_reg L_reg            L_DM + lambda_G L_GAN(G)
critic loss        L_fake                             L_fake + lambda_D L_GAN(D)
schedule           1 generator : 1 critic step        critic every iteration, generator every 5th (TTUR)
sampling           1 step at sigma_max                fixed sigmas, trained with backward simulation
=================  =================================  ==================================================

Equation numbers follow the arXiv versions (DMD: 2311.18828; DMD2: 2405.14867) as recalled in
``docs/distribution_matching.md`` (sections DMD, DMD2); it lists where the code matches the official DMD2 code.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.pairs import load_pairs, make_pairs
from ..diffusion.guidance import guided_x0
from ..diffusion.paths import EDMPath, _bcast, convert
from ..diffusion.precond import PreconditionedNet
from ..diffusion.solvers import denoise_renoise, karras_sigmas
from ..nets.heads import DiscriminatorHead
from ..utils.config import to_config
from .base import FewStepModule, Phase, load_teacher
from .consistency import FEATURE_SHAPES, PerceptualDistance

__all__ = ["DMD", "DMD2", "frozen", "REDUCTIONS"]

REDUCTIONS = ("mean", "per_sample")
REG_DISTANCES = ("l2", "lpips", "features")
GRID_SIZE = 1000  # the 1000-point Karras grid on which DMD2's code draws every noise level


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Inside the block these modules' parameters have requires_grad False (restored after), so a loss
    computed through them sends no gradient to them; gradients still flow through them to their inputs."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def reduce_loss(elementwise: Tensor, reduction: str) -> Tensor:
    """'mean': over all B*D elements (official DMD2 code); 'per_sample': sum over a sample's D elements, mean over B."""
    if reduction == "mean":
        return elementwise.mean()
    return elementwise.flatten(1).sum(1).mean()


def regression_enabled(pairs_path: str | None, reg_pairs: int, reg_weight: float) -> bool:
    """Whether L_reg (DMD Eq. 9) is on: teacher pairs given (a file or a number to make) and a positive weight."""
    return (pairs_path is not None or reg_pairs > 0) and reg_weight > 0


class DMD(PerceptualDistance, FewStepModule):
    """One-step Diffusion with Distribution Matching Distillation (Yin et al., CVPR 2024).

    Each iteration: one generator step on L_DM (+ lambda_reg L_reg), then one fake-score step on the same,
    detached, generated samples (Algorithm 1).

    Args:
        teacher_ckpt: lit_fewstep teacher checkpoint (EDM or flow matching, any path): the real score. Relative
            paths are resolved from the working directory.
        net: architecture of the generator; default (None) the teacher's, initialised from its weights. A trained
            student records the resolved value, so it loads without the teacher file.
        preconditioning, sigma_data: of the generator (see `PreconditionedNet`); default the teacher's.
        conditioning_sigma: the generator maps conditioning_sigma * z at that noise level to x̂0 (80 = sigma_max,
            as in the DMD2 code; the teacher's ODE starts there too).
        real_guidance_scale: CFG scale of the real score (1 = none, EDM2 convention); the fake score never uses CFG.
        dm_step_range: (lo, hi) fractions of the 1000-point Karras grid, counted from sigma_min, from which L_DM
            draws sigma (0.02, 0.98: t ~ U[0.02 T, 0.98 T] in the paper, grid indices 20..980 in DMD2's code).
        dm_reduction: "mean" over all B*D elements (official; dL/dx = grad / (B D)) or "per_sample"
            (sum over each sample's elements, mean over the batch; dL/dx = grad / B).
        pairs_path: regression pairs from ``python -m lit_fewstep.data.pairs`` (None: no regression loss).
        reg_weight: lambda_reg (0.25 in the paper, with LPIPS).
        reg_distance: d of L_reg: "l2" (mean squared error per sample), "lpips" (the paper's; needs
            `lpips_weights`) or "features" (the shipped digits classifier's features; 8x8 digits only).
        lpips_weights: local LPIPS-VGG file (lpips package state dict, or torchvision's vgg16-397923af.pth with
            torchmetrics' shipped heads; see `metrics.lpips.LPIPS`); nothing is downloaded.
        reg_batch_size: pairs per generator step (0: the data batch size).
        lr, betas, weight_decay: AdamW of both phases.
        ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule` (EMA of the generator only).
    """

    generator_name = "G"
    # Only the generator (and its EMA) is needed to sample: `export` drops the critic, checkpoints keep it.
    critic_prefixes: tuple[str, ...] = ("fake_score.", "head.")
    training_only_prefixes = critic_prefixes
    first_sigma_field = "conditioning_sigma"  # the setting that must equal the pairs' sigma_max

    def __init__(self, teacher_ckpt: str, net: nn.Module | None = None, preconditioning: str | None = None,
                 sigma_data: float | None = None, conditioning_sigma: float = 80.0, real_guidance_scale: float = 1.0,
                 dm_step_range: Sequence[float] = (0.02, 0.98), dm_reduction: str = "mean",
                 pairs_path: str | None = None, reg_weight: float = 0.25, reg_batch_size: int = 0,
                 reg_distance: str = "l2", lpips_weights: str | None = None,
                 lr: float = 2e-6, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.01,
                 ema_decay: float = 0.999, grad_clip: float = 10.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        self._init_common(teacher_ckpt, net, preconditioning, sigma_data, (conditioning_sigma,), real_guidance_scale,
                          dm_step_range, dm_reduction)
        self._init_regression(pairs_path, reg_weight, reg_batch_size, reg_distance, lpips_weights)
        self.phases = [
            Phase("generator", "generator_loss", ("G",), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                  updates_ema=True),
            Phase("fake_score", "critic_loss", ("fake_score",), lr=lr, betas=tuple(betas), weight_decay=weight_decay),
        ]

    # ======================================================================================= construction
    def _init_regression(self, pairs_path, reg_weight, reg_batch_size, reg_distance, lpips_weights,
                         reg_pairs: int = 0, reg_pairs_nfe: int = 15) -> None:
        """Settings of L_reg (DMD Eq. 9), shared by DMD and DMD2; the pairs load (or are made) in `prepare`."""
        if reg_weight < 0 or reg_batch_size < 0 or reg_pairs < 0 or reg_pairs_nfe < 1:
            raise ValueError(f"reg_weight, reg_batch_size, reg_pairs: must be >= 0 and reg_pairs_nfe >= 1, got "
                             f"{reg_weight}, {reg_batch_size}, {reg_pairs}, {reg_pairs_nfe}.")
        if pairs_path is not None and reg_pairs > 0:
            raise ValueError("pairs_path, reg_pairs: give a pairs file or a number of pairs to make, not both.")
        self.pairs_path, self.reg_weight, self.reg_batch_size = pairs_path, float(reg_weight), int(reg_batch_size)
        self.reg_pairs, self.reg_pairs_nfe = int(reg_pairs), int(reg_pairs_nfe)
        self.uses_regression = regression_enabled(pairs_path, self.reg_pairs, reg_weight)
        if reg_distance not in REG_DISTANCES:
            raise ValueError(f"reg_distance: choose one of {REG_DISTANCES}, got {reg_distance!r}.")
        if reg_distance == "lpips" and self.uses_regression and not lpips_weights:
            raise ValueError("lpips_weights: reg_distance 'lpips' needs a local LPIPS-VGG weights file; give "
                             "lpips_weights: PATH or set reg_distance: l2.")
        self.distance, self.huber_c, self.lpips_weights = reg_distance, 0.0, lpips_weights
        self.init_distance_networks()  # LPIPS / classifier: built at first use, never saved

    def _init_common(self, teacher_ckpt, net, preconditioning, sigma_data, generator_sigmas, real_guidance_scale,
                     dm_step_range, dm_reduction) -> None:
        """Shared by DMD, DMD2 and MSD: generator, (maybe) teacher + critic, noise grids, EMA."""
        if not isinstance(teacher_ckpt, str) or not teacher_ckpt:
            raise ValueError("teacher_ckpt: give the path of a lit_fewstep teacher checkpoint "
                             "(e.g. lit_fewstep/assets/edm_digits.pt).")
        if dm_reduction not in REDUCTIONS:
            raise ValueError(f"dm_reduction: choose one of {REDUCTIONS}, got {dm_reduction!r}.")
        lo, hi = (float(v) for v in dm_step_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"dm_step_range: need 0 <= lo < hi <= 1 (fractions of the noise grid), got {dm_step_range}.")
        sigmas = [float(s) for s in generator_sigmas]
        if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0:
            raise ValueError(f"generator_sigmas: need positive, strictly decreasing noise levels, got {list(generator_sigmas)}.")
        self.teacher_ckpt = teacher_ckpt
        self.real_guidance_scale = float(real_guidance_scale)
        self.dm_step_range, self.dm_reduction = (lo, hi), dm_reduction
        self.generator_sigmas = tuple(sigmas)
        self.max_nfe = len(sigmas)
        self.edm = EDMPath()
        # Index 0 = sigma_max = 80, index 999 = sigma_min = 0.002 (DMD2's code flips it; `grid_sigmas` converts).
        self.register_buffer("sigma_grid", karras_sigmas(GRID_SIZE, append_zero=False).float(), persistent=False)

        self.register_frozen("teacher", path=teacher_ckpt)  # the real score: frozen, never saved
        self.fake_score: nn.Module | None = None
        self.head: nn.Module | None = None
        self._fresh: tuple | None = None  # generator samples handed from the generator phase to the critic phase
        teacher = None
        if net is None or preconditioning is None or sigma_data is None:
            teacher = load_teacher(teacher_ckpt, field_name="teacher_ckpt")
            net = teacher.net if net is None else net
            preconditioning = preconditioning or teacher.preconditioning
            sigma_data = teacher.sigma_data if sigma_data is None else sigma_data
        self._build_generator(net, preconditioning, float(sigma_data))
        if teacher is not None:
            self._attach_teacher(teacher)
        self.init_ema()

    def _build_generator(self, net: nn.Module, preconditioning: str, sigma_data: float) -> None:
        self.G = PreconditionedNet(copy.deepcopy(net), preconditioning, sigma_data).requires_grad_(True).train()

    def _attach_teacher(self, teacher: PreconditionedNet) -> None:
        """Install the frozen real score, build the critic from it, and (before any training) initialise the
        generator with the teacher's weights when the architectures agree."""
        if self.G.num_classes != teacher.num_classes:
            raise ValueError(f"net: the generator has num_classes={self.G.num_classes} but the teacher "
                             f"{self.teacher_ckpt!r} has {teacher.num_classes}; use the teacher's.")
        if self.real_guidance_scale != 1.0 and teacher.num_classes == 0:
            raise ValueError("real_guidance_scale: CFG needs a class-conditional teacher trained with label dropout; "
                             "set it to 1.")
        self._attach_frozen("teacher", teacher)
        if self.fake_score is None:
            self._build_critic(teacher)
        if int(self.iteration) == 0:
            self._init_generator_from(teacher)

    def _init_generator_from(self, teacher: PreconditionedNet) -> None:
        """G_theta starts as the teacher (DMD Sec. 3.1) when it has the teacher's architecture."""
        if self._same_architecture(self.G, teacher):
            self.G.load_state_dict(teacher.state_dict())
            self.restart_emas()

    def _build_critic(self, teacher: PreconditionedNet) -> None:
        """mu_fake starts as a trainable copy of the teacher (DMD Sec. 3.2)."""
        self.fake_score = copy.deepcopy(teacher).requires_grad_(True).train()

    @staticmethod
    def _same_architecture(a: nn.Module, b: PreconditionedNet) -> bool:
        return (isinstance(a, PreconditionedNet) and to_config(a.net) == to_config(b.net)
                and a.preconditioning == b.preconditioning and a.sigma_data == b.sigma_data)

    def prepare(self) -> None:
        """Load what only training needs (teacher, critic, pair set) if construction did not. Lightning calls it
        through `configure_model`; call it yourself to use the losses outside a Trainer."""
        if self.teacher is None:
            self._attach_teacher(load_teacher(self.teacher_ckpt, field_name="teacher_ckpt"))  # checks, critic, init
        if getattr(self, "uses_regression", False) and not hasattr(self, "pair_noise"):
            self._load_pairs()
        if getattr(self, "uses_regression", False):
            if self.distance == "features" and tuple(self.data_shape) not in FEATURE_SHAPES:
                raise ValueError(f"reg_distance: 'features' is the shipped digits classifier's (samples 1 x 8 x 8 or "
                                 f"1 x 16 x 16); this teacher makes {tuple(self.data_shape)}. Choose l2 or lpips.")
            self._lpips()  # fails here, not mid-fit, when the LPIPS file is unreadable

    def configure_model(self) -> None:
        self.prepare()

    def _load_pairs(self) -> None:
        if self.pairs_path is None:  # `reg_pairs`: the teacher's ODE from the generator's own input scale, seeded
            self.hold_pairs(make_pairs(self.teacher, self.reg_pairs, nfe=self.reg_pairs_nfe,
                                       sigma_max=self.generator_sigmas[0]), field="reg_pairs")
            return
        pairs = load_pairs(self.pairs_path, field="pairs_path")
        if abs(float(pairs["sigma_max"]) - self.generator_sigmas[0]) > 1e-6:
            field = self.first_sigma_field
            raise ValueError(f"pairs_path: pairs start at sigma_max={pairs['sigma_max']} but {field}="
                             f"{self.generator_sigmas[0]}; set {field} to {pairs['sigma_max']}.")
        self.hold_pairs(pairs)

    @property
    def init_config(self) -> dict:
        """Record the architecture read from the teacher file, so a trained student loads without it."""
        config = super().init_config
        args = config["init_args"]
        for name, value in self._resolved_args().items():
            if args.get(name) is None:
                args[name] = to_config(value)
        return config

    def _resolved_args(self) -> dict:
        return {"net": self.G.net, "preconditioning": self.G.preconditioning, "sigma_data": self.G.sigma_data}

    def state_dict_to_save(self) -> dict[str, Tensor]:
        return {k: v for k, v in super().state_dict_to_save().items() if not k.startswith(self.critic_prefixes)}

    # ======================================================================================= pieces
    def grid_sigmas(self, n: int, fraction_range: Sequence[float] = (0.0, 1.0)) -> Tensor:
        """n noise levels drawn uniformly from the 1000-point Karras grid within `fraction_range`.

        Fractions count from sigma_min (t = 0), for every range of DMD, DMD2 and MSD: as the paper's
        t ~ U[0.02 T, 0.98 T] and as DMD2's code, whose grid index i runs from sigma_min and is drawn from
        int(lo * 1000) to int(hi * 1000) inclusive (20..980 for (0.02, 0.98); capped at 999). Our grid runs from
        sigma_max, so that set is indices 999 - i."""
        from_min_lo = int(fraction_range[0] * GRID_SIZE)
        from_min_hi = min(int(fraction_range[1] * GRID_SIZE), GRID_SIZE - 1)
        lo, hi = GRID_SIZE - 1 - from_min_hi, GRID_SIZE - 1 - from_min_lo
        return self.sigma_grid[self.randint(lo, hi + 1, (n,), self.sigma_grid)]

    def _unpack(self, batch) -> tuple[Tensor, Tensor | None]:
        x, cond = self.split_batch(batch)
        return x, cond.class_labels

    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.num_classes > 0 else None

    def real_score(self, x_t: Tensor, sigma: Tensor, y: Tensor | None) -> Tensor:
        """mu_real(x_t, sigma): the frozen teacher's denoiser, CFG-guided when real_guidance_scale != 1
        (`diffusion.guidance.guided_x0`; conditional and null-label passes one after the other)."""
        return guided_x0(self.teacher, x_t, sigma, y, self.real_guidance_scale, path=self.edm, batched=False)

    def generate(self, batch, grad: bool) -> tuple[Tensor, Tensor | None]:
        """x̂0 = G(sigma_0 z, sigma_0) with the batch's class labels (one step). Returns (x̂0, labels)."""
        x_real, y = self._unpack(batch)
        y = self._labels(y)
        sigma = self.generator_sigmas[0]
        z = self.randn(x_real.shape, x_real)
        with torch.set_grad_enabled(grad):
            return self.G.x0_from(sigma * z, torch.full((z.shape[0],), sigma, device=z.device), self.edm,
                               class_labels=y), y

    def dm_gradient(self, x: Tensor, y: Tensor | None) -> Tensor:
        """DMD Eq. 7-8 on the EDM path (no gradient):
            grad = w (s_fake - s_real)(x_t),  w = sigma^2 C S / ||mu_real(x_t) - x||_1,  s = (mu - x_t) / sigma^2
                 = (mu_fake(x_t) - mu_real(x_t)) / mean_i |x - mu_real(x_t)|     (per sample; NaN -> 0),
        with x_t = x + sigma eps and sigma drawn from `dm_step_range` of the Karras grid."""
        with torch.no_grad():
            x = x.detach()
            sigma = self.grid_sigmas(x.shape[0], self.dm_step_range)
            x_t = self.edm.noise(x, self.randn(x.shape, x), sigma)
            mu_real = self.real_score(x_t, sigma, y)
            mu_fake = self.fake_score.x0_from(x_t, sigma, self.edm, class_labels=y)
            w = 1.0 / (x - mu_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            return torch.nan_to_num(w * (mu_fake - mu_real))

    def distribution_matching_loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        """Surrogate of DMD Eq. 7: L_DM = 1/2 ||x - sg(x - grad)||^2 reduced by `dm_reduction`, so that
        dL_DM/dx = grad / (B D) ("mean") or grad / B ("per_sample"); no gradient enters either score network."""
        grad = self.dm_gradient(x, y)
        return reduce_loss(0.5 * (x - (x - grad).detach()) ** 2, self.dm_reduction)

    def fake_score_loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        """DMD Eq. 6: ||mu_fake(x_t, sigma) - sg(x)||^2 on generator samples, with EDM's weight
        lambda = 1/sigma^2 + 1/sigma_d^2 and sigma uniform on the Karras grid (DMD2 code); mean over elements."""
        x = x.detach()
        sigma = self.grid_sigmas(x.shape[0])
        x_t = self.edm.noise(x, self.randn(x.shape, x), sigma)
        mu = self.fake_score.x0_from(x_t, sigma, self.edm, class_labels=y)
        weight = _bcast(1.0 / sigma**2 + 1.0 / self.fake_score.sigma_data**2, x)
        return (weight * (mu - x) ** 2).mean()

    def regression_loss(self) -> Tensor:
        """DMD Eq. 9: L_reg = E_(z, y) d(G(z), y) on the teacher's ODE pairs, d = `reg_distance` (LPIPS in the
        paper; "l2": mean squared error per sample; "features": the digits classifier's), averaged over
        `reg_batch_size` random pairs."""
        n = self.reg_batch_size or 64
        z, target, labels = self.random_pairs(n)
        sigma = torch.full((n,), self.generator_sigmas[0], device=z.device)
        x = self.G.x0_from(_bcast(sigma, z) * z, sigma, self.edm, class_labels=labels)
        return self.distance_between(x, target).mean()

    def with_regression(self, loss: Tensor, batch) -> Tensor:
        """loss + lambda_reg L_reg when a pair set is given (else loss unchanged); logs train/reg_loss."""
        if not self.uses_regression:
            return loss
        if self.reg_batch_size == 0:
            self.reg_batch_size = int(self._unpack(batch)[0].shape[0])
        reg = self.regression_loss()
        self._log("reg_loss", reg)
        return loss + self.reg_weight * reg

    def _log(self, name: str, value: Tensor) -> None:
        if self._trainer is not None:
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False)

    # ======================================================================================= phases
    def generator_loss(self, batch) -> Tensor:
        """DMD Eq. 10 (final objective): L_G = L_DM + lambda_reg L_reg; the fake score sees no gradient."""
        with frozen(self.fake_score):
            x, y = self.generate(batch, grad=True)
            loss = self.distribution_matching_loss(x, y)
            self._log("dm_loss", loss)
            loss = self.with_regression(loss, batch)
        self._fresh = (x.detach(), y)
        return loss

    def critic_loss(self, batch) -> Tensor:
        """mu_fake's denoising loss on the samples of this iteration's generator step (made before that step,
        as in Algorithm 1), or on fresh ones when the generator did not step."""
        x, y = self._fresh if self._fresh is not None else self.generate(batch, grad=False)
        self._fresh = None
        return self.fake_score_loss(x, y)

    # ======================================================================================= sampling
    def sample(self, n, nfe, class_labels=None, generator=None, use_ema=True, **options):
        # The multi-step chain re-noises: draw that noise from the same seeded generator as the start noise.
        return super().sample(n, nfe, class_labels, generator, use_ema, noise_generator=generator, **options)

    def sampling_sigmas(self, nfe: int) -> tuple[float, ...]:
        """The first `nfe` fixed generator sigmas: a prefix of the training chain, so with backward simulation every
        input the sampler makes is one the generator was trained on (the output is that step's x̂0)."""
        return self.generator_sigmas[:nfe]

    def chain(self, net: nn.Module, x: Tensor, sigmas: Sequence[float], y: Tensor | None,
              noise_generator: torch.Generator | None = None) -> Tensor:
        """DMD2 Sec. 4.5 multi-step sampling: x̂0 = G(x, sigma_i), then x = x̂0 + sigma_(i+1) eps with fresh eps;
        the input x is already at sigma_0 (`diffusion.solvers.denoise_renoise`, the step consistency models'
        multistep sampling shares). One network evaluation per sigma; returns the last x̂0."""
        return denoise_renoise(lambda x_t, t: net.x0_from(x_t, t, self.edm, class_labels=y), x, sigmas, self.edm,
                               lambda like: self._noise_like(like, noise_generator))

    def _noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fresh re-noising noise: from `generator` when sampling, else the base's resume/DDP-exact training draw."""
        return self.randn(x.shape, x, generator)

    def _sample(self, noise, class_labels, nfe, net, noise_generator: torch.Generator | None = None):
        sigmas = self.sampling_sigmas(nfe)
        y = self._labels(class_labels)
        return self.chain(net, sigmas[0] * noise, sigmas, y, noise_generator), len(sigmas)


class DMD2(DMD):
    """Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024). Differences from `DMD`:

    1. no regression loss and no pair set (by default: `pairs_path` or `reg_pairs` adds DMD's L_reg on the first
       generator step, outside the paper; a cheap signal early in training, when the fake score has not yet learnt the
       generator's distribution and L_DM is near zero);
    2. two time-scale update rule: the critic (fake score + GAN head) steps every iteration, the generator on
       every `generator_every`-th (5 in the paper), both with the same learning rate;
    3. GAN: `head` classifies `fake_score`'s bottleneck features of real and generated images, both
       forward-noised; non-saturating loss, weight `gan_generator_weight` in the generator's loss and
       `gan_critic_weight` in the critic's;
    4. multi-step generator on fixed `generator_sigmas`, trained on inputs from its own chain
       (`backward_simulation`) or, for the ablation, on forward-noised real images.

    Loss weights are tied to the reduction: with dm_reduction="mean" dL_DM/dx scales as 1/D while the GAN
    gradient does not, so the paper's 3e-3 is for D = 3x64x64. For small data rescale by matching the two
    gradient norms on the generated image (`gradient_norms`), the author's recipe.

    Args (beyond `DMD`'s):
        generator_sigmas: the fixed noise levels of the multi-step generator, decreasing; (80,) = one step.
        backward_simulation: inputs at sigma_k > sigma_0 come from the generator's own chain (True) or from
            forward-noised real data (False, the ablation).
        generator_every: generator step on every n-th iteration (TTUR ratio; 5 for ImageNet, 10 for SD 1.5).
        gan_generator_weight: lambda_G (3e-3 ImageNet 64 with "mean"); 0 disables the GAN (and the head's loss).
        gan_critic_weight: lambda_D (1e-2), added to the fake-score loss.
        gan_step_range: fractions of the Karras grid from which the GAN's noise levels are drawn (whole grid).
        pairs_path, reg_weight, reg_batch_size, reg_distance, lpips_weights: DMD's regression loss (see `DMD`);
            pairs_path None (default): none. The pairs must start at generator_sigmas[0].
        reg_pairs, reg_pairs_nfe: instead of a file, make this many pairs when training starts (the teacher's EDM
            Heun ODE with reg_pairs_nfe evaluations from generator_sigmas[0] * z, seed 0; not saved, made again on
            resume), so their cost is inside the fit's time. 0 (default): none.
        critic_lr: learning rate of the critic (fake score + head); None: `lr`, as in the paper. A faster critic
            tracks the moving generator in fewer steps (two time-scale learning rates, Heusel et al. 2017).
    """

    def __init__(self, teacher_ckpt: str, net: nn.Module | None = None, preconditioning: str | None = None,
                 sigma_data: float | None = None, generator_sigmas: Sequence[float] = (80.0,),
                 backward_simulation: bool = True, generator_every: int = 5, gan_generator_weight: float = 3e-3,
                 gan_critic_weight: float = 1e-2, gan_step_range: Sequence[float] = (0.0, 1.0),
                 real_guidance_scale: float = 1.0, dm_step_range: Sequence[float] = (0.02, 0.98),
                 dm_reduction: str = "mean", lr: float = 2e-6, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 0.01, ema_decay: float = 0.999, grad_clip: float = 10.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100, critic_lr: float | None = None, pairs_path: str | None = None,
                 reg_weight: float = 0.25, reg_batch_size: int = 0, reg_distance: str = "l2",
                 lpips_weights: str | None = None, reg_pairs: int = 0, reg_pairs_nfe: int = 15):
        FewStepModule.__init__(self, ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if generator_every < 1:
            raise ValueError(f"generator_every: must be >= 1 (critic steps per generator step), got {generator_every}.")
        if critic_lr is not None and not critic_lr > 0:
            raise ValueError(f"critic_lr: must be > 0 (or null for lr), got {critic_lr}.")
        if gan_generator_weight < 0 or gan_critic_weight < 0:
            raise ValueError("gan_generator_weight, gan_critic_weight: must be >= 0.")
        self.uses_gan = gan_generator_weight > 0
        self.gan_generator_weight, self.gan_critic_weight = float(gan_generator_weight), float(gan_critic_weight)
        self.gan_step_range = tuple(float(v) for v in gan_step_range)
        self.backward_simulation = bool(backward_simulation)
        self._init_regression(pairs_path, reg_weight, reg_batch_size, reg_distance, lpips_weights, reg_pairs,
                              reg_pairs_nfe)
        self._init_common(teacher_ckpt, net, preconditioning, sigma_data, generator_sigmas, real_guidance_scale,
                          dm_step_range, dm_reduction)
        self.phases = [
            Phase("generator", "generator_loss", ("G",), every=generator_every, lr=lr, betas=tuple(betas),
                  weight_decay=weight_decay, updates_ema=True),
            Phase("critic", "critic_loss", ("fake_score", "head") if self.uses_gan else ("fake_score",),
                  lr=lr if critic_lr is None else float(critic_lr), betas=tuple(betas), weight_decay=weight_decay),
        ]

    first_sigma_field = "generator_sigmas[0]"

    def _build_critic(self, teacher: PreconditionedNet) -> None:
        super()._build_critic(teacher)
        self.head = DiscriminatorHead(self._feature_channels(teacher)) if self.uses_gan else None

    @staticmethod
    def _feature_channels(net: nn.Module) -> int:
        inner = getattr(net, "net", net)
        if not hasattr(inner, "feature_channels"):
            raise ValueError("gan_generator_weight: the GAN head needs a network with bottleneck features "
                             "(lit_fewstep.nets MLP/UNet/DiT); set gan_generator_weight: 0.")
        return int(inner.feature_channels)

    # ------------------------------------------------------------------------------------- generator input
    def generate(self, batch, grad: bool) -> tuple[Tensor, Tensor | None]:
        """x̂0 of one training step k ~ U{0..K-1} of the fixed chain (one k per batch, as in the official code).

        Input at sigma_0: sigma_0 z. Input at sigma_k, k > 0 (DMD2 Sec. 4.5): with backward simulation, the current
        generator's own chain run from noise for k steps without gradient, re-noised to sigma_k with independent
        noise; without it, real data forward-noised to sigma_k."""
        x_real, y = self._unpack(batch)
        y = self._labels(y)
        sigmas = self.generator_sigmas
        k = self.draw_step()
        x_in = sigmas[0] * self.randn(x_real.shape, x_real)
        if k > 0 and self.backward_simulation:
            with torch.no_grad():
                x0 = self.chain(self.G, x_in, sigmas[:k], y)
            x_in = x0 + sigmas[k] * self._noise_like(x0)
        elif k > 0:
            x_in = x_real + sigmas[k] * self._noise_like(x_real)
        sigma_k = torch.full((x_in.shape[0],), sigmas[k], device=x_in.device, dtype=x_in.dtype)
        with torch.set_grad_enabled(grad):
            return self.G.x0_from(x_in, sigma_k, self.edm, class_labels=y), y

    def draw_step(self) -> int:
        """The training step k ~ U{0..K-1} of the fixed chain, one draw shared by all DDP ranks (official code)."""
        K = len(self.generator_sigmas)
        return int(self.randint(0, K, (1,), self.sigma_grid, shared=True)) if K > 1 else 0

    # ------------------------------------------------------------------------------------- GAN
    def gan_logits(self, x: Tensor, y: Tensor | None) -> Tensor:
        """D(F(x_sigma, sigma)): the head on fake_score's bottleneck features at x_sigma = x + sigma eps, sigma drawn
        from `gan_step_range` of the Karras grid (a diffusion GAN)."""
        sigma = self.grid_sigmas(x.shape[0], self.gan_step_range)
        x_t = self.edm.noise(x, self.randn(x.shape, x), sigma)
        x_own, t_own = convert(x_t, sigma, self.edm, self.fake_score.path)
        _, features = self.fake_score(x_own, t_own, class_labels=y, return_features=True)
        return self.discriminate(features, y)

    def discriminate(self, features: Tensor, y: Tensor | None) -> Tensor:
        """Logits of the GAN head (unconditional: the features already carry the class through the fake score)."""
        return self.head(features)

    def gan_generator_loss(self, x: Tensor, y: Tensor | None) -> Tensor:
        """DMD2 Eq. 2, generator side, non-saturating: E softplus(-D(F(G(z)_t, t)))."""
        return F.softplus(-self.gan_logits(x, y)).mean()

    def gan_critic_loss(self, x_fake: Tensor, x_real: Tensor, y_fake, y_real) -> Tensor:
        """DMD2 Eq. 2, classifier side: E softplus(D(F(G(z)_t))) + E softplus(-D(F(x_t))), each noised on its own."""
        n = x_fake.shape[0]
        both = self.gan_logits(torch.cat([x_fake.detach(), x_real]),
                               None if y_fake is None else torch.cat([y_fake, y_real]))
        return F.softplus(both[:n]).mean() + F.softplus(-both[n:]).mean()

    # ------------------------------------------------------------------------------------- phases
    def generator_loss(self, batch) -> Tensor:
        """DMD2 Sec. 4: L_G = L_DM + lambda_G L_GAN(G) (+ lambda_reg L_reg with `pairs_path`); critic (fake score
        and head) frozen: no gradient reaches it."""
        with frozen(self.fake_score, self.head):
            x, y = self.generate(batch, grad=True)
            loss = self.distribution_matching_loss(x, y)
            self._log("dm_loss", loss)
            if self.uses_gan:
                gan = self.gan_generator_loss(x, y)
                self._log("gan_g_loss", gan)
                loss = loss + self.gan_generator_weight * gan
            loss = self.with_regression(loss, batch)
        self._fresh = (x.detach(), y)
        return loss

    def critic_loss(self, batch) -> Tensor:
        """L_fake + lambda_D L_GAN(D), one optimizer over fake score and head (official code), on the generator's
        samples of this iteration (detached) and a real batch."""
        x, y = self._fresh if self._fresh is not None else self.generate(batch, grad=False)
        self._fresh = None
        loss = self.fake_score_loss(x, y)
        self._log("fake_loss", loss)
        if self.uses_gan:
            x_real, y_real = self._unpack(batch)
            gan = self.gan_critic_loss(x, x_real, y, self._labels(y_real))
            self._log("gan_d_loss", gan)
            loss = loss + self.gan_critic_weight * gan
        return loss

    def gradient_norms(self, batch) -> dict[str, float]:
        """Per-sample norms of dL_DM/dx and d(L_GAN(G))/dx on the generated image (mean over the batch): set
        gan_generator_weight near their ratio (DMD2 issue #73 recipe), then search x/÷ 3."""
        x, y = self.generate(batch, grad=False)
        x = x.detach().requires_grad_(True)
        with frozen(self.fake_score, self.head):
            g_dm, = torch.autograd.grad(self.distribution_matching_loss(x, y), x)
            g_gan, = torch.autograd.grad(self.gan_generator_loss(x, y), x)
        norm = lambda g: float(g.flatten(1).norm(dim=1).mean())  # noqa: E731
        return {"dm": norm(g_dm), "gan": norm(g_gan), "ratio": norm(g_dm) / max(norm(g_gan), 1e-30)}
