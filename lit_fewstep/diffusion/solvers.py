"""Time grids, probability-flow ODE solvers and few-step samplers on any Gaussian path.

The PF-ODE of x_t = a x + b z is dx/dt = a' x0 + b' eps with eps = (x - a x0) / b, which for the
EDM path is Karras et al.'s dx/dsigma = (x - D(x, sigma)) / sigma. Solvers take a data predictor
`x0_fn(x_t, t) -> x0` in the path's own coordinates, so one solver serves every teacher.

One sampler protocol
--------------------
Every sampler in the package is a loop of *steps* over a decreasing time grid (`run_steps`). A step
moves a `SamplerState` (the state x at per-sample times t, plus a dict `extra` of whatever the sampler
carries between steps) from t to the next time:

    step(model_fn, state, t_next) -> state

`model_fn` is the network as the step needs it (a data predictor x0(x, t) for the ODE and DDIM steps,
a consistency function f(x, t) for `DenoiseRenoise`, a two-time map G(x, t, s) for `TwoTimeJump`, ...);
guidance is applied by handing a guided function (`diffusion.guidance.guided_x0`). Steps that draw
noise get it from a `noise_fn(like) -> unit Gaussian shaped like like`, so the caller decides where the
randomness comes from (a seeded `torch.Generator` when sampling, a training module's own resumable draw
when a sampler runs inside a loss).

==========================  ===========  ==================================================================
step                        evaluations  update from (x, t) to t'
==========================  ===========  ==================================================================
`EulerStep`                 1            PF-ODE Euler step
`HeunStep`                  2            Karras et al. 2022, Algorithm 1 (Euler + trapezoidal corrector)
`DDIMStep`                  1            x' = a(t') x0 + b(t') eps, both from the model's x0 (Song et al. 2021)
`DDIMHeunStep`              2            Heun's step in DDIM's coordinates: DDIM + trapezoidal corrector
`StochasticDDIMStep`        1            DDIM jump to 2t' - t, re-noised forward to t' (Meng et al. 2023)
`DenoiseRenoise`            1            x0 = f(x, t), x' = fresh noisy version of x0 at t' (CM, DMD2)
`TwoTimeJump`               1            jump G(x, t, s') to s' <= t', re-noised to t' (CTM gamma-sampling)
`ConstantAccelerationStep`  1 (+1 once)  CAF: x' = x + h v0 + h (tau + h/2) a(x, t, v0), v0 kept in `extra`
`SelfConditioned(step)`     as `step`    feeds the previous x0 estimate to the model (Analog Bits)
==========================  ===========  ==================================================================

Each step that computes a data estimate records it as ``state.extra["x0"]`` (the "denoised" output; the
last one is the sample of consistency-type samplers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .paths import EDMPath, GaussianPath, VPCosinePath, _bcast, vp_cosine_time
from .predictions import to_x0_eps

__all__ = [
    "NFECounter",
    "karras_sigmas",
    "uniform_times",
    "cosine_sigmas",
    "SIGMA_GRIDS",
    "lognormal_sigmas",
    "pf_ode_velocity",
    "euler_step",
    "heun_step",
    "solve_ode",
    "heun_schedule_for_nfe",
    "sample_edm_heun",
    "discrete_lognormal_probs",
    "consistency_sigmas",
    "multistep_consistency_sample",
    "gaussian_noise",
    "SamplerState",
    "Step",
    "EulerStep",
    "HeunStep",
    "DDIMStep",
    "DDIMHeunStep",
    "StochasticDDIMStep",
    "DenoiseRenoise",
    "TwoTimeJump",
    "SelfConditioned",
    "ConstantAccelerationStep",
    "DPMSolverPP2M",
    "UniPC",
    "MULTISTEP_SOLVERS",
    "ODE_SOLVERS",
    "run_steps",
    "denoise_renoise",
]

X0Fn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]


class NFECounter:
    """Counts network evaluations per sample. Wrappers call `add(k)` once per batched forward."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, k: int = 1) -> None:
        self.count += k

    def counted(self, fn: Callable[..., Tensor], per_call: int = 1) -> Callable[..., Tensor]:
        """`fn` (any signature: x0(x, t), f(x, t), G(x, t, s), ...) adding `per_call` to the count per call."""
        def wrapped(*args, **kwargs):
            self.add(per_call)
            return fn(*args, **kwargs)

        return wrapped


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  append_zero: bool = True, dtype=torch.float64) -> Tensor:
    """Eq. 5 of Karras et al. 2022: sigma_i for i = 0..N-1, from sigma_max down to sigma_min (+ a final 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}.")
    i = torch.arange(num_steps, dtype=dtype)
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=dtype)
    else:
        inv_rho = 1.0 / rho
        sigmas = (sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def uniform_times(num_steps: int, t_max: float = 1.0, t_min: float = 0.0, dtype=torch.float64) -> Tensor:
    """num_steps + 1 evenly spaced times from t_max down to t_min."""
    return torch.linspace(t_max, t_min, num_steps + 1, dtype=dtype)


def cosine_sigmas(num_steps: int, sigma_max: float = 80.0, dtype=torch.float64) -> Tensor:
    """num_steps + 1 noise levels from sigma_max down to 0, evenly spaced in the time t = (2 / pi) atan(sigma) of the
    variance-preserving cosine path (sigma = b / a = tan(pi t / 2)): the grid of DDIM in the progressive-distillation
    code. Unlike the Karras grid (whose last step, sigma_min -> 0, barely moves), every step moves; on the tree toy and
    digits the training-free solvers at 4 NFE do several times better on it (benchmarks/results/leaderboard.md)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}.")
    t = torch.linspace(vp_cosine_time(sigma_max), 0.0, num_steps + 1, dtype=dtype)
    sigmas = VPCosinePath().sigma(t)
    sigmas[-1] = 0.0  # tan(0) exactly, whatever the rounding of the last linspace point
    return sigmas


def lognormal_sigmas(normal: Tensor, P_mean: float = -1.2, P_std: float = 1.2) -> Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), the EDM training distribution (Karras et al. 2022, Sec. 5),
    from standard normal draws `normal`."""
    return torch.exp(P_mean + P_std * normal)


def pf_ode_velocity(x: Tensor, t: Tensor, x0: Tensor, path: GaussianPath) -> Tensor:
    """dx/dt = a' x0 + b' eps, eps = (x - a x0) / b: the probability-flow ODE given a data prediction."""
    a, b = _bcast(path.a(t), x), _bcast(path.b(t), x)
    eps = (x - a * x0) / b
    return _bcast(path.da(t), x) * x0 + _bcast(path.db(t), x) * eps


def _vec_t(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])


def euler_step(x0_fn: X0Fn, x: Tensor, t: Tensor | float, t_next: Tensor | float, path: GaussianPath) -> Tensor:
    """One Euler step of the PF-ODE from t to t_next (1 NFE). At t_next = 0 it lands on x0 exactly on EDM."""
    t, t_next = _vec_t(t, x), _vec_t(t_next, x)
    d = pf_ode_velocity(x, t, x0_fn(x, t), path)
    return x + _bcast(t_next - t, x) * d


def heun_step(x0_fn: X0Fn, x: Tensor, t: Tensor | float, t_next: Tensor | float, path: GaussianPath) -> Tensor:
    """Algorithm 1 of Karras et al. 2022: Euler predictor + trapezoidal corrector (2 NFE)."""
    t, t_next = _vec_t(t, x), _vec_t(t_next, x)
    h = _bcast(t_next - t, x)
    d = pf_ode_velocity(x, t, x0_fn(x, t), path)
    x_euler = x + h * d
    d_next = pf_ode_velocity(x_euler, t_next, x0_fn(x_euler, t_next), path)
    return x + h * 0.5 * (d + d_next)


def solve_ode(x0_fn: X0Fn, x_T: Tensor, times: Tensor, path: GaussianPath, method: str = "heun",
              euler_last: int = 1) -> Tensor:
    """Integrate the PF-ODE through `times` (decreasing). Heun for every step but the last
    `euler_last` ones (a Heun step into b(t) = 0 would divide by zero), Euler there."""
    if method not in ("heun", "euler"):
        raise ValueError(f"solver: unknown method {method!r}; choose 'heun' or 'euler'.")
    num_steps = len(times) - 1
    heun, euler = HeunStep(path), EulerStep(path)
    steps = [heun if method == "heun" and i < num_steps - euler_last else euler for i in range(num_steps)]
    return run_steps(x0_fn, x_T, times, steps).x


def heun_schedule_for_nfe(nfe: int) -> tuple[int, int]:
    """(heun_steps, euler_steps) spending exactly `nfe` evaluations; 35 NFE -> 17 Heun + 1 Euler = 18 steps.

    Odd NFE: the usual EDM schedule, Heun everywhere but the final Euler step. Even NFE: one more
    Euler step at the end.
    """
    if nfe < 1:
        raise ValueError(f"nfe: must be >= 1, got {nfe}.")
    heun = (nfe - 1) // 2
    return heun, nfe - 2 * heun


def sample_edm_heun(x0_fn: X0Fn, noise: Tensor, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, method: str = "heun", grid: str = "karras") -> Tensor:
    """Deterministic EDM sampler with exactly `nfe` evaluations of `x0_fn` (in EDM coordinates).

    `noise` is unit Gaussian; the start is sigma_max * noise. method: "heun" (Karras et al.'s schedule, see
    `heun_schedule_for_nfe`), "euler", or the training-free multistep solvers "dpmpp_2m" (`DPMSolverPP2M`) and
    "unipc" (`UniPC`), which take `nfe` steps. grid: "karras" (Karras et al.'s Eq. 5: the steps' sigmas from
    sigma_max to sigma_min with `rho`, then 0) or "cosine" (`cosine_sigmas`: even in the VP cosine time from sigma_max
    to 0; Euler on it is DDIM).
    """
    if method not in ODE_SOLVERS:
        raise ValueError(f"solver: unknown method {method!r}; choose one of {', '.join(ODE_SOLVERS)}.")
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"grid: unknown grid {grid!r}; choose one of {', '.join(SIGMA_GRIDS)}.")
    path = EDMPath(sigma_min, sigma_max)

    def sigmas_for(steps: int) -> Tensor:
        sigmas = (karras_sigmas(steps, sigma_min, sigma_max, rho) if grid == "karras"
                  else cosine_sigmas(steps, sigma_max))
        return sigmas.to(noise.dtype)

    if method in MULTISTEP_SOLVERS:
        return run_steps(x0_fn, noise * sigma_max, sigmas_for(nfe), MULTISTEP_SOLVERS[method](path)).x
    if method == "euler":
        heun, euler = 0, nfe
    else:
        heun, euler = heun_schedule_for_nfe(nfe)
    sigmas = sigmas_for(heun + euler)
    return solve_ode(x0_fn, noise * sigma_max, sigmas, path, method="heun", euler_last=euler)


def discrete_lognormal_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """iCT's noise-level distribution over the intervals of an increasing grid (Song & Dhariwal 2023, Sec. 3.5).

    p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)):
    the lognormal mass between adjacent grid points. `sigmas` [N] increasing -> probabilities [N - 1].
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("sigmas: need an increasing 1-D grid with at least 2 points (index 0 = sigma_min).")
    cdf = torch.erf((torch.log(sigmas.double()) - P_mean) / (2.0**0.5 * P_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def consistency_sigmas(nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                       sigmas: list[float] | None = None, dtype=torch.float64) -> Tensor:
    """The `nfe` noise levels (EDM sigma, decreasing, first = sigma_max) at which a consistency model is evaluated.

    Default intermediate levels: the first `nfe` points of the Karras grid with nfe + 1 points
    (e.g. 2 steps: sigma_mid = 2.52; 4 steps: 17.5, 2.52, 0.170 for [0.002, 80], rho 7).
    `sigmas` gives the nfe - 1 intermediate levels by hand (the papers tune them: CM ImageNet-64 CD
    2-step uses 1.382, sCM CIFAR-10 0.82).
    """
    if nfe < 1:
        raise ValueError(f"nfe: must be >= 1, got {nfe}.")
    if sigmas is None:
        return karras_sigmas(nfe + 1, sigma_min, sigma_max, rho, append_zero=False, dtype=dtype)[:nfe]
    mids = torch.as_tensor(list(sigmas), dtype=dtype).flatten()
    if mids.numel() != nfe - 1:
        raise ValueError(f"sigmas: {nfe} NFE need {nfe - 1} intermediate noise levels, got {mids.numel()}.")
    levels = torch.cat([torch.tensor([sigma_max], dtype=dtype), mids])
    if mids.numel() and not (bool((levels[1:] < levels[:-1]).all()) and float(mids.min()) > sigma_min):
        raise ValueError(f"sigmas: intermediate levels must decrease strictly inside ({sigma_min}, {sigma_max}), "
                         f"got {mids.tolist()}.")
    return levels


def multistep_consistency_sample(f_fn: X0Fn, noise: Tensor, times: Tensor, path: GaussianPath,
                                 noise_fn: Callable[[], Tensor], t_min: float = 0.0) -> Tensor:
    """Algorithm 1 of Song et al. 2023 (multistep consistency sampling) on any path; len(times) NFE.

    x = f(b(T) z, T) with T = times[0]; then for each later tau: x_tau ~ q(x_tau | x at t_min)
    (`GaussianPath.transition`) and x = f(x_tau, tau). `f_fn(x_t, t)` is the consistency function in
    the path's coordinates, `noise_fn()` draws a fresh unit-Gaussian tensor shaped like `noise`.
    """
    times = torch.as_tensor(times)
    if times.ndim != 1 or times.numel() < 1:
        raise ValueError("times: need a 1-D tensor of at least one time.")
    T = _vec_t(times[0].item(), noise)
    return denoise_renoise(f_fn, _bcast(path.b(T), noise) * noise, times, path, lambda like: noise_fn(), t_min=t_min)


# ===================================================================================================== protocol
def gaussian_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """A `noise_fn` for the stochastic steps: unit Gaussians shaped like its argument, drawn from `generator`
    on the generator's device (the CPU when None, with the global RNG) and moved to the argument's device, so
    a CPU generator gives the same draws whatever device samples."""

    def draw(like: Tensor) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)

    return draw


@dataclass
class SamplerState:
    """What a sampler carries from one step to the next.

    x: the state [B, ...] at time t; t: per-sample times [B] (in x's dtype); extra: anything else a step
    needs again later, e.g. ``"x0"`` (the last data estimate), ``"self_cond"`` (`SelfConditioned`),
    ``"v0"`` (CAF's initial velocity). A step returns a new state and never changes the one it got.
    """

    x: Tensor
    t: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, x: Tensor, t: Tensor | float, extra: dict[str, Any] | None = None) -> "SamplerState":
        return cls(x, _vec_t(t, x), dict(extra or {}))

    def advance(self, x: Tensor, t_next: Tensor | float, x0: Tensor | None = None, **updates) -> "SamplerState":
        """The state x at t_next; `x0` is this step's data estimate (None: the step made none)."""
        return SamplerState(x, _vec_t(t_next, x), {**self.extra, "x0": x0, **updates})


class Step:
    """One move of a sampler from `state.t` to `t_next`: ``step(model_fn, state, t_next) -> state``.

    `t_next` is a float, a 0-dim tensor or per-sample times [B]. What `model_fn` is depends on the step
    (see each class). Steps hold their fixed settings (path, noise source, ...) and no per-run state:
    everything that changes between steps travels in `SamplerState.extra`.
    """

    def __call__(self, model_fn: Callable[..., Tensor], state: SamplerState, t_next: Tensor | float) -> SamplerState:
        raise NotImplementedError


def _last_call(fn: Callable[..., Tensor], store: list) -> Callable[..., Tensor]:
    """`fn`, remembering its last output in `store[0]` (to record a step's data estimate without touching its math)."""

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        store[:] = [out]
        return out

    return wrapped


def _at_or_below(t: Tensor | float, t_min: float) -> bool:
    """Whether every time in `t` is <= t_min (the end of a sampler: no re-noising after it)."""
    if isinstance(t, Tensor):
        return bool((t <= t_min).all())
    return float(t) <= t_min


class EulerStep(Step):
    """PF-ODE Euler step (`euler_step`, 1 evaluation). model_fn: data predictor x0(x, t) on `path`."""

    def __init__(self, path: GaussianPath):
        self.path = path

    def __call__(self, model_fn, state, t_next):
        store: list = []
        x = euler_step(_last_call(model_fn, store), state.x, state.t, t_next, self.path)
        return state.advance(x, t_next, x0=store[0])


class HeunStep(Step):
    """Karras et al. 2022's Heun step (`heun_step`, 2 evaluations; t_next must have b(t_next) > 0).
    model_fn: data predictor x0(x, t). The recorded estimate is the second (corrector) evaluation's."""

    def __init__(self, path: GaussianPath):
        self.path = path

    def __call__(self, model_fn, state, t_next):
        store: list = []
        x = heun_step(_last_call(model_fn, store), state.x, state.t, t_next, self.path)
        return state.advance(x, t_next, x0=store[0])


def _ddim(x: Tensor, t: Tensor, t_next: Tensor, x0: Tensor, path: GaussianPath) -> Tensor:
    """x' = a(t') x0 + b(t') eps with eps = (x - a(t) x0) / b(t): keep the model's noise, move to t'."""
    _, eps = to_x0_eps(x0, "x0", x, t, path)
    return path.noise(x0, eps, t_next)


class DDIMStep(Step):
    """Deterministic DDIM step (Song, Meng & Ermon 2021, eta = 0) on any Gaussian path, 1 evaluation.

    With x0 = model_fn(x, t) and the noise it implies, eps = (x - a(t) x0) / b(t):
        x' = a(t') x0 + b(t') eps.
    This is the PF-ODE's Euler step in the path-free coordinates (x / a, sigma = b / a), so the result does not
    depend on which path the times are written on, and it is exact when the model's x0 stays constant along
    the trajectory (e.g. data that is a single point); for spread-out data it is a first-order solver.
    At t' = 0 on a path with a(0) = 1, b(0) = 0 it returns x0.

    clip_x0: clamp x0 to [-clip_x0, clip_x0] before eps is computed (Analog Bits clips its bit estimates).
    """

    def __init__(self, path: GaussianPath, clip_x0: float | None = None):
        self.path, self.clip_x0 = path, clip_x0

    def estimate(self, model_fn, x: Tensor, t: Tensor) -> Tensor:
        x0 = model_fn(x, t)
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)

    def __call__(self, model_fn, state, t_next):
        x0 = self.estimate(model_fn, state.x, state.t)
        return state.advance(_ddim(state.x, state.t, _vec_t(t_next, state.x), x0, self.path), t_next, x0=x0)


class DDIMHeunStep(DDIMStep):
    """Karras et al. 2022's Heun step (Algorithm 1) in DDIM's coordinates (x / a, sigma = b / a), where DDIM is
    Euler's step: 2 evaluations, second order where DDIM is first, and like DDIM independent of the path the times
    are written on. DDIM's step to x_e at t', then the trapezoidal corrector with the noise predicted there:
        x' = x_e + a(t') (sigma(t') - sigma(t)) (eps(x_e, t') - eps(x, t)) / 2.
    On `EDMPath` (a = 1, sigma = t) it is `HeunStep`. A sample whose t' has b(t') = 0 (the end of a grid) keeps the
    DDIM step, as EDM's sampler takes its last step with Euler (its second evaluation is made at t and discarded,
    so the batch stays whole). The recorded estimate is the first evaluation's."""

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        t_next = _vec_t(t_next, x)
        x0 = self.estimate(model_fn, x, t)
        _, eps = to_x0_eps(x0, "x0", x, t, self.path)
        x_ddim = self.path.noise(x0, eps, t_next)
        b_next = self.path.b(t_next)
        ends = b_next <= 0
        x0_next = self.estimate(model_fn, x_ddim, torch.where(ends, t, t_next))
        a_next = _bcast(self.path.a(t_next), x)
        eps_next = (x_ddim - a_next * x0_next) / _bcast(torch.where(ends, torch.ones_like(b_next), b_next), x)
        sigma, sigma_next = self.path.b(t) / self.path.a(t), b_next / self.path.a(t_next)
        correction = a_next * _bcast(sigma_next - sigma, x) * 0.5 * (eps_next - eps)
        keep_ddim = ends.reshape(-1, *([1] * (x.ndim - 1)))
        return state.advance(torch.where(keep_ddim, x_ddim, x_ddim + correction), t_next, x0=x0)


class StochasticDDIMStep(DDIMStep):
    """The stochastic N-step sampler of Meng et al. 2023 ("On Distillation of Guided Diffusion Models"), written
    for any Gaussian path (the paper's is the VP path), 1 evaluation per step like plain DDIM. It suits a student
    distilled to make accurate jumps of twice the step (an N/2-step student).

    From x at t to t' < t: a deterministic DDIM jump of twice the step, to u = max(2 t' - t, t_min), then
    forward re-noising from u back up to t' with the path's transition kernel q(x_t' | x_u):
        x_u = a(u) x0 + b(u) eps,          x0 = model_fn(x, t), eps = (x - a(t) x0) / b(t)
        x'  = (a(t') / a(u)) x_u + sqrt(b(t')^2 - (a(t') b(u) / a(u))^2) z,    z ~ N(0, I) fresh.
    The step ending at t' <= t_min is plain DDIM (no noise after the last step). On the VP path
    (a^2 + b^2 = 1) the noise std is sqrt(1 - a(t')^2 / a(u)^2).

    noise_fn(like) draws z (e.g. `gaussian_noise(generator)`).
    """

    def __init__(self, path: GaussianPath, noise_fn: NoiseFn, t_min: float = 0.0, clip_x0: float | None = None):
        super().__init__(path, clip_x0)
        self.noise_fn, self.t_min = noise_fn, float(t_min)

    def __call__(self, model_fn, state, t_next):
        if _at_or_below(t_next, self.t_min):
            return super().__call__(model_fn, state, t_next)
        x, t = state.x, state.t
        t_next_v = _vec_t(t_next, x)
        u = (2.0 * t_next_v - t).clamp_min(self.t_min)
        x0 = self.estimate(model_fn, x, t)
        x_u = _ddim(x, t, u, x0, self.path)
        return state.advance(self.path.transition(x_u, u, t_next_v, self.noise_fn(x_u)), t_next, x0=x0)


class DenoiseRenoise(Step):
    """Denoise, then re-noise with fresh noise (1 evaluation): the step of multistep consistency sampling
    (Song et al. 2023, Algorithm 1) and of DMD2's multi-step generator (Yin et al. 2024, Sec. 4.5).

    model_fn: f(x, t) -> x̂0 (a consistency function, or a one-step generator's output). Then
        t_min None:   x' = a(t') x̂0 + b(t') z          (x̂0 is clean data: a fresh sample of q(x_t' | x̂0); DMD2)
        t_min float:  x' ~ q(x_t' | x_t_min = x̂0)      (x̂0 is the state at the boundary time t_min of a consistency
                                                       model, f(x, t_min) = x; on EDM x' = x̂0 + sqrt(t'^2 - t_min^2) z)
    with z = noise_fn(x̂0). Both agree mathematically at t_min = 0 (up to rounding); they are kept apart so
    that each caller computes exactly what it always did. A step to t' <= t_min (or <= 0 when t_min is None)
    returns x̂0 itself and draws no noise: that is the last step of a sampler.
    """

    def __init__(self, path: GaussianPath, noise_fn: NoiseFn, t_min: float | None = None):
        self.path, self.noise_fn = path, noise_fn
        self.t_min = None if t_min is None else float(t_min)

    def __call__(self, model_fn, state, t_next):
        x0 = model_fn(state.x, state.t)
        if _at_or_below(t_next, 0.0 if self.t_min is None else self.t_min):
            return state.advance(x0, t_next, x0=x0)
        z = self.noise_fn(x0)
        if self.t_min is None:
            x = self.path.noise(x0, z, t_next)
        else:
            x = self.path.transition(x0, self.t_min, t_next, z)
        return state.advance(x, t_next, x0=x0)


class TwoTimeJump(Step):
    """Jump with a two-time map and optionally re-noise: CTM's gamma-sampling (Kim et al. 2024).

    model_fn: G(x, t, s) -> the state at time s <= t (CTM's trajectory map G, a flow map f; e.g.
    ``lambda x, t, s: net.jump(x, t, s)``), 1 evaluation per step. From t to t':
        s' = sqrt(1 - gamma^2) (t' - t_min) + t_min,      x_s' = G(x, t, s'),
        x' ~ q(x_t' | x_s')   (on EDM: x_s' + sqrt(t'^2 - s'^2) z).
    gamma = 0: the deterministic long jump x' = G(x, t, t') (no noise); gamma = 1: s' = t_min, i.e. jump to the
    end and re-noise, which is `DenoiseRenoise(path, noise_fn, t_min)` with f(x, t) = G(x, t, t_min). The
    interpolation is in the path's own time (CTM's sigma on EDM, where t_min = sigma_min as in its code).
    No noise after the last step (t' <= t_min): there it jumps to t'.
    """

    def __init__(self, path: GaussianPath, gamma: float = 0.0, noise_fn: NoiseFn | None = None, t_min: float = 0.0):
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma: CTM's re-noising strength must be in [0, 1], got {gamma!r}.")
        if gamma > 0 and noise_fn is None:
            raise ValueError("noise_fn: gamma > 0 re-noises; give a noise source (e.g. gaussian_noise(generator)).")
        self.path, self.gamma, self.noise_fn, self.t_min = path, float(gamma), noise_fn, float(t_min)

    def intermediate(self, t_next: Tensor | float) -> Tensor | float:
        """s' = sqrt(1 - gamma^2) (t' - t_min) + t_min (t' itself at gamma = 0, t_min at gamma = 1)."""
        if self.gamma == 0.0:
            return t_next
        if self.gamma == 1.0:
            return self.t_min
        return math.sqrt(1.0 - self.gamma**2) * (t_next - self.t_min) + self.t_min

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        if self.gamma == 0.0 or _at_or_below(t_next, self.t_min):
            return state.advance(model_fn(x, t, _vec_t(t_next, x)), t_next)
        s = self.intermediate(t_next)
        x_s = model_fn(x, t, _vec_t(s, x))
        return state.advance(self.path.transition(x_s, s, t_next, self.noise_fn(x_s)), t_next)


class SelfConditioned(Step):
    """Self-conditioning (Chen, Zhang & Hinton 2022, Analog Bits): the model also sees its previous data estimate.

    model_fn: the inner step's model function with the previous estimate as one more, last argument, e.g.
    x0(x, t, x0_prev) -> x0. Wraps any step that records a data estimate (DDIM, Euler, Heun, DenoiseRenoise,
    ...): at the first step x0_prev is zeros, afterwards the estimate the previous step recorded, kept as
    ``extra["self_cond"]`` (no extra evaluations). Every evaluation inside one step (Heun's two) sees the same
    previous estimate.
    """

    def __init__(self, step: Step, key: str = "self_cond"):
        self.step, self.key = step, key

    def __call__(self, model_fn, state, t_next):
        previous = state.extra.get(self.key)
        if previous is None:
            previous = torch.zeros_like(state.x)
        new = self.step(lambda *args: model_fn(*args, previous), state, t_next)
        if new.extra.get("x0") is None:
            raise ValueError(f"SelfConditioned: {type(self.step).__name__} records no data estimate to feed back.")
        new.extra[self.key] = new.extra["x0"]
        return new


class ConstantAccelerationStep(Step):
    """Constant Acceleration Flow's N-step sampler (Park et al. 2024), 1 evaluation per step plus one for v0.

    CAF runs its own clock tau from noise (tau = 0) to data (tau = 1); with the package's time t (noise at
    t = 1 on the linear path) tau = 1 - t, and a step from t to t' has length h = t - t' > 0:
        x' = x + h v0 + h (tau + h / 2) a(x, t, v0),      tau = 1 - t,
    exact when the acceleration is constant along the path. v0 and a are CAF's derivatives dx/dtau and
    d^2x/dtau^2 (their signs follow tau); model functions get the package's t and convert to tau themselves.

    model_fn: the acceleration network a(x, t, v0). v0 is the initial velocity, computed once by
    `velocity_fn(x, t)` at the first step (CAF: v0 = v(x_noise, tau = 0)) and kept as ``extra["v0"]``; or put
    it in `extra` before the loop (CAF's inversion starts from v0 = v(x_data, tau = 1)). Count `velocity_fn`
    with the loop's counter yourself (``counter.counted(velocity_fn)``): it is not `model_fn`.
    """

    def __init__(self, velocity_fn: Callable[[Tensor, Tensor], Tensor] | None = None, key: str = "v0"):
        self.velocity_fn, self.key = velocity_fn, key

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        v0 = state.extra.get(self.key)
        if v0 is None:
            if self.velocity_fn is None:
                raise ValueError(f"ConstantAccelerationStep: no initial velocity; give velocity_fn or extra[{self.key!r}].")
            v0 = self.velocity_fn(x, t)
        h = _bcast(t - _vec_t(t_next, x), x)
        tau = _bcast(1.0 - t, x)
        x_next = x + h * v0 + h * (tau + 0.5 * h) * model_fn(x, t, v0)
        return state.advance(x_next, t_next, **{self.key: v0})


def _coefficients(path: GaussianPath, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """a(t), b(t) and lambda(t) = ln(a / b) in float64, broadcast against `like` (lambda = +inf where b = 0)."""
    t = t.double()
    return _bcast(path.a(t), like), _bcast(path.b(t), like), _bcast(path.log_snr(t), like)


class DPMSolverPP2M(Step):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep solver of the PF-ODE
    in data prediction, 1 evaluation per step, on any Gaussian path through lambda = ln(a / b). With x0_i = model_fn
    and h_i = lambda(t_{i+1}) - lambda(t_i):
        D_i = x0_i + (x0_i - x0_{i-1}) h_i / (2 h_{i-1})          (D_0 = x0_0: the first step is DDIM)
        x_{i+1} = (b_{i+1} / b_i) x_i - a_{i+1} (e^{-h_i} - 1) D_i.
    A step into b = 0 returns a x0 (first order there, as diffusers' `lower_order_final`: lambda is infinite).
    The previous (lambda, x0) travels in ``extra["dpm_prev"]``.
    """

    def __init__(self, path: GaussianPath):
        self.path = path

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        t_next = _vec_t(t_next, x)
        x0 = model_fn(x, t)
        a_next, b_next, lam_next = _coefficients(self.path, t_next, x)
        _, b, lam = _coefficients(self.path, t, x)
        if bool((b_next == 0).all()):
            return state.advance((a_next * x0.double()).to(x.dtype), t_next, x0=x0, dpm_prev=None)
        h = lam_next - lam
        D = x0.double()
        prev = state.extra.get("dpm_prev")
        if prev is not None:
            lam_prev, x0_prev = prev
            D = D + (D - x0_prev.double()) * h / (2.0 * (lam - lam_prev))
        x_next = (b_next / b) * x.double() - a_next * torch.expm1(-h) * D
        return state.advance(x_next.to(x.dtype), t_next, x0=x0, dpm_prev=(lam, x0))


class UniPC(Step):
    """UniPC-2 (Zhao et al. 2023, "UniPC"), B(h) = e^h - 1 ("bh2"), data prediction, 1 evaluation per step, on any
    Gaussian path through lambda = ln(a / b), as diffusers' `UniPCMultistepScheduler` (solver_order=2).

    Each step first corrects its own start with UniC, reusing the evaluation just made there (so the corrector costs
    no evaluation), then predicts with UniP-2. With hh = -h, phi_1 = e^{hh} - 1 and B = e^{hh} - 1:
        UniP:  x' = (b' / b) x - a' phi_1 m0 - a' B rho_p D1,       D1 = (m_{-1} - m0) / r, r = (lambda_{-1} - lambda) / h,
               rho_p = 1/2 (first step: no D1);
        UniC:  x_c = (b / b_{-1}) x_{-1} - a phi_1 m_{-1} - a B (rho_c D1 + rho_t (m - m_{-1})),
               [rho_c, rho_t] solves R rho = g (R = [[1, 1], [r, 1]], g_k from the phi functions; order 1: rho_t = 1/2).
    Orders follow diffusers: the corrector's order is the previous step's predictor order. A step into b = 0
    returns a m (first order there). History travels in ``extra["unipc"]``.
    """

    def __init__(self, path: GaussianPath):
        self.path = path

    @staticmethod
    def _phi(h: Tensor, order: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """hh = -h, phi_1 = e^{hh} - 1, and g_k = h_phi_k k! / B(h) for k = 1..order (bh2: B(h) = e^{hh} - 1)."""
        hh = -h
        phi_1 = torch.expm1(hh)
        B = torch.expm1(hh)
        h_phi_k, factorial, g = phi_1 / hh - 1.0, 1.0, []
        for k in range(1, order + 1):
            g.append(h_phi_k * factorial / B)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return phi_1, B, g

    def __call__(self, model_fn, state, t_next):
        x, t = state.x, state.t
        t_next = _vec_t(t_next, x)
        m = model_fn(x, t).double()
        a, b, lam = _coefficients(self.path, t, x)
        history = state.extra.get("unipc") or {}
        xd = x.double()
        if "x" in history:  # UniC on the last step, with the evaluation just made at its end
            x_prev, lam_prev, m_prev = history["x"], history["lam"], history["m"]
            h = lam - lam_prev
            order = history["order"]
            phi_1, B, g = self._phi(h, order)
            if order == 2:
                r = (history["lam_older"] - lam_prev) / h
                D1 = (history["m_older"] - m_prev) / r
                det = 1.0 - r  # [[1, 1], [r, 1]] rho = [g1, g2]
                rho_c, rho_t = (g[0] - g[1]) / det, (g[1] - r * g[0]) / det
                correction = rho_c * D1 + rho_t * (m - m_prev)
            else:
                correction = 0.5 * (m - m_prev)
            xd = (b / history["b"]) * x_prev - a * phi_1 * m_prev - a * B * correction
        a_next, b_next, lam_next = _coefficients(self.path, t_next, x)
        if bool((b_next == 0).all()):
            return state.advance((a_next * m).to(x.dtype), t_next, x0=m.to(x.dtype), unipc=None)
        h = lam_next - lam
        order = 2 if "m" in history else 1
        phi_1, B, _ = self._phi(h, order)
        x_next = (b_next / b) * xd - a_next * phi_1 * m
        if order == 2:
            r = (history["lam"] - lam) / h
            x_next = x_next - a_next * B * 0.5 * (history["m"] - m) / r
        carry = {"x": xd, "b": b, "lam": lam, "m": m, "order": order,
                 "lam_older": history.get("lam"), "m_older": history.get("m")}
        return state.advance(x_next.to(x.dtype), t_next, x0=m.to(x.dtype), unipc=carry)


# Training-free multistep solvers by name (`sample --solver`); each takes one evaluation per step.
MULTISTEP_SOLVERS: dict[str, type[Step]] = {"dpmpp_2m": DPMSolverPP2M, "unipc": UniPC}
ODE_SOLVERS = ("heun", "euler", *MULTISTEP_SOLVERS)
SIGMA_GRIDS = ("karras", "cosine")  # the noise-level grids of `sample_edm_heun`


def run_steps(model_fn: Callable[..., Tensor], x: Tensor | SamplerState, times: Tensor | Sequence[float],
              step: Step | Sequence[Step], counter: NFECounter | None = None, per_call: int = 1,
              extra: dict[str, Any] | None = None) -> SamplerState:
    """Run a sampler: from `x` at times[0], apply the step for each interval (times[i] -> times[i + 1]).

    times: a decreasing 1-D grid (tensor or floats), len = number of steps + 1. step: one `Step` for every
        interval, or a list with one per interval (e.g. Heun everywhere but a final Euler step).
    x: the start state at times[0], or a `SamplerState` to continue from (then `extra` is ignored).
    counter: when given, every call of `model_fn` adds `per_call` evaluations per sample to it. Leave it None
        when `model_fn` counts itself (the guidance functions add 1 or 2 per call to their own counter).
    extra: initial `SamplerState.extra` (e.g. a known CAF v0).
    Returns the final state (its x at times[-1]; ``extra["x0"]``: the last step's data estimate).
    """
    grid = times.tolist() if isinstance(times, Tensor) else [float(t) for t in times]
    if isinstance(times, Tensor) and times.ndim != 1:
        raise ValueError("times: need a 1-D grid of times, one per step boundary.")
    steps = [step] * (len(grid) - 1) if isinstance(step, Step) else list(step)
    if len(steps) != len(grid) - 1:
        raise ValueError(f"step: {len(grid)} times make {len(grid) - 1} steps, got {len(steps)} steps.")
    if counter is not None:
        model_fn = counter.counted(model_fn, per_call)
    state = x if isinstance(x, SamplerState) else SamplerState.start(x, grid[0], extra)
    for one, t_next in zip(steps, grid[1:]):
        state = one(model_fn, state, t_next)
    return state


def denoise_renoise(f_fn: X0Fn, x: Tensor, times: Tensor | Sequence[float], path: GaussianPath, noise_fn: NoiseFn,
                    t_min: float | None = None) -> Tensor:
    """The denoise-and-renoise sampler: x̂0 = f(x, t_i), then x = a fresh noisy version of x̂0 at t_(i+1), ...;
    returns the last x̂0. len(times) evaluations of `f_fn`.

    x: the state at times[0] (e.g. b(T) z). times: the evaluation times, decreasing. t_min: see `DenoiseRenoise`
    (None: DMD2's x = x̂0 + sigma z on EDM; a float: consistency models' boundary time). noise_fn(like) draws the
    re-noising noise, len(times) - 1 draws in order (`gaussian_noise(generator)` when sampling; a training
    module passes its own resumable draw).
    """
    grid = times.tolist() if isinstance(times, Tensor) else [float(t) for t in times]
    if not grid:
        raise ValueError("times: need at least one time.")
    end = 0.0 if t_min is None else float(t_min)
    return run_steps(f_fn, x, [*grid, end], DenoiseRenoise(path, noise_fn, t_min)).x
