"""Guided distillation (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion Models").

A classifier-free guided teacher needs two network evaluations per step and many steps. Meng et al. distill it in
two stages into one network that takes the guidance strength as an input and samples in a few steps:

1. **Guidance distillation.** One student x̂(z_t, w) (the teacher's network plus a Fourier embedding of the guidance
   weight, `nets` built with ``guidance_embed=True``) regresses the guided teacher's data prediction for weights drawn
   uniformly over a range: E_{w, t, x, eps} omega(lambda_t) ||x̂(z_t, w) - x̂^w(z_t)||^2.
2. **Progressive distillation** (Salimans & Ho 2022) of that w-conditioned model: a student with N/2 DDIM steps learns
   to land, in one step t -> t'', where two DDIM steps t -> t' -> t'' of the previous model (N steps) land. With
   z'' the previous model's state after its two steps, the student's data target is the x̃ that makes one DDIM step
   from z_t arrive at z'':
       x̃ = (z'' - (b(t'') / b(t)) z_t) / (a(t'') - (b(t'') / b(t)) a(t)).
   N is halved stage after stage (e.g. 16 -> 8 -> 4 -> 2 -> 1) within one fit; each student starts from the
   previous one, which stays frozen in memory as the next stage's teacher.

Conventions (one inside, converted at the edges):

- Guidance: the package's EDM2 scale s (s = 1: no guidance); Meng's weight is w = s - 1, their
  (1 + w) x̂_c - w x̂_u being `diffusion.guidance.guided_x0` at scale 1 + w. The student's ``guidance`` input is s.
- Time: the variance-preserving cosine path z_t = cos(pi t / 2) x + sin(pi t / 2) eps (`VPCosinePath`), t uniform
  between the times of `sigma_min` and `sigma_max` (EDM sigma = b / a = exp(-log-SNR / 2)): uniform in this t is
  the cosine log-SNR schedule of the progressive-distillation code, clipped to [-2 ln sigma_max, -2 ln sigma_min].
  The N-step grid is t_i = t_max (1 - i / N), ending at t = 0, where a DDIM step returns the data prediction.
  Networks on another path (the shipped EDM teachers, a student with EDM preconditioning) are queried through
  `PreconditionedNet.x0_from`, which converts the state.
- Weighting: omega = max(SNR, 1) on the data-prediction error (PD's "snr_trunc", SNR = a^2 / b^2), in both stages
  (`weighting="snr_trunc"`; "constant" is plain x-MSE). Losses are means over elements.

Networks: ``student`` (trained; `generator_name`), ``teacher`` (the CFG teacher, frozen, from `teacher_ckpt`, never
saved), ``previous`` (the previous stage's model during progressive distillation: frozen, in memory, saved in
training checkpoints so a run resumed inside a stage is exact; an exported model drops it).

Notes (conventions, what the original code does, what is not reproduced): docs/guided_distillation.md.
"""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from ..diffusion.guidance import guided_x0
from ..diffusion.paths import VPCosinePath, _bcast
from ..diffusion.paths import vp_cosine_time as vp_time  # the EDM sigma's VP cosine time, (2 / pi) atan(sigma)
from ..diffusion.precond import PreconditionedNet
from ..diffusion.solvers import (DDIMHeunStep, DDIMStep, NFECounter, SamplerState, StochasticDDIMStep, gaussian_noise,
                                 run_steps)
from ..utils.config import instantiate, to_config
from .base import FewStepModule, Phase, Stage, load_teacher

__all__ = ["GuidedDistillation", "halving_schedule", "pd_target", "vp_time"]

WEIGHTINGS = ("snr_trunc", "constant")
# `first_halving_solver`: the step of the first halving's teacher (the stage-1 model)
FIRST_HALVING_SOLVERS = {"ddim": DDIMStep, "heun": DDIMHeunStep}
# `guidance_trains`: what stage 1's optimizer steps
GUIDANCE_TRAINS = ("all", "embedding", "adapter")
# the UNet's per-block guidance adapters (`guidance_adapter`, `guidance_rank`): what "adapter" trains besides the embedding
ADAPTER_MODULES = ("guidance_affine", "guidance_branch")


def halving_schedule(teacher_steps: int, final_steps: int = 1) -> list[int]:
    """Student step counts of progressive distillation: teacher_steps / 2, / 4, ... down to final_steps.

    teacher_steps and final_steps must be powers of two with final_steps < teacher_steps (16, 1 -> [8, 4, 2, 1])."""
    def power_of_two(n) -> bool:
        return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0

    if not power_of_two(teacher_steps) or not power_of_two(final_steps) or final_steps >= teacher_steps:
        raise ValueError(f"teacher_steps, final_steps: need powers of two with final_steps < teacher_steps "
                         f"(e.g. 16 and 1), got {teacher_steps} and {final_steps}.")
    steps, n = [], teacher_steps
    while n > final_steps:
        n //= 2
        steps.append(n)
    return steps


def pd_target(z_t: Tensor, t: Tensor, z_end: Tensor, t_end: Tensor, path) -> Tensor:
    """Progressive distillation's data target (Salimans & Ho 2022, Meng et al. 2023): the x̃ for which one DDIM step
    from z_t at t lands on z_end at t_end,
        x̃ = (z_end - (b(t_end) / b(t)) z_t) / (a(t_end) - (b(t_end) / b(t)) a(t)).
    At t_end = 0 (b = 0, a = 1) it is z_end itself."""
    ratio = _bcast(path.b(t_end) / path.b(t), z_t)
    return (z_end - ratio * z_t) / (_bcast(path.a(t_end), z_t) - ratio * _bcast(path.a(t), z_t))


class GuidedDistillation(FewStepModule):
    """Meng et al. 2023: guidance distillation into a w-conditioned student, then progressive distillation.

    Args:
        teacher_ckpt: a class-conditional lit_fewstep teacher trained with label dropout (EDM or flow matching, any
            path), the classifier-free guided model to distill.
        net: the student's network, built with ``guidance_embed=True``; default (None) the teacher's architecture with
            a guidance embedding added, initialised from the teacher's weights and with the guidance embedding's
            output layer at zero (so the student starts as the teacher's conditional model at every w). A trained
            student records the resolved value, so it loads without the teacher file.
        preconditioning, sigma_data: of the student (see `PreconditionedNet`); default the teacher's (the paper's
            models predict x / v on the VP path: ``"vp_v"``).
        guidance_range: (lo, hi) of the EDM2 guidance scale drawn uniformly per training sample (Meng's w + 1; the
            paper's w in [0, 4] is (1, 5)).
        unguided_fraction: the share of each batch trained at exactly scale 1 (Meng's w = 0, the conditional model
            unguided) instead of a draw from `guidance_range`, in stage 1 and, unless `halving_unguided_fraction`
            says otherwise, in the halvings (0: the paper's uniform draw). Not in
            the paper: a point that users sample at as often as any other gets more than the measure-zero share a
            uniform draw gives it, which on digits is where the students lag the teacher most.
        halving_unguided_fraction: the same share in the halvings (stage 2); None (default): `unguided_fraction`.
            0 with a stage-1 share gives stage 1 the extra w = 0 training and leaves the halvings the paper's draw:
            on digits stage 1 gains at w = 0 for nothing, while a share in the halvings costs the students at w = 1.
        guidance_scale: the default scale at sampling (2.0 = Meng's w = 1).
        guidance_iterations: iterations of stage 1 (guidance distillation).
        teacher_steps: N of the first progressive stage: the stage-1 model taken with N DDIM steps as teacher of an
            N/2-step student; 0 skips stage 2 (a w-conditioned model sampled with any number of DDIM steps).
        final_steps: the last student's steps (power of two below teacher_steps).
        halving_iterations: iterations per halving; the last stage runs on until the trainer stops.
        sigma_min, sigma_max: the EDM noise levels b / a at the ends of the VP time range (log-SNR clipping).
        weighting: "snr_trunc" (max(SNR, 1) x-MSE, the paper's) or "constant" (x-MSE).
        lr, betas, weight_decay: Adam(W) of every stage (each stage gets a fresh optimizer, as each halving in PD).
        ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`. With an EMA, a stage's frozen
            previous model and the new student's start are the EMA weights.
        lr_decay_after: EDM2's inverse-square-root learning-rate decay within each stage, lr / sqrt(k / this) after
            the stage's k-th step (0: constant lr; `Phase.decay_after`). Each stage starts again at the full lr.
            With `lr_anneal` it applies to stage 1 only.
        lr_anneal: anneal the lr linearly to zero over each halving's `halving_iterations`, as the
            progressive-distillation code does (`learning_rate_anneal_type='linear'` over the steps of one
            distillation iteration), in place of `lr_decay_after` there; stage 1 is not annealed. The last stage
            anneals over `final_iterations`.
        final_iterations: the planned length of the last stage, which runs until the trainer stops: what
            `lr_anneal` anneals it over (None: `halving_iterations`, the code's last halving being as long as the
            others). Set it when the config trains the last stage longer, or its lr reaches zero early.
        guidance_lr_anneal: anneal stage 1's lr linearly to zero over `guidance_iterations` as well, in place of
            `lr_decay_after` there (the papers do not say how stage 1's lr goes).
        guidance_warmup: stage 1's lr rises linearly over its first this many steps (0: none). The student starts as
            the conditional teacher; learning w > 0 first moves its unguided (w = 0) prediction far from that start,
            and stage 1 spends the rest of its iterations climbing back. A warm-up delays both (on digits it trades
            w = 0 for w = 1; off in the configs).
        pin_unguided: pin the student's guidance embedding at zero at scale 1 (Meng's w = 0): its term becomes
            E_w(s) - E_w(1) (`ConditionEmbedding`'s ``guidance_null``; no new parameters), so learning w > 0 can move
            the unguided prediction only through the weights all scales share. With the default `net` the student is
            built so; a given `net` must have ``guidance_null=1.0``. Not in the paper, whose Fourier embedding of w
            is not zero at w = 0.
        clip_x0: at sampling, clip every data prediction to [-clip_x0, clip_x0] before the step uses it (the
            progressive-distillation code's ``clip_x``, on for its image models; 1.0 for images in [-1, 1]); None:
            no clipping. Training never clips (the code's losses call the model with ``clip_x=False``).
        guidance_trains: what stage 1 trains: "all" (the paper: every weight of the student) or "embedding" (the
            guidance embedding alone, every weight the student shares with the teacher frozen until the halvings,
            which train all of it). With `pin_unguided` the stage-1 model is then the conditional teacher exactly at
            w = 0, however long stage 1 runs; w > 0 is learned through the guidance term of the conditioning vector
            only. "adapter": the guidance embedding and per-block modulation layers of the student's own for guidance
            (a UNet built with ``guidance_adapter=True``, the default student so when this is chosen; needs
            `pin_unguided`), fed the change guidance makes to the conditioning and zero at w = 0: stage 1 is still
            the teacher exactly at w = 0, with more room than the embedding alone to learn w > 0. Not in the paper.
        guidance_rank: with `guidance_trains` "adapter" and the default `net`, each adapter also gets a gated
            convolutional branch of this many channels (``UNet(guidance_rank=...)``; 0: modulation layers only). The
            branch stays in the student after stage 1, so it adds to the cost of every step.
        first_halving_solver: the solver of the first halving's two teacher steps, taken by the stage-1 model:
            "ddim" (the paper) or "heun" (`DDIMHeunStep`: Karras et al.'s second-order step in DDIM's coordinates,
            2 evaluations per step, the step to t = 0 DDIM's). The first halving's student then learns the stage-1
            model's ODE rather than its `teacher_steps`-step DDIM discretization, whose error every later student
            inherits (on digits the unguided teacher on the 64-step DDIM grid is 1.15x its 35-step Heun FID). The
            later halvings keep DDIM, the step their teachers (students themselves) were trained for. Not in the
            paper.
    """

    generator_name = "student"
    unsaved_prefixes = ("teacher.",)

    def __init__(self, teacher_ckpt: str, net: nn.Module | None = None, preconditioning: str | None = None,
                 sigma_data: float | None = None, guidance_range: Sequence[float] = (1.0, 5.0),
                 guidance_scale: float = 2.0, guidance_iterations: int = 1000, teacher_steps: int = 16,
                 final_steps: int = 1, halving_iterations: int = 1000, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, weighting: str = "snr_trunc", lr: float = 1e-4,
                 betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0, ema_decay: float = 0.0,
                 grad_clip: float = 1.0, nonfinite: str = "stop", max_consecutive_skips: int = 100,
                 lr_decay_after: int = 0, clip_x0: float | None = None, lr_anneal: bool = False,
                 final_iterations: int | None = None, guidance_lr_anneal: bool = False, guidance_warmup: int = 0,
                 pin_unguided: bool = False, unguided_fraction: float = 0.0,
                 halving_unguided_fraction: float | None = None, guidance_trains: str = "all",
                 guidance_rank: int = 0, first_halving_solver: str = "ddim"):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if not isinstance(teacher_ckpt, str) or not teacher_ckpt:
            raise ValueError("teacher_ckpt: give the path of a class-conditional lit_fewstep teacher "
                             "(e.g. lit_fewstep/assets/edm_digits.pt).")
        lo, hi = (float(v) for v in guidance_range)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"guidance_range: need 0 <= lo <= hi (EDM2 scales, 1 = no guidance), got {guidance_range}.")
        if guidance_trains not in GUIDANCE_TRAINS:
            raise ValueError(f"guidance_trains: what stage 1 trains, one of {GUIDANCE_TRAINS}, got "
                             f"{guidance_trains!r}.")
        if guidance_trains == "adapter" and not pin_unguided:
            raise ValueError("guidance_trains: 'adapter' keeps the stage-1 model the teacher at w = 0 only with the "
                             "guidance embedding pinned there; set pin_unguided: true.")
        if first_halving_solver not in FIRST_HALVING_SOLVERS:
            raise ValueError(f"first_halving_solver: the first halving's teacher steps, one of "
                             f"{tuple(FIRST_HALVING_SOLVERS)}, got {first_halving_solver!r}.")
        if halving_unguided_fraction is None:
            halving_unguided_fraction = unguided_fraction
        for name, share in (("unguided_fraction", unguided_fraction),
                            ("halving_unguided_fraction", halving_unguided_fraction)):
            if not 0.0 <= share < 1.0:
                raise ValueError(f"{name}: the share of each batch trained at scale 1 (w = 0), in [0, 1), got {share}.")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0: a positive bound on the data prediction at sampling (1.0 for images in "
                             f"[-1, 1]) or None for no clipping, got {clip_x0}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: choose one of {WEIGHTINGS}, got {weighting!r}.")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        if guidance_iterations < 1 or halving_iterations < 1:
            raise ValueError(f"guidance_iterations, halving_iterations: must be >= 1, got {guidance_iterations}, "
                             f"{halving_iterations}.")
        if guidance_warmup < 0:
            raise ValueError(f"guidance_warmup: stage 1's lr warm-up in steps, >= 0 (0: none), got {guidance_warmup}.")
        if final_iterations is not None and final_iterations < 1:
            raise ValueError(f"final_iterations: the last stage's planned length, >= 1 (or None for "
                             f"halving_iterations), got {final_iterations}.")
        self.teacher_ckpt = teacher_ckpt
        self.guidance_range = (lo, hi)
        self.unguided_fraction = float(unguided_fraction)
        self.halving_unguided_fraction = float(halving_unguided_fraction)
        self.guidance_scale = float(guidance_scale)
        self.weighting = weighting
        self.first_halving_solver = first_halving_solver
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        self.path = VPCosinePath()
        self.t_min, self.t_max = vp_time(sigma_min), vp_time(sigma_max)
        self.student_steps = halving_schedule(teacher_steps, final_steps) if teacher_steps else []

        self.register_frozen("teacher", path=teacher_ckpt)
        self.previous: nn.Module | None = None
        teacher = None
        if net is None or preconditioning is None or sigma_data is None:
            teacher = load_teacher(teacher_ckpt, field_name="teacher_ckpt")
            if net is None:
                config = to_config(teacher.net)
                config["init_args"]["guidance_embed"] = True
                if pin_unguided:
                    config["init_args"]["guidance_null"] = 1.0
                if guidance_trains == "adapter" and "guidance_adapter" in inspect.signature(
                        type(teacher.net).__init__).parameters:
                    config["init_args"]["guidance_adapter"] = True
                    if guidance_rank:
                        config["init_args"]["guidance_rank"] = int(guidance_rank)
                net = instantiate(config)
            preconditioning = preconditioning or teacher.preconditioning
            sigma_data = teacher.sigma_data if sigma_data is None else sigma_data
        if not getattr(net, "guidance_embed", False):
            raise ValueError("net: the student takes the guidance scale as input; build its network with "
                             "guidance_embed=True (or leave net empty to use the teacher's).")
        if pin_unguided and getattr(getattr(net, "cond", None), "guidance_null", None) != 1.0:
            raise ValueError("pin_unguided: the student's guidance embedding is pinned at zero at scale 1; build its "
                             "network with guidance_null=1.0 (or leave net empty to use the teacher's).")
        if guidance_trains == "adapter" and not getattr(net, "guidance_adapter", False):
            raise ValueError("guidance_trains: 'adapter' trains the student's guidance adapters; build its network "
                             "with guidance_adapter=True (a UNet; or leave net empty to use the teacher's).")
        self.student = PreconditionedNet(copy.deepcopy(net), preconditioning, float(sigma_data))
        if self.student.num_classes == 0:
            raise ValueError("net: guided distillation distills classifier-free guidance, which needs a "
                             "class-conditional network (num_classes > 0) and teacher.")
        self.init_ema()
        kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, decay_after=lr_decay_after, updates_ema=True)

        def annealed(length: int) -> dict:  # the PD code's linear anneal to zero, in place of the 1/sqrt decay
            return dict(kw, decay_after=0, anneal=length)

        stage1 = dict(annealed(guidance_iterations) if guidance_lr_anneal else kw, warmup=guidance_warmup)
        stages = [Stage("guidance", 0, guidance_iterations if self.student_steps else None,
                        [Phase("guidance", "guidance_loss", self._stage1_networks(guidance_trains), **stage1)])]
        start = guidance_iterations
        for k, steps in enumerate(self.student_steps):
            last = k == len(self.student_steps) - 1
            stop = None if last else start + halving_iterations
            length = (final_iterations or halving_iterations) if last else halving_iterations
            # one loss name per stage (an alias of `progressive_loss`), so a failure names its stage's loss
            object.__setattr__(self, f"progressive_loss_{steps}", self.progressive_loss)
            schedule = annealed(length) if lr_anneal else kw
            stages.append(Stage(f"steps_{steps}", start, stop,
                                [Phase(f"steps_{steps}", f"progressive_loss_{steps}", ("student",), **schedule)],
                                on_enter="enter_halving"))
            start += halving_iterations
        self.set_stages(stages)
        if teacher is not None:
            self._attach_teacher(teacher)

    # ======================================================================================= construction
    def _stage1_networks(self, guidance_trains: str) -> tuple[str, ...]:
        """The submodules stage 1's optimizer steps (`guidance_trains`)."""
        if guidance_trains == "all":
            return ("student",)
        adapters = tuple(f"student.net.{name}" for name, _ in self.student.net.named_modules()
                         if name.endswith(ADAPTER_MODULES)) if guidance_trains == "adapter" else ()
        return ("student.net.cond.guidance",) + adapters

    def _attach_teacher(self, teacher: PreconditionedNet) -> None:
        if teacher.num_classes != self.student.num_classes:
            raise ValueError(f"net: the student has num_classes={self.student.num_classes} but the teacher "
                             f"{self.teacher_ckpt!r} has {teacher.num_classes}; use the teacher's.")
        self._attach_frozen("teacher", teacher)
        if int(self.iteration) == 0 and isinstance(teacher, PreconditionedNet):
            self._init_student_from(teacher)

    def _init_student_from(self, teacher: PreconditionedNet) -> None:
        """Stage 1 starts from the teacher's weights when the student is the teacher's network plus a guidance
        embedding, that embedding's output layer zeroed: the student then equals the conditional teacher."""
        student_config, teacher_config = to_config(self.student.net), to_config(teacher.net)
        if not (isinstance(student_config, dict) and isinstance(teacher_config, dict)):
            return

        def without_guidance(config: dict) -> dict:  # the guidance embedding's settings are the student's own
            args = config.get("init_args", {})
            return {**config, "init_args": {k: v for k, v in args.items()
                                            if k not in ("guidance_embed", "guidance_null", "guidance_adapter",
                                                         "guidance_rank")}}

        if (without_guidance(student_config) != without_guidance(teacher_config)
                or self.student.preconditioning != teacher.preconditioning
                or self.student.sigma_data != teacher.sigma_data):
            return
        with torch.no_grad():
            missing, unexpected = self.student.load_state_dict(teacher.state_dict(), strict=False)
            embedding = self.student.net.cond.guidance
            guidance_only = (".cond.guidance.",) + tuple(f".{name}." for name in ADAPTER_MODULES)
            if unexpected or any(not any(part in key for part in guidance_only) for key in missing):
                raise RuntimeError(f"student from teacher: unexpected keys {unexpected[:3]}, missing {missing[:3]}")
            embedding.fc2.weight.zero_()
            embedding.fc2.bias.zero_()
        self.restart_emas()

    def prepare(self) -> None:
        """Load the teacher (and initialise a fresh student from it) if construction did not. Lightning calls it
        through `configure_model`; call it yourself to use the losses outside a Trainer."""
        if self.teacher is None:
            self._attach_teacher(load_teacher(self.teacher_ckpt, field_name="teacher_ckpt"))

    def configure_model(self) -> None:
        self.prepare()

    @property
    def init_config(self) -> dict:
        """Record the architecture read from the teacher file, so a trained student loads without it."""
        config = super().init_config
        args = config["init_args"]
        resolved = {"net": self.student.net, "preconditioning": self.student.preconditioning,
                    "sigma_data": self.student.sigma_data}
        for name, value in resolved.items():
            if args.get(name) is None:
                args[name] = to_config(value)
        return config

    def enter_halving(self) -> None:
        """Stage hook: the model so far (its EMA when there is one) becomes the frozen previous-stage teacher, and the
        new student (and its EMA) start from it. Runs again at load, before the saved weights overwrite these."""
        source = self.ema if self.ema is not None else self.student
        self.register_frozen("previous", module=copy.deepcopy(source))
        with torch.no_grad():
            self.student.load_state_dict(source.state_dict())
        self.restart_emas()

    def state_dict_to_save(self) -> dict[str, Tensor]:
        """An exported model is the student alone: no previous-stage teacher, and no record of entered stages (so
        loading it does not rebuild one)."""
        return {k: v for k, v in super().state_dict_to_save().items()
                if not k.startswith("previous.") and k != "stage_entered"}

    # ======================================================================================= pieces
    @property
    def default_nfe(self) -> int:
        """The student's steps at the iteration it was trained to (stage 1 alone: DDIM with 35 steps)."""
        return self.current_steps() or 35

    def current_steps(self, iteration: int | None = None) -> int | None:
        """The student's DDIM steps at `iteration` (default: now): None in stage 1 (any number of steps)."""
        iteration = int(self.iteration) if iteration is None else iteration
        steps = None
        for stage, n in zip(self.stages[1:], self.student_steps):
            if iteration >= stage.start:
                steps = n
        return steps

    def grid(self, steps: int) -> Tensor:
        """The N-step DDIM grid t_max (1 - i / N), i = 0..N (float64)."""
        return torch.linspace(self.t_max, 0.0, steps + 1, dtype=torch.float64)

    def draw_scales(self, n: int, like: Tensor, unguided_fraction: float | None = None) -> Tensor:
        """Per-sample EDM2 scales: uniform over `guidance_range`, a share `unguided_fraction` (default the module's
        stage-1 share) of them exactly 1. A share of 0 takes no extra random numbers."""
        share = self.unguided_fraction if unguided_fraction is None else unguided_fraction
        lo, hi = self.guidance_range
        scale = lo + (hi - lo) * self.rand((n,), like)
        if share > 0:
            scale = torch.where(self.rand((n,), like) < share, torch.ones_like(scale), scale)
        return scale

    def weight(self, t: Tensor, like: Tensor) -> Tensor:
        """omega(lambda_t): max(SNR, 1) with SNR = a^2 / b^2 ("snr_trunc"), or 1 ("constant")."""
        if self.weighting == "constant":
            return torch.ones_like(_bcast(t, like))
        snr = (self.path.a(t) / self.path.b(t)) ** 2
        return _bcast(snr.clamp_min(1.0), like)

    def model_x0(self, net: nn.Module, z_t: Tensor, t: Tensor, y: Tensor, scale: Tensor) -> Tensor:
        """x̂(z_t, s) of a w-conditioned model (student, its EMA, a previous stage) at VP time t."""
        return net.x0_from(z_t, t, self.path, class_labels=y, guidance=scale)

    def guidance_target(self, z_t: Tensor, t: Tensor, y: Tensor, scale: Tensor) -> Tensor:
        """The guided teacher x̂^w = (1 + w) x̂_c - w x̂_u at EDM2 scale s = 1 + w (`guided_x0`; at s = 1 exactly the
        conditional teacher), on the VP path."""
        return guided_x0(self.frozen_network("teacher"), z_t, t, y, scale, path=self.path)

    def two_teacher_steps(self, z_t: Tensor, t: Tensor, t_mid: Tensor, t_end: Tensor, y: Tensor,
                          scale: Tensor) -> Tensor:
        """The previous-stage model's two DDIM steps t -> t_mid -> t_end from z_t (per-sample times); in the first
        halving with the `first_halving_solver`."""
        first = self.student_steps and self.current_steps() == self.student_steps[0]
        step = FIRST_HALVING_SOLVERS[self.first_halving_solver if first else "ddim"](self.path)
        fn = lambda x, tt: self.model_x0(self.previous, x, tt, y, scale)  # noqa: E731
        state = SamplerState.start(z_t, t)
        state = step(fn, state, t_mid)
        return step(fn, state, t_end).x

    def _data(self, batch) -> tuple[Tensor, Tensor]:
        x, cond = self.split_batch(batch)
        if cond.class_labels is None:
            raise ValueError("data: guided distillation needs class labels in the batch.")
        return x, cond.class_labels

    # ======================================================================================= losses
    def guidance_loss(self, batch) -> Tensor:
        """Stage 1 (Meng et al. Eq. 6): E omega(lambda_t) ||x̂(z_t, s) - x̂^s(z_t)||^2, s ~ U(guidance_range),
        t ~ U[t_min, t_max] on the VP cosine path."""
        x, y = self._data(batch)
        n = x.shape[0]
        scale = self.draw_scales(n, x)
        t = self.t_min + (self.t_max - self.t_min) * self.rand((n,), x)
        z_t = self.path.noise(x, self.randn(x.shape, x), t)
        with torch.no_grad():
            target = self.guidance_target(z_t, t, y, scale)
        pred = self.model_x0(self.student, z_t, t, y, scale)
        return (self.weight(t, x) * (pred - target) ** 2).mean()

    def progressive_loss(self, batch) -> Tensor:
        """Stage 2 (Salimans & Ho 2022, Algorithm 2, at Meng's per-sample w): the N/2-step student's step
        t_i -> t_(i+1) regresses `pd_target` of the previous model's two N-step DDIM steps, weighted max(SNR, 1)."""
        x, y = self._data(batch)
        n = x.shape[0]
        steps = self.current_steps()
        grid = self.grid(steps).to(x.dtype).to(x.device)
        scale = self.draw_scales(n, x, self.halving_unguided_fraction)
        i = self.randint(0, steps, (n,), x)
        t, t_end = grid[i], grid[i + 1]
        t_mid = 0.5 * (t + t_end)
        z_t = self.path.noise(x, self.randn(x.shape, x), t)
        with torch.no_grad():
            z_end = self.two_teacher_steps(z_t, t, t_mid, t_end, y, scale)
            target = pd_target(z_t, t, z_end, t_end, self.path)
        pred = self.model_x0(self.student, z_t, t, y, scale)
        return (self.weight(t, x) * (pred - target) ** 2).mean()

    # ======================================================================================= sampling
    def sample(self, n, nfe, class_labels=None, generator=None, use_ema=True, **options):
        """`FewStepModule.sample`: `nfe` DDIM steps of the student at ``guidance_scale`` (EDM2 scale, a number or one
        per sample; default the module's), 1 evaluation per step (guidance is inside the student).
        ``stochastic=True``: Meng et al.'s stochastic sampler (`StochasticDDIMStep`, noise from `generator`)."""
        return super().sample(n, nfe, class_labels=class_labels, generator=generator, use_ema=use_ema,
                              noise_generator=generator, **options)

    def _sample(self, noise, class_labels, nfe, net, noise_generator: torch.Generator | None = None,
                guidance_scale: float | Tensor | None = None,
                stochastic: bool = False):
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        scale = torch.as_tensor(scale, dtype=noise.dtype, device=noise.device).expand(noise.shape[0])
        counter = NFECounter()
        fn = counter.counted(lambda x, t: self.model_x0(net, x, t, class_labels, scale))
        # The progressive-distillation code clips the data prediction at sampling only (`clip_x`), never in training.
        step = (StochasticDDIMStep(self.path, gaussian_noise(noise_generator), t_min=0.0, clip_x0=self.clip_x0)
                if stochastic else DDIMStep(self.path, clip_x0=self.clip_x0))
        grid = self.grid(nfe)
        x = noise * self.path.b(grid[0]).to(noise.dtype)
        return run_steps(fn, x, grid, step).x, counter.count
