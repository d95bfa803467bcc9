"""Constant Acceleration Flow (Park et al., NeurIPS 2024) and its 2-rectified-flow baseline.

CAF learns a straight-ish ODE between noise x_0 and data x_1 whose couplings (x_0, x_1) are deterministic: x_1 is
what a pretrained teacher's ODE makes from that same x_0 (the pairs of ``python -m lit_fewstep.data.pairs``; the
paper's "reflow"). Instead of a constant velocity (rectified flow), every pair moves with an initial velocity v_0
and a constant acceleration a:

    x_tau = x_0 + v_0 tau + a tau^2 / 2,   a = 2 (x_1 - x_0 - v_0),   v_0* = h (x_1 - x_0)          (CAF Eqs. 4-6)

so the path hits x_1 at tau = 1 for ANY v_0. Two networks: the velocity net v(x_tau, tau) regresses v_0* (stage 1);
the acceleration net a(x_tau, tau, v_0) sees v_0 as extra input channels ("initial velocity conditioning", IVC)
and regresses a on paths built from the velocity net's own prediction v_0 = v(x_0, 0) (stage 2). h = 1 with
a = 0 is rectified flow; ``acceleration_net=None`` (h = 1) trains that baseline, 2-rectified flow, on the same pairs.

Time. CAF's clock tau runs from noise (tau = 0) to data (tau = 1), the networks see tau raw in [0, 1]. The
package's linear path runs the other way: x_t = (1 - t) x + t z with data at t = 0, so tau = 1 - t, CAF's x_0 is
the path's noise z and CAF's x_1 its data x. Losses and networks stay in tau; the samplers run on the package's
time grid through `diffusion.solvers` (`ConstantAccelerationStep` converts; 2-RF is Euler in tau).

Stage 3 (optional, `adversarial_iterations`): adversarial fine-tuning of the acceleration net, hinge GAN with a
`DiscriminatorHead` on the data itself (the official code: a projected discriminator on frozen pretrained features,
not available offline). Not here: the paper's optional LPIPS term on x̂_1 (see docs/caf.md).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from ..data.pairs import load_pairs
from ..diffusion.paths import _bcast
from ..diffusion.solvers import ConstantAccelerationStep, NFECounter, run_steps, uniform_times
from ..nets.heads import DiscriminatorHead
from .base import FewStepModule, Phase, Stage
from .ctm import adaptive_weight, last_layer
from .dmd import frozen

__all__ = ["CAF", "CAFNets", "caf_path", "caf_acceleration", "caf_estimate", "caf_pseudo_huber"]

LOSSES = ("pseudo_huber", "l2")


# ----------------------------------------------------------------------------------------------- CAF's kinematics
def caf_path(x0: Tensor, x1: Tensor, v0: Tensor, tau: Tensor) -> Tensor:
    """CAF Eq. 6: x_tau = (1 - tau^2) x_0 + tau^2 x_1 + v_0 (tau - tau^2); x_0 at tau = 0, x_1 at tau = 1 for any v_0.

    x0, x1, v0: [B, ...]; tau: [B] in [0, 1] (CAF's time, noise at 0)."""
    tau = _bcast(tau, x0)
    return (1 - tau**2) * x0 + tau**2 * x1 + v0 * (tau - tau**2)


def caf_acceleration(x0: Tensor, x1: Tensor, v0: Tensor) -> Tensor:
    """CAF Eq. 5: the constant acceleration that takes x_0 with initial velocity v_0 to x_1 at tau = 1."""
    return 2.0 * (x1 - x0 - v0)


def caf_estimate(x_t: Tensor, tau: Tensor, v0: Tensor, a: Tensor, s: float | Tensor = 1.0) -> Tensor:
    """CAF Eq. 9: x̂_s = x_tau + v_0 (s - tau) + (s + tau)/2 a (s - tau), exact kinematics from tau to s."""
    tau = _bcast(tau, x_t)
    s = _bcast(torch.as_tensor(s, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0]), x_t)
    return x_t + v0 * (s - tau) + 0.5 * (s + tau) * a * (s - tau)


def caf_pseudo_huber(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample pseudo-Huber of the official code: (sqrt(||r||^2 + c^2) - c) / D with c = 0.00054 D, D the
    element count of one sample. iCT's constant is 0.00054 sqrt(D); CAF's grows with D (about 1.66 on CIFAR-10), so
    its loss is much closer to a squared error. Kept as the authors wrote it."""
    r = (pred - target).flatten(1)
    D = r.shape[1]
    c = 0.00054 * D
    return (torch.sqrt(r.pow(2).sum(1) + c * c) - c) / D


# ----------------------------------------------------------------------------------------------- networks
class CAFNets(nn.Module):
    """The generator: the velocity net v(x, tau) and the acceleration net a(x, tau, v_0) (None for 2-RF), one EMA.

    Both are `lit_fewstep.nets` networks called as net(x, tau, class_labels=..., extra=...). With IVC the
    acceleration net gets v_0 as ``extra`` (extra_channels = the data's channels); a velocity net built with
    extra channels gets zeros there (the official code gives both nets the same input width that way).
    """

    def __init__(self, velocity: nn.Module, acceleration: nn.Module | None, ivc: bool):
        super().__init__()
        self.velocity, self.acceleration, self.ivc = velocity, acceleration, ivc

    @property
    def in_channels(self) -> int:
        return self.velocity.in_channels

    @property
    def img_resolution(self):
        return getattr(self.velocity, "img_resolution", None)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.velocity, "num_classes", 0))

    def v(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.velocity(x, _vec(tau, x), class_labels=class_labels)

    def a(self, x: Tensor, tau: Tensor, v0: Tensor, class_labels: Tensor | None = None) -> Tensor:
        extra = v0 if self.ivc else None
        return self.acceleration(x, _vec(tau, x), class_labels=class_labels, extra=extra)


def _vec(t, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """Stage 2's v_0 comes from the velocity net in eval mode (no dropout), as in the official code."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)


# ----------------------------------------------------------------------------------------------- the method
class CAF(FewStepModule):
    """Constant Acceleration Flow on fixed teacher couplings: velocity stage, then acceleration stage.

    Args:
        velocity_net: v(x_tau, tau) (a `lit_fewstep.nets` network; extra input channels, if any, get zeros).
        acceleration_net: a(x_tau, tau, v_0), built with ``extra_channels`` = the data's channels when `ivc`
            (0 without IVC). None: 2-rectified flow (velocity stage only, Euler sampling; needs h = 1).
        pairs_path: the teacher couplings, from ``python -m lit_fewstep.data.pairs --path linear`` (a flow-matching
            teacher's own ODE from x_0 = z; EDM pairs work too: x_0 = their unit noise). Read when training starts;
            sampling a trained model does not need the file.
        h: initial-velocity scale, v_0* = h (x_1 - x_0) (1.5 in every official config; 1 = rectified flow).
        ivc: feed v_0 to the acceleration net (the paper's ablation without it: False).
        velocity_iterations / acceleration_iterations: stage lengths (None: the acceleration stage, or 2-RF's
            velocity stage, runs until the trainer stops).
        loss: "pseudo_huber" (official, `caf_pseudo_huber`) or "l2" (mean squared error per sample).
        batch_size: pairs per iteration (0: the data module's batch size; the data batch itself is not used).
        time_levels: training tau = k / time_levels with k uniform in {0, ..., time_levels}, ends included (official:
            1000).
        clip: clamp samples to [-clip, clip] at the end (official: 1 for images); None for toy data.
        lr, weight_decay: AdamW (official 1e-4, 1e-5).
        ema_warmup_power: the official EMA (ema-pytorch) warms up: decay min(ema_decay, 1 - (1 + n)^(-power)) at the
            n-th update of the current stage (power 2/3, its default; n restarts when a stage begins, as the official
            stages build a new EMA). 0: the constant `ema_decay` from the first update.
        adversarial_iterations: length of the optional stage 3 after the acceleration stage (0: none; None: until
            the trainer stops; needs a finite `acceleration_iterations`). The acceleration net (lr `gan_lr`, official
            2e-5) steps on every `generator_every`-th iteration of the stage (official 2), the discriminator (lr
            `discriminator_lr`, official 1e-3) on the others; `discriminator_hidden` is its width.
    """

    generator_name = "flow"

    def __init__(self, velocity_net: nn.Module, acceleration_net: nn.Module | None = None,
                 pairs_path: str | None = None, h: float = 1.5, ivc: bool = True, velocity_iterations: int = 1000,
                 acceleration_iterations: int | None = None, loss: str = "pseudo_huber", batch_size: int = 0,
                 time_levels: int = 1000, clip: float | None = None, lr: float = 1e-4, weight_decay: float = 1e-5,
                 adversarial_iterations: int | None = 0, gan_lr: float = 2e-5, discriminator_lr: float = 1e-3,
                 generator_every: int = 2, discriminator_hidden: int = 64, ema_warmup_power: float = 2 / 3,
                 ema_decay: float = 0.9999, grad_clip: float = 0.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        if not (isinstance(h, (int, float)) and h > 0 and math.isfinite(h)):
            raise ValueError(f"h: the initial-velocity scale must be a positive number (official 1.5), got {h!r}.")
        if acceleration_net is None and h != 1:
            raise ValueError(f"h: without an acceleration net the model is 2-rectified flow, which needs h = 1; "
                             f"got {h}.")
        if loss not in LOSSES:
            raise ValueError(f"loss: choose one of {LOSSES}, got {loss!r}.")
        if not isinstance(velocity_iterations, int) or velocity_iterations < 1:
            raise ValueError(f"velocity_iterations: must be an integer >= 1, got {velocity_iterations!r}.")
        if acceleration_iterations is not None and acceleration_iterations < 1:
            raise ValueError(f"acceleration_iterations: must be >= 1 or null (until the end), "
                             f"got {acceleration_iterations}.")
        if not isinstance(time_levels, int) or time_levels < 1:
            raise ValueError(f"time_levels: must be an integer >= 1 (official 1000), got {time_levels!r}.")
        if batch_size < 0:
            raise ValueError(f"batch_size: must be >= 0 (0: the data module's), got {batch_size}.")
        if acceleration_net is not None:
            self._check_acceleration_net(velocity_net, acceleration_net, ivc)
        adversarial = adversarial_iterations is None or adversarial_iterations != 0
        if adversarial and (acceleration_net is None or acceleration_iterations is None):
            raise ValueError("adversarial_iterations: the adversarial stage fine-tunes the acceleration net after its "
                             "stage; give an acceleration_net and a finite acceleration_iterations (or set it to 0).")
        if adversarial_iterations is not None and adversarial_iterations < 0:
            raise ValueError(f"adversarial_iterations: must be >= 0 (0: none) or null, got {adversarial_iterations}.")
        if not isinstance(generator_every, int) or generator_every < 2:
            raise ValueError(f"generator_every: must be an integer >= 2 (the discriminator steps in between; "
                             f"official 2), got {generator_every!r}.")
        self.pairs_path, self.h, self.ivc = pairs_path, float(h), bool(ivc)
        self.velocity_iterations, self.acceleration_iterations = velocity_iterations, acceleration_iterations
        self.loss, self.batch_size, self.time_levels, self.clip = loss, int(batch_size), time_levels, clip
        if ema_warmup_power < 0:
            raise ValueError(f"ema_warmup_power: must be >= 0 (0: no warm-up; official 2/3), got {ema_warmup_power}.")
        self.adversarial_iterations, self.generator_every = adversarial_iterations, generator_every
        self.ema_warmup_power = float(ema_warmup_power)
        # EMA updates since the current stage began (the warm-up restarts with each stage); saved, so resume is exact
        self.register_buffer("ema_stage_updates", torch.zeros((), dtype=torch.long))
        self.flow = CAFNets(velocity_net, acceleration_net, self.ivc)
        self.discriminator = (DiscriminatorHead(self.flow.in_channels, discriminator_hidden, self.flow.num_classes)
                              if adversarial else None)
        velocity = Phase("velocity", "velocity_loss", ("flow.velocity",), lr=lr, weight_decay=weight_decay,
                         updates_ema=True)
        if acceleration_net is None:
            self.set_stages([Stage("velocity", 0, None, [velocity])])
        else:
            V = velocity_iterations
            accel = Phase("acceleration", "acceleration_loss", ("flow.acceleration",), lr=lr,
                          weight_decay=weight_decay, updates_ema=True)
            stages = [
                Stage("velocity", 0, V, [velocity]),
                Stage("acceleration", V, None if acceleration_iterations is None else V + acceleration_iterations,
                      [accel], on_enter="begin_acceleration"),
            ]
            if adversarial:
                G = V + acceleration_iterations
                # official g_learning_period: the generator every 2nd iteration, the discriminator on the others
                discriminator = [Phase("discriminator", "discriminator_loss", ("discriminator",), every=generator_every,
                                       start=s, lr=discriminator_lr, weight_decay=weight_decay)
                                 for s in range(generator_every - 1)]
                generator = Phase("adversarial", "adversarial_loss", ("flow.acceleration",), every=generator_every,
                                  start=generator_every - 1, lr=gan_lr, weight_decay=weight_decay, updates_ema=True)
                stages.append(Stage("adversarial", G, None if adversarial_iterations is None
                                    else G + adversarial_iterations, [*discriminator, generator],
                                    on_enter="begin_adversarial"))
            self.set_stages(stages)
        self.init_ema()

    @staticmethod
    def _check_acceleration_net(velocity_net: nn.Module, acceleration_net: nn.Module, ivc: bool) -> None:
        channels = velocity_net.in_channels
        for attr in ("in_channels", "img_resolution", "num_classes"):
            if getattr(velocity_net, attr, None) != getattr(acceleration_net, attr, None):
                raise ValueError(f"acceleration_net: {attr}={getattr(acceleration_net, attr, None)} but the velocity "
                                 f"net has {getattr(velocity_net, attr, None)}; build both for the same data.")
        extra = int(getattr(acceleration_net, "extra_channels", 0))
        if ivc and extra != channels:
            raise ValueError(f"acceleration_net: with ivc the net reads v_0 as extra input channels; set its "
                             f"extra_channels to {channels} (got {extra}), or ivc: false.")
        if not ivc and extra != 0:
            raise ValueError(f"acceleration_net: without ivc the net sees no v_0; set its extra_channels to 0 "
                             f"(got {extra}).")

    @property
    def is_rectified_flow(self) -> bool:
        return self.flow.acceleration is None

    @property
    def default_nfe(self) -> int:
        return 1 if self.is_rectified_flow else 2  # 2-RF: one Euler step; CAF: v_0 once, then one step

    # ------------------------------------------------------------------------------------------- pairs
    def prepare(self) -> None:
        """Load the couplings (Lightning calls this through `configure_model`; call it to use the losses by hand)."""
        if hasattr(self, "pair_noise"):
            return
        if self.pairs_path is None:
            raise ValueError("pairs_path: CAF trains on teacher couplings; make them with `python -m "
                             "lit_fewstep.data.pairs --teacher TEACHER.pt --num N --path linear --out FILE.pt`.")
        self.hold_pairs(load_pairs(self.pairs_path, field="pairs_path"))

    def configure_model(self) -> None:
        self.prepare()

    def draw_pairs(self, batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x_0, x_1, labels) of `batch_size` random pairs (the data batch only sets the count); resumable draws."""
        x, _ = self.split_batch(batch)
        n = self.batch_size or x.shape[0]
        x0, x1, labels = self.random_pairs(n)
        return x0.to(x.dtype), x1.to(x.dtype), labels

    def draw_times(self, like: Tensor) -> Tensor:
        # official: tau = k / 1000, k uniform in {0, ..., 1000} with both ends (not U(0, 1))
        k = self.randint(0, self.time_levels + 1, (like.shape[0],), like)
        return k.to(like.dtype) / self.time_levels

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.loss == "pseudo_huber":
            return caf_pseudo_huber(pred, target)
        return (pred - target).flatten(1).pow(2).mean(1)

    # ------------------------------------------------------------------------------------------- losses
    def velocity_loss(self, batch) -> Tensor:
        """Stage 1 (CAF Eq. 7): d(v(x_tau, tau), v_0*) with v_0* = h (x_1 - x_0), on paths built with the TRUE v_0*
        at every tau. With h = 1 the path is the linear one and this is 2-rectified flow's loss."""
        x0, x1, y = self.draw_pairs(batch)
        tau = self.draw_times(x0)
        v0 = self.h * (x1 - x0)
        x_tau = caf_path(x0, x1, v0, tau)
        return self.distance(self.flow.v(x_tau, tau, y), v0).mean()

    def acceleration_loss(self, batch) -> Tensor:
        """Stage 2 (CAF Eq. 8): d(a(x_tau, tau, v_0), 2 (x_1 - x_0 - v_0)) with v_0 = sg(v(x_0, 0)) the stage-1
        (EMA) velocity's own prediction, so the acceleration corrects what the velocity net gets wrong."""
        x0, x1, y = self.draw_pairs(batch)
        tau = self.draw_times(x0)
        with torch.no_grad(), _eval_mode(self.flow.velocity) as velocity:
            v0 = velocity(x0, _vec(0.0, x0), class_labels=y)
        x_tau = caf_path(x0, x1, v0, tau)
        return self.distance(self.flow.a(x_tau, tau, v0, y), caf_acceleration(x0, x1, v0)).mean()

    def one_step_estimate(self, x0: Tensor, y: Tensor | None) -> Tensor:
        """x̂_1 = x_0 + v_0 + a(x_0, 0, v_0) / 2 (CAF Eq. 9 from tau = 0 to 1), v_0 = sg(v(x_0, 0)): stage 3's fake."""
        tau = _vec(0.0, x0)
        with torch.no_grad(), _eval_mode(self.flow.velocity) as velocity:
            v0 = velocity(x0, tau, class_labels=y)
        return caf_estimate(x0, tau, v0, self.flow.a(x0, tau, v0, y))

    def discriminate(self, x: Tensor, y: Tensor | None) -> Tensor:
        return self.discriminator(x, y if self.discriminator.num_classes > 0 else None)

    def adversarial_loss(self, batch) -> Tensor:
        """Stage 3, generator: L_CAF + lambda (-D(x̂_1)), lambda = ||grad_W L_CAF|| / (||grad_W L_G|| + 1e-4) at the
        acceleration net's last layer, clamped to [0.01, 10] (official)."""
        loss_caf = self.acceleration_loss(batch)
        x0, _, y = self.draw_pairs(batch)
        with frozen(self.discriminator):
            loss_g = -self.discriminate(self.one_step_estimate(x0, y), y).mean()
        weight = adaptive_weight(loss_caf, loss_g, last_layer(self.flow.acceleration), clamp=(0.01, 10.0))
        if self._trainer is not None:
            self.log("train/gan_weight", weight.float(), on_step=True, on_epoch=False)
        return loss_caf + weight * loss_g

    def discriminator_loss(self, batch) -> Tensor:
        """Stage 3, discriminator: hinge, relu(1 - D(real)) + relu(1 + D(x̂_1)); real = the data module's batch."""
        x, cond = self.split_batch(batch)
        x0, _, y = self.draw_pairs(batch)
        with torch.no_grad():
            fake = self.one_step_estimate(x0, y)
        real_y = cond.class_labels if self.num_classes > 0 else None
        return (torch.relu(1.0 - self.discriminate(x, real_y)).mean()
                + torch.relu(1.0 + self.discriminate(fake, y)).mean())

    def begin_acceleration(self) -> None:
        """Stage 2 starts from the EMA velocity (official: stage 2 loads the EMA weights of stage 1). Copied into the
        trained slot too, so the EMA of the (now fixed) velocity net stays that network."""
        if self.ema is not None:
            self.flow.velocity.load_state_dict(self.ema.velocity.state_dict())
        self.ema_stage_updates.zero_()

    def begin_adversarial(self) -> None:
        self.ema_stage_updates.zero_()

    @torch.no_grad()
    def update_ema(self) -> None:
        """The base class's EMA update with the official warm-up of the decay (see `ema_warmup_power`)."""
        self.ema_stage_updates += 1
        if not self.ema_warmup_power:
            return super().update_ema()
        constant = self.ema_decay
        n = int(self.ema_stage_updates) - 1  # the first update of a stage copies the weights (decay 0)
        self.ema_decay = min(constant, 1.0 - (1.0 + n) ** -self.ema_warmup_power)
        try:
            super().update_ema()
        finally:
            self.ema_decay = constant

    # ------------------------------------------------------------------------------------------- sampling
    def _sample(self, noise: Tensor, class_labels: Tensor | None, nfe: int, net: nn.Module) -> tuple[Tensor, int]:
        x, spent = self.generate(net, noise, nfe, class_labels)
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)  # official: only at the very end
        return x, spent

    def generate(self, net: CAFNets, x0: Tensor, nfe: int, class_labels: Tensor | None = None) -> tuple[Tensor, int]:
        """x̂_1 from noise x_0 with `nfe` evaluations.

        CAF: N = nfe - 1 steps on tau_i = i / N (`ConstantAccelerationStep`: v_0 = v(x_0, 0) once, then
        x_{i+1} = x_i + v_0 / N + (tau_i + 1 / (2N)) a(x_i, tau_i, v_0) / N); nfe = 1 is the velocity net alone,
        x̂_1 = x_0 + v(x_0, 0) / h (exact for an exact v_0). 2-RF: nfe Euler steps of v.
        """
        return self._integrate(net, x0, nfe, class_labels, forward=True)

    @torch.no_grad()
    def invert(self, x1: Tensor, nfe: int, class_labels: Tensor | None = None, use_ema: bool | str = True
               ) -> tuple[Tensor, int]:
        """CAF's inversion: data x_1 -> noise x_0 by the sampler's equations run backwards from v_0 = v(x_1, 1)
        (nfe = 1: x_1 - v(x_1, 1) / h; 2-RF: Euler steps backwards). Same NFE accounting as `sample`."""
        self.check_nfe(nfe)
        self.check_class_labels(class_labels, x1.shape[0])
        net = self.sampling_network(use_ema)
        was = self.training
        self.eval()
        try:
            return self._integrate(net, x1, nfe, class_labels, forward=False)
        finally:
            self.train(was)

    def _integrate(self, net: CAFNets, x: Tensor, nfe: int, y: Tensor | None, forward: bool) -> tuple[Tensor, int]:
        """Sample (forward: tau 0 -> 1, package time t = 1 - tau from 1 to 0) or invert (tau 1 -> 0)."""
        counter = NFECounter()
        steps = nfe if net.acceleration is None or nfe == 1 else nfe - 1
        times = uniform_times(steps, dtype=x.dtype).to(x.device)  # package time, 1 -> 0
        times = times if forward else times.flip(0)
        if net.acceleration is None:  # 2-RF: Euler in tau, x' = x + (tau' - tau) v(x, tau), tau = 1 - t
            # (not `EulerStep` on the linear path: it goes through the data estimate, which divides by b(t) = 0 at
            # t = 0, where inversion starts)
            v = counter.counted(net.v)
            for t, t_next in zip(times[:-1], times[1:]):
                x = x + (t - t_next) * v(x, _vec(1 - t, x), y)
            return x, counter.count
        velocity = counter.counted(lambda x_t, t: net.v(x_t, 1 - t, y))
        v0 = velocity(x, _vec(times[0], x))  # v(x_0, tau = 0) to sample, v(x_1, tau = 1) to invert
        if nfe == 1:  # velocity only: x_1 = x_0 + v_0* / h on the exact field
            return (x + v0 / self.h if forward else x - v0 / self.h), counter.count
        state = run_steps(lambda x_t, t, v0: net.a(x_t, 1 - t, v0, y), x, times, ConstantAccelerationStep(),
                          counter=counter, extra={"v0": v0})
        return state.x, counter.count
