"""Time grids and probability-flow ODE solvers on any Gaussian path.

The PF-ODE of x_t = a x + b z is dx/dt = a' x0 + b' eps with eps = (x - a x0) / b, which for the
EDM path is Karras et al.'s dx/dsigma = (x - D(x, sigma)) / sigma. Solvers take a data predictor
`x0_fn(x_t, t) -> x0` in the path's own coordinates, so one solver serves every teacher.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .paths import EDMPath, GaussianPath, _bcast

__all__ = [
    "NFECounter",
    "karras_sigmas",
    "uniform_times",
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
]

X0Fn = Callable[[Tensor, Tensor], Tensor]


class NFECounter:
    """Counts network evaluations per sample. Wrappers call `add(k)` once per batched forward."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, k: int = 1) -> None:
        self.count += k

    def counted(self, x0_fn: X0Fn, per_call: int = 1) -> X0Fn:
        def wrapped(x, t):
            self.add(per_call)
            return x0_fn(x, t)

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
    x = x_T
    num_steps = len(times) - 1
    for i in range(num_steps):
        t, t_next = times[i].item(), times[i + 1].item()
        use_heun = method == "heun" and i < num_steps - euler_last
        x = (heun_step if use_heun else euler_step)(x0_fn, x, t, t_next, path)
    return x


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
                    rho: float = 7.0, method: str = "heun") -> Tensor:
    """Deterministic EDM sampler with exactly `nfe` evaluations of `x0_fn` (in EDM coordinates).

    `noise` is unit Gaussian; the start is sigma_max * noise. With method="euler" every step is Euler.
    """
    if method not in ("heun", "euler"):
        raise ValueError(f"solver: unknown method {method!r}; choose 'heun' or 'euler'.")
    path = EDMPath(sigma_min, sigma_max)
    if method == "euler":
        heun, euler = 0, nfe
    else:
        heun, euler = heun_schedule_for_nfe(nfe)
    sigmas = karras_sigmas(heun + euler, sigma_min, sigma_max, rho).to(noise.dtype)
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
    x = f_fn(_bcast(path.b(T), noise) * noise, T)
    for tau in times[1:].tolist():
        x = f_fn(path.transition(x, t_min, tau, noise_fn()), _vec_t(tau, noise))
    return x
