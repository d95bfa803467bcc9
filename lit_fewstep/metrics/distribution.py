"""Sample-based distribution metrics as torchmetrics ``Metric`` subclasses.

All metrics here work on *flattened* samples: a batch ``[N, ...]`` is reshaped to ``[N, D]``. Images are
either flattened as they are or passed through a feature network by the caller first.

API (shared by every metric in this file)::

    metric.update(fake=x_fake)            # generated samples, [N, ...]
    metric.update(real=x_real)            # reference samples, [M, ...]
    metric.update(x_fake, x_real)         # both at once (either may be None)
    value = metric.compute()              # float tensor (float64 unless stated)

States are lists of samples with ``dist_reduce_fx="cat"``, so under DDP every rank updates its own shard and
``compute()`` sees the union of all shards (order: rank 0, rank 1, ...). Every computation is invariant to the
order of the samples and runs in float64, and all randomness (projection directions, bandwidth subsets) comes
from a ``torch.Generator`` seeded inside ``compute()``, so 1 process and N processes give the same number.

``reset_real=False`` keeps the reference samples across ``reset()`` (a fixed real set evaluated every epoch).
Reference samples are kept on the metric's device; for large sets compute features first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["SlicedWasserstein2", "MMD", "ExactNLL", "PrecisionRecall", "wasserstein2_1d_squared", "energy_distance"]


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    x = x.detach()
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)


def _pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances ``[N, M]`` (float64 in, clamped at 0)."""
    d = x.square().sum(1, keepdim=True) + y.square().sum(1).unsqueeze(0) - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0)


_REFERENCE_TERMS: dict[tuple, Tensor] = {}  # terms that depend on the reference samples only, by their bytes
_REFERENCE_TERMS_KEPT = 8
_REFERENCE_TERM_MAX_ELEMENTS = 2**24  # callers keep no larger term (128 MiB in float64): they recompute it instead


def _reference_term(name: str, y: Tensor, params: tuple, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()``, remembered for the last few reference sets: an evaluator scores many sample sets against one
    fixed reference, and the reference-only terms (MMD's M x M kernel sum, the reference's k-NN radii, its sorted
    projections) are most of a score's cost. Keyed by the reference's bytes, so a changed reference is recomputed."""
    key = (name, hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest(), tuple(y.shape), str(y.dtype), str(y.device),
           params)
    if key not in _REFERENCE_TERMS:
        while len(_REFERENCE_TERMS) >= _REFERENCE_TERMS_KEPT:
            _REFERENCE_TERMS.pop(next(iter(_REFERENCE_TERMS)))
        _REFERENCE_TERMS[key] = compute()
    return _REFERENCE_TERMS[key]


class _TwoSampleMetric(Metric):
    """Common state handling: ``fake`` and ``real`` sample lists gathered with ``cat``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, reset_real: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(reset_real, bool):
            raise ValueError("reset_real: expected a bool")
        self.reset_real = reset_real
        self._dim: int | None = None
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")

    def _check_dim(self, x: Tensor, name: str) -> None:
        if self._dim is None:
            self._dim = x.shape[1]
        elif x.shape[1] != self._dim:
            raise ValueError(f"{name}: samples have {x.shape[1]} features, earlier ones had {self._dim}")

    def update(self, fake: Tensor | None = None, real: Tensor | None = None) -> None:  # type: ignore[override]
        """Add generated (``fake``) and/or reference (``real``) samples ``[N, ...]``."""
        if fake is None and real is None:
            raise ValueError("update: pass fake=..., real=... or both")
        if fake is not None:
            f = _flat(fake, "fake").to(torch.float64)
            self._check_dim(f, "fake")
            self.fake.append(f)
        if real is not None:
            r = _flat(real, "real").to(torch.float64)
            self._check_dim(r, "real")
            self.real.append(r)

    def reset(self) -> None:
        real = list(self.real) if not self.reset_real else None
        super().reset()
        if real is not None:
            self.real = real
        else:
            self._dim = None

    def _samples(self, min_n: int = 1) -> tuple[Tensor, Tensor]:
        if (isinstance(self.fake, list) and not self.fake) or (isinstance(self.real, list) and not self.real):
            raise RuntimeError(f"{type(self).__name__}.compute: needs both fake and real samples; call update first")
        x, y = dim_zero_cat(self.fake).to(torch.float64), dim_zero_cat(self.real).to(torch.float64)
        if x.shape[0] < min_n or y.shape[0] < min_n:
            raise RuntimeError(
                f"{type(self).__name__}.compute: needs at least {min_n} fake and real samples, "
                f"got {x.shape[0]} and {y.shape[0]}"
            )
        return x, y


def energy_distance(x: Tensor, y: Tensor, chunk: int = 2048) -> Tensor:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely & Rizzo), float64, >= 0 and 0 only for
    equal distributions; the V-statistic (the diagonal zeros count), as in the autoguidance toy comparison."""
    x, y = _flat(x, "x").double(), _flat(y, "y").double()

    def mean_dist(a: Tensor, b: Tensor) -> Tensor:
        total = sum(torch.cdist(a[i:i + chunk], b).sum() for i in range(0, a.shape[0], chunk))
        return total / (a.shape[0] * b.shape[0])

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def wasserstein2_1d_squared(x_sorted: Tensor, y_sorted: Tensor) -> Tensor:
    """Exact squared W2 between 1-D empirical distributions, column-wise.

    ``x_sorted`` ``[N, P]`` and ``y_sorted`` ``[M, P]`` hold ``P`` independent 1-D samples sorted along dim 0.
    W2^2 = int_0^1 (F^-1(u) - G^-1(u))^2 du with the empirical (step) quantile functions; for ``N != M`` the
    integral is evaluated exactly over the merged breakpoints {i/N} U {j/M}. Returns ``[P]``.
    """
    n, m = x_sorted.shape[0], y_sorted.shape[0]
    if n == m:
        return (x_sorted - y_sorted).square().mean(0)
    dev = x_sorted.device
    # Breakpoints as exact rationals on the common grid 1/(N*M) so ties between i/N and j/M merge exactly.
    knots = torch.cat([torch.arange(1, n + 1, device=dev) * m, torch.arange(1, m + 1, device=dev) * n])
    knots = torch.unique(knots)  # sorted, integers in (0, N*M]
    prev = torch.cat([knots.new_zeros(1), knots[:-1]])
    w = (knots - prev).to(torch.float64) / (n * m)  # interval widths, sum to 1
    # On (prev, knot] the quantile index is floor(prev / M) for x (grid unit 1/(N*M)) and floor(prev / N) for y.
    ix = torch.div(prev, m, rounding_mode="floor")
    iy = torch.div(prev, n, rounding_mode="floor")
    return (w.unsqueeze(1) * (x_sorted[ix] - y_sorted[iy]).square()).sum(0)


class SlicedWasserstein2(_TwoSampleMetric):
    r"""Sliced 2-Wasserstein distance between fake and real samples.

    ``compute()`` returns SW2 = sqrt( mean_theta W2^2(theta^T fake, theta^T real) ), i.e. the square root of
    the mean squared 1-D W2 over ``num_projections`` directions drawn uniformly on the unit sphere from
    ``torch.Generator().manual_seed(seed)`` (same directions in every process and every call). Each 1-D W2 is
    exact (sorted samples; unequal counts handled with the exact step-quantile integral). Units are those of
    the samples. For N(0, I) vs N(m, I) in d dimensions, SW2^2 = |m|^2 / d.
    """

    def __init__(
        self, num_projections: int = 1000, seed: int = 0, chunk_size: int = 128, reset_real: bool = True, **kwargs
    ) -> None:
        super().__init__(reset_real=reset_real, **kwargs)
        if num_projections < 1:
            raise ValueError("num_projections: must be >= 1")
        self.num_projections, self.seed, self.chunk_size = int(num_projections), int(seed), int(chunk_size)

    def projections(self, dim: int) -> Tensor:
        """The fixed unit directions ``[dim, num_projections]`` (float64, CPU)."""
        g = torch.Generator().manual_seed(self.seed)
        theta = torch.randn(dim, self.num_projections, generator=g, dtype=torch.float64)
        return theta / theta.norm(dim=0, keepdim=True)

    def compute(self) -> Tensor:
        x, y = self._samples()
        theta = self.projections(x.shape[1]).to(x.device)
        # the reference's sorted projections are remembered when they fit the cache, else sorted chunk by chunk
        whole = y.shape[0] * self.num_projections <= _REFERENCE_TERM_MAX_ELEMENTS
        real_sorted = _reference_term("sorted_projections", y, (self.num_projections, self.seed),
                                      lambda: torch.sort(y @ theta, dim=0).values) if whole else None
        total = x.new_zeros(())
        for s in range(0, self.num_projections, self.chunk_size):
            t = theta[:, s : s + self.chunk_size]
            px, _ = torch.sort(x @ t, dim=0)
            py = real_sorted[:, s : s + self.chunk_size] if whole else torch.sort(y @ t, dim=0).values
            total = total + wasserstein2_1d_squared(px, py).sum()
        return (total / self.num_projections).sqrt()


class MMD(_TwoSampleMetric):
    r"""Unbiased squared maximum mean discrepancy with a mixture of RBF kernels.

    k(x, y) = sum_b exp(-|x - y|^2 / (2 (b * s)^2)) for b in ``bandwidths`` (default 0.1, 0.2, 0.5, 1, 2, 5).
    The scale ``s`` is ``scale`` when it is a number, or, with ``scale="median"`` (default), the median
    pairwise Euclidean distance among the real samples. For the median, at most ``median_samples`` real
    samples are used, picked order-independently (sorted by their projection on a fixed seeded direction,
    then evenly spaced), so the value does not depend on how samples were split across processes.

    ``compute()`` returns the unbiased estimate of MMD^2 (U-statistic: diagonal terms excluded); it is ~0 for
    samples of one distribution and may be slightly negative.
    """

    def __init__(
        self,
        bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        scale: float | str = "median",
        median_samples: int = 1000,
        seed: int = 0,
        chunk_size: int = 1024,
        reset_real: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(reset_real=reset_real, **kwargs)
        if not (scale == "median" or (isinstance(scale, (int, float)) and scale > 0)):
            raise ValueError(f"scale: expected a positive number or 'median', got {scale!r}")
        if not bandwidths or any(b <= 0 for b in bandwidths):
            raise ValueError("bandwidths: expected a non-empty list of positive numbers")
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.scale, self.median_samples, self.seed, self.chunk_size = scale, int(median_samples), int(seed), int(chunk_size)

    def kernel_scale(self, real: Tensor) -> float:
        """The scale ``s`` used for ``real`` samples ``[M, D]``."""
        if self.scale != "median":
            return float(self.scale)
        r = real
        if r.shape[0] > self.median_samples:
            g = torch.Generator().manual_seed(self.seed)
            u = torch.randn(r.shape[1], generator=g, dtype=torch.float64).to(r.device)
            order = torch.argsort(r @ u)
            idx = torch.linspace(0, r.shape[0] - 1, self.median_samples, device=r.device).round().long()
            r = r[order[idx]]
        d2 = _pairwise_sq_dists(r, r)
        iu = torch.triu_indices(r.shape[0], r.shape[0], offset=1, device=r.device)
        med = d2[iu[0], iu[1]].median().sqrt().item() if r.shape[0] > 1 else 0.0
        return med if med > 0 else 1.0

    def _kernel_sum(self, a: Tensor, b: Tensor, gammas: Tensor) -> Tensor:
        """Sum over all pairs of the kernel mixture (chunked over rows of ``a``)."""
        total = a.new_zeros(())
        for s in range(0, a.shape[0], self.chunk_size):
            d2 = _pairwise_sq_dists(a[s : s + self.chunk_size], b)
            for g in gammas:
                total = total + torch.exp(-g * d2).sum()
        return total

    def _real_kernel_sum(self, y: Tensor, gammas: Tensor) -> Tensor:
        """``_kernel_sum(y, y)``, remembered per reference set (10,000 references: 100M pairs)."""
        return _reference_term("mmd_kernel_sum", y, (tuple(gammas.tolist()), self.chunk_size),
                               lambda: self._kernel_sum(y, y, gammas))

    def compute(self) -> Tensor:
        x, y = self._samples(min_n=2)
        s = self.kernel_scale(y)
        gammas = torch.tensor([1.0 / (2.0 * (b * s) ** 2) for b in self.bandwidths], dtype=torch.float64, device=x.device)
        n, m, nb = x.shape[0], y.shape[0], len(self.bandwidths)
        # the diagonal of k(x, x) is exactly nb (exp(0) per bandwidth); remove it for the U-statistic
        kxx = (self._kernel_sum(x, x, gammas) - n * nb) / (n * (n - 1))
        kyy = (self._real_kernel_sum(y, gammas) - m * nb) / (m * (m - 1))
        kxy = self._kernel_sum(x, y, gammas) / (n * m)
        return kxx + kyy - 2.0 * kxy


class ExactNLL(Metric):
    """Mean negative log-likelihood of generated samples under a known density.

    ``log_prob`` maps samples ``[N, ...]`` to log densities ``[N]`` (e.g. a toy distribution's exact
    ``log_prob``). ``update(fake)`` accumulates; ``compute()`` returns mean(-log_prob(fake)) in float64 (nats).
    States are a float64 sum and a count (``dist_reduce_fx="sum"``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, log_prob: Callable[[Tensor], Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        if not callable(log_prob):
            raise TypeError("log_prob: expected a callable mapping samples [N, ...] -> log densities [N]")
        self.log_prob = log_prob
        self.add_state("nll_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, fake: Tensor) -> None:  # type: ignore[override]
        """Add generated samples ``[N, ...]``."""
        with torch.no_grad():
            lp = self.log_prob(fake.detach())
        if lp.shape != (fake.shape[0],):
            raise ValueError(f"log_prob: expected shape ({fake.shape[0]},), got {tuple(lp.shape)}")
        self.nll_sum += -lp.to(torch.float64).sum()
        self.count += fake.shape[0]

    def compute(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("ExactNLL.compute: no samples; call update first")
        return self.nll_sum / self.count


class PrecisionRecall(_TwoSampleMetric):
    """Improved precision and recall with k-NN manifolds (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its samples with radius = distance to the k-th nearest
    other sample of the same set. Precision = fraction of fake samples inside the real manifold; recall =
    fraction of real samples inside the fake manifold. Works on features or raw coordinates.

    ``compute()`` returns a float64 tensor ``[2]`` = ``(precision, recall)``.
    """

    higher_is_better = True

    def __init__(self, k: int = 3, chunk_size: int = 1024, reset_real: bool = True, **kwargs) -> None:
        super().__init__(reset_real=reset_real, **kwargs)
        if k < 1:
            raise ValueError("k: must be >= 1")
        self.k, self.chunk_size = int(k), int(chunk_size)

    def _radii(self, a: Tensor) -> Tensor:
        """Squared distance of each sample to its k-th nearest neighbour in ``a`` (self excluded)."""
        out = []
        for s in range(0, a.shape[0], self.chunk_size):
            d2 = _pairwise_sq_dists(a[s : s + self.chunk_size], a)
            # index k in ascending order: position 0 is the sample itself (distance 0)
            out.append(d2.topk(self.k + 1, dim=1, largest=False).values[:, self.k])
        return torch.cat(out)

    def _coverage(self, query: Tensor, ref: Tensor, radii: Tensor) -> Tensor:
        inside = []
        for s in range(0, query.shape[0], self.chunk_size):
            d2 = _pairwise_sq_dists(query[s : s + self.chunk_size], ref)
            inside.append((d2 <= radii.unsqueeze(0)).any(dim=1))
        return torch.cat(inside).to(torch.float64).mean()

    def compute(self) -> Tensor:
        x, y = self._samples(min_n=self.k + 1)
        real_radii = _reference_term("knn_radii", y, (self.k, self.chunk_size), lambda: self._radii(y))
        precision = self._coverage(x, y, real_radii)
        recall = self._coverage(y, x, self._radii(x))
        return torch.stack([precision, recall])
