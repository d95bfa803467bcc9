"""Analog Bits (Chen, Zhang & Hinton 2022, "Analog Bits: Generating Discrete Data using Diffusion Models with
Self-Conditioning").

Discrete data is written as bits, each bit as a real number in {-b, +b} (`lit_fewstep.data.bits.BitCodec`), and
an ordinary continuous diffusion model learns those analog bits on the VP cosine path, x_t = a(t) x + b(t) z with
a = cos(pi t / 2) (the paper's gamma(t) = a(t)^2, t = 1 is noise). Samples are decoded by thresholding the final
x0 estimate at 0 and reading the bits back as integers. Two additions make it work:

- self-conditioning: the network also sees its own previous estimate of x0 (extra input channels). Training feeds
  sg(x0_hat(x_t, 0)) to a fraction of the batch and zeros to the rest; sampling feeds the previous step's estimate
  (`diffusion.solvers.SelfConditioned`, no extra evaluations);
- asymmetric time intervals: step i of N queries the network at t = 1 - i / N but lands at
  max(1 - (i + 1 + td) / N, 0) (`AsymmetricDDIMStep`), which helps at small N.

Time label: the network sees 1000 t (the package's VP preconditioning, ``"vp_x"``); pix2seq feeds 1000 gamma(t)
instead, the same information in another coordinate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..conditioning import Conditioning
from ..data.bits import BitCodec
from ..diffusion.paths import GaussianPath
from ..diffusion.precond import PreconditionedNet
from ..diffusion.predictions import to_x0_eps
from ..diffusion.solvers import DDIMStep, NFECounter, SamplerState, SelfConditioned, run_steps, uniform_times
from .base import FewStepModule, Phase, Samples

__all__ = ["AnalogBits", "AsymmetricDDIMStep", "analog_bits_sample", "token_total_variation", "nearest_bit_accuracy"]

LOSSES = ("mse", "logistic")


class AsymmetricDDIMStep(DDIMStep):
    """DDIM with asymmetric time intervals (Chen et al. 2022, Sec. 3.3), 1 evaluation.

    The model is queried at the state's time t; the update lands at t' - delta (not below 0) instead of t':
        x0 = clip(model_fn(x, t)),  eps = (x - a(t) x0) / b(t),  x' = a(t' - delta) x0 + b(t' - delta) eps.
    The new state carries the nominal time t' (the next query time), as pix2seq's sampler does: the network is then
    asked at a slightly noisier time than x really has. delta = td / N for td in units of steps; delta = 0 is
    plain DDIM.
    """

    def __init__(self, path: GaussianPath, delta: float = 0.0, clip_x0: float | None = None):
        if not delta >= 0:
            raise ValueError(f"td: the time difference must be >= 0, got delta={delta}.")
        super().__init__(path, clip_x0)
        self.delta = float(delta)

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        x0 = self.estimate(model_fn, x, t)
        nominal = torch.as_tensor(t_next, dtype=x.dtype, device=x.device).expand(x.shape[0])
        land = (nominal - self.delta).clamp_min(0.0)
        _, eps = to_x0_eps(x0, "x0", x, t, self.path)
        return state.advance(self.path.noise(x0, eps, land), t_next, x0=x0)


def analog_bits_sample(x0_fn: Callable[..., Tensor], noise: Tensor, steps: int, path: GaussianPath, td: float = 0.0,
                       self_condition: bool = True, clip: float | None = 1.0,
                       counter: NFECounter | None = None) -> SamplerState:
    """The Analog Bits sampler: `steps` DDIM steps from x = noise at t = 1 on the uniform grid t_i = 1 - i / steps,
    with asymmetric intervals `td` (in steps) and, with `self_condition`, the previous clipped x0 fed back.

    x0_fn(x, t, x0_prev) with self-conditioning, x0_fn(x, t) without. Returns the final state; its
    ``extra["x0"]`` (the last clipped estimate) is what gets decoded.
    """
    if steps < 1:
        raise ValueError(f"nfe: the sampler takes one evaluation per step, need >= 1, got {steps}.")
    step = AsymmetricDDIMStep(path, float(td) / steps, clip)
    return run_steps(x0_fn, noise, uniform_times(steps, 1.0, 0.0, dtype=noise.dtype),
                     SelfConditioned(step) if self_condition else step, counter=counter)


class AnalogBits(FewStepModule):
    """Analog Bits: continuous diffusion on the bits of discrete data, with self-conditioning.

    Batches hold data in data units (toy coordinates, images in [-1, 1]); the codec quantizes them to
    `num_levels` levels between `low` and `high` (exact for data already on those levels: digits' 17 grey levels
    with the defaults, the ``grid`` toy with its cell centres), writes each token as bits and diffuses those.

    Args:
        net: a `lit_fewstep.nets` network on the bits: ``in_channels`` = data channels x bits per value, and
            ``extra_channels`` = ``in_channels`` when self-conditioning is on (0 when it is off).
        num_levels, low, high, code, scale: the `BitCodec` (``code`` "binary" or "gray"; ``scale`` is b).
        self_condition: fraction of each batch trained with its own detached estimate as input (0.5 in the paper;
            0 disables self-conditioning).
        loss: "mse" (Eq. of Algorithm 1: ||x0_hat - x_bits||^2) or "logistic" (per-bit -log sigmoid(F x_bits / b),
            the network output F read as a logit and x0_hat = b tanh(F / 2)).
        td: default asymmetric time difference at sampling, in steps.
        steps: default number of sampling steps (= NFE).
        lr, betas, weight_decay, ema_decay, grad_clip, nonfinite, max_consecutive_skips: see `FewStepModule`, `Phase`.
    """

    generator_name = "model"

    def __init__(self, net: nn.Module, num_levels: int = 17, low: float = -1.0, high: float = 1.0,
                 code: str = "binary", scale: float = 1.0, self_condition: float = 0.5, loss: str = "mse",
                 td: float = 0.0, steps: int = 100, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, ema_decay: float = 0.999, grad_clip: float = 1.0,
                 nonfinite: str = "stop", max_consecutive_skips: int = 100):
        super().__init__(ema_decay=ema_decay, grad_clip=grad_clip, nonfinite=nonfinite,
                         max_consecutive_skips=max_consecutive_skips)
        self.codec = BitCodec(num_levels, low, high, code, scale)
        if loss not in LOSSES:
            raise ValueError(f"loss: unknown value {loss!r}; choose one of {LOSSES}.")
        if not 0.0 <= self_condition <= 1.0:
            raise ValueError(f"self_condition: the self-conditioned fraction of a batch must be in [0, 1], "
                             f"got {self_condition}.")
        if not td >= 0:
            raise ValueError(f"td: the asymmetric time difference must be >= 0 (in steps), got {td}.")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: the default number of sampling steps must be an integer >= 1, got {steps!r}.")
        channels, bits = int(net.in_channels), self.codec.num_bits
        if channels % bits:
            raise ValueError(f"net.in_channels: {channels} is not a multiple of the {bits} bits per value of "
                             f"{num_levels} levels; set it to (data channels) x {bits}.")
        extra = int(getattr(net, "extra_channels", 0))
        if self_condition > 0 and extra != channels:
            raise ValueError(f"net.extra_channels: self-conditioning feeds the {channels}-channel estimate back; "
                             f"set extra_channels={channels} (or self_condition=0).")
        if self_condition == 0 and extra != 0:
            raise ValueError("net.extra_channels: without self-conditioning the network takes no extra input; "
                             "set extra_channels=0.")
        self.self_condition, self.loss, self.td, self.steps = float(self_condition), loss, float(td), steps
        self.model = PreconditionedNet(net, "vp_x")
        self.path = self.model.path
        self.phases = [Phase("denoiser", "bits_loss", ("model",), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, updates_ema=True)]
        self.init_ema()

    # ----------------------------------------------------------------------------- shapes
    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The bits' shape: the network's input."""
        return super().data_shape

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The data's shape: one channel per `num_bits` bit channels."""
        channels, *rest = super().data_shape
        return (channels // self.codec.num_bits, *rest)

    @property
    def default_nfe(self) -> int:
        return self.steps

    # ----------------------------------------------------------------------------- model
    def predict(self, net: nn.Module, x_t: Tensor, t: Tensor, x0_prev: Tensor | None = None,
                class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x0 estimate, raw output F) at (x_t, t); `x0_prev` is the self-conditioning input (None: none)."""
        cond = Conditioning(class_labels=class_labels, self_cond=x0_prev)
        out = net(x_t, t, **cond.network_inputs())
        if self.loss == "logistic":  # F is a per-bit logit: E[x] = b (2 sigmoid(F) - 1) = b tanh(F / 2)
            return self.codec.scale * torch.tanh(0.5 * out), out
        return out, out

    def encode(self, x: Tensor) -> Tensor:
        """Analog bits of data `x` (data units)."""
        return self.codec.encode(self.codec.quantize(x), x.dtype)

    def bits_loss(self, batch) -> Tensor:
        """Algorithm 1 of Chen et al. 2022: x_t = sqrt(gamma(t)) x_bits + sqrt(1 - gamma(t)) eps, t ~ U(0, 1);
        with self-conditioning x0_tilde = sg(f(x_t, 0, t)) for a fraction of the batch (zeros elsewhere), then
        ||f(x_t, x0_tilde, t) - x_bits||^2 (or the per-bit logistic loss). Mean over elements."""
        x, cond = self.split_batch(batch)
        labels = cond.class_labels if self.num_classes > 0 else None
        bits = self.encode(x)
        n = bits.shape[0]
        path = self.path
        t = path.t_min + (path.t_max - path.t_min) * self.rand((n,), bits)
        x_t = path.noise(bits, self.randn(bits.shape, bits), t)
        x0_prev = None
        if self.self_condition > 0:
            x0_prev = torch.zeros_like(bits)
            # pix2seq self-conditions the first part of the batch (not a coin per example; batches are shuffled)
            k = int(round(self.self_condition * n))
            if k > 0:
                with torch.no_grad():
                    first, _ = self.predict(self.model, x_t[:k], t[:k], x0_prev[:k],
                                            None if labels is None else labels[:k])
                # pix2seq clips the estimate it feeds back to the bit range
                x0_prev = torch.cat([first.clamp(-self.codec.scale, self.codec.scale), x0_prev[k:]])
        x0, raw = self.predict(self.model, x_t, t, x0_prev, labels)
        if self.loss == "logistic":
            # pix2seq's x_sigmoid_xent: -log sigmoid(F x / b) per bit
            return -F.logsigmoid(raw * bits / self.codec.scale).mean()
        return (x0 - bits).pow(2).mean()

    # ----------------------------------------------------------------------------- sampling
    def _sample(self, noise, class_labels, nfe, net, td: float | None = None, self_condition: bool | None = None):
        """`nfe` DDIM steps with asymmetric intervals `td` (default: the module's) and self-conditioning (default:
        on when trained with it; ``self_condition=False`` feeds zeros at every step). Returns data units."""
        td = self.td if td is None else float(td)
        if not td >= 0:
            raise ValueError(f"td: the asymmetric time difference must be >= 0 (in steps), got {td}.")
        trained = self.self_condition > 0
        use = trained if self_condition is None else bool(self_condition)
        if use and not trained:
            raise ValueError("self_condition: this model was trained without self-conditioning; drop the option.")
        counter = NFECounter()
        if use:
            fn = lambda x, t, prev: self.predict(net, x, t, prev, class_labels)[0]  # noqa: E731
        elif trained:
            fn = lambda x, t: self.predict(net, x, t, torch.zeros_like(x), class_labels)[0]  # noqa: E731
        else:
            fn = lambda x, t: self.predict(net, x, t, None, class_labels)[0]  # noqa: E731
        state = analog_bits_sample(fn, noise, nfe, self.path, td, use, self.codec.scale, counter)
        return self.codec.dequantize(self.codec.decode(state.extra["x0"]), noise.dtype), counter.count

    @torch.no_grad()
    def sample(self, n: int, nfe: int, *args, **kwargs) -> Samples:
        """`FewStepModule.sample`, plus ``extras["tokens"]``: the decoded int64 tokens ([N, C, ...], the same shape
        as `x`, which holds their data values: the image view for digits, the cell centres for the grid toy)."""
        out = super().sample(n, nfe, *args, **kwargs)
        out.extras["tokens"] = self.codec.quantize(out.x)
        return out


# --------------------------------------------------------------------------------------------------- metrics
def token_total_variation(tokens: Tensor, probs: Tensor) -> float:
    """Total variation distance between the empirical distribution of `tokens` [N, D] (one row one outcome, its
    entries the digits of a mixed-radix index over ``probs.shape``) and the exact table `probs`."""
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for d, size in enumerate(probs.shape):
        index = index * size + tokens[:, d].long().cpu()
    counts = torch.bincount(index, minlength=probs.numel()).double()
    return 0.5 * float((counts / counts.sum() - probs.flatten().double()).abs().sum())


def nearest_bit_accuracy(codec: BitCodec, samples: Tensor, reference: Tensor, chunk: int = 256) -> dict[str, float]:
    """Exact bit-level agreement of each sample with its nearest reference example (Hamming distance on the bits).

    Returns ``bit_accuracy`` (mean over samples of 1 - min Hamming / number of bits), ``exact_match`` (fraction of
    samples identical to some reference example, bit for bit) and ``token_accuracy`` (tokens equal to those of the
    nearest example). `samples`, `reference`: data units.
    """
    s_tok = codec.quantize(samples).flatten(1)
    r_tok = codec.quantize(reference).flatten(1)
    s_bits = codec.to_bits(s_tok[:, :, None]).flatten(1).float()
    r_bits = codec.to_bits(r_tok[:, :, None]).flatten(1).float()
    acc, exact, tok = [], [], []
    for i in range(0, s_bits.shape[0], chunk):
        sb = s_bits[i:i + chunk]
        hamming = sb @ (1 - r_bits).T + (1 - sb) @ r_bits.T  # [c, R]
        best = hamming.argmin(1)
        d = hamming.gather(1, best[:, None])[:, 0]
        acc.append(1 - d / s_bits.shape[1])
        exact.append((d == 0).double())
        tok.append((s_tok[i:i + chunk] == r_tok[best]).double().mean(1))
    return {"bit_accuracy": float(torch.cat(acc).mean()), "exact_match": float(torch.cat(exact).mean()),
            "token_accuracy": float(torch.cat(tok).mean())}
