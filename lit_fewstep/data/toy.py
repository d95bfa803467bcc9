"""2-D toy distributions with exact samplers (and exact densities where they exist), and their data module.

Every toy returns ``(x [n, 2] float32, y [n] int64)`` from ``sample(n, generator)``; ``y`` is the mixture
component / class the point came from. Coordinates are O(1) (roughly inside [-3, 3]).

=================  =======  ==============================  ==========  ==========================
name               classes  label                           sigma_data  exact log_prob / denoiser
=================  =======  ==============================  ==========  ==========================
``eight_gaussians``  8      which Gaussian                  1.422       yes / yes (GMM)
``checkerboard``     8      which square                    1.155       yes / no
``moons``            2      which moon                      1.062       no  / no
``spirals``          2      which spiral                    1.302       no  / no
``tree``             2      which main branch               1.062       yes / yes (GMM)
``grid``             1      none (0)                        1.131       atomic: exact probability table
=================  =======  ==============================  ==========  ==========================

``sigma_data`` (the data scale used by EDM preconditioning) is the per-coordinate RMS of the data,
``sqrt(E[|x|^2] / 2)``, rounded to 3 decimals: the optimal linear denoiser ``c_skip * x`` is
``E[|x0|^2] / (E[|x0|^2] + d sigma^2)``, so the RMS (not the centred std) is what matters. It is exact for the
Gaussian mixtures and the checkerboard, and for moons/spirals it comes from 10^6 samples drawn with
``torch.Generator().manual_seed(0)`` (checked by ``tests/test_data.py``).

All Gaussian-mixture toys share :class:`GaussianMixture2D`, which also gives the exact score and the exact
denoiser ``E[x0 | x0 + sigma z = x]`` of the noised distribution (used elsewhere as an exact teacher).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lit_fewstep.data.images import _OfflineDataModule, _TensorPairDataset

__all__ = [
    "ToyDistribution",
    "GaussianMixture2D",
    "Checkerboard",
    "TwoMoons",
    "TwoSpirals",
    "eight_gaussians",
    "tree",
    "CategoricalGrid",
    "TOY_NAMES",
    "make_toy",
    "Toy2DDataModule",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _rms_sigma(second_moment_sum: float) -> float:
    """sqrt(E|x|^2 / 2) rounded to 3 decimals (see module docstring)."""
    return round(math.sqrt(second_moment_sum / 2.0), 3)


class ToyDistribution:
    """A 2-D distribution with an exact sampler.

    Subclasses set ``name``, ``num_classes`` and ``sigma_data`` and implement ``sample``; ``log_prob`` is exact
    where a closed form exists (``has_log_prob``) and raises ``NotImplementedError`` otherwise.
    """

    name: str = "toy"
    num_classes: int = 1
    sigma_data: float = 1.0
    has_log_prob: bool = False

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` points: ``(x [n, 2] float32, y [n] int64)``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density ``[n]`` of points ``x [n, 2]``."""
        raise NotImplementedError(f"toy '{self.name}' has no closed-form density; use a sample-based metric instead.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes})"


def _check_n(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: {n!r} is not a valid sample count; pass an integer >= 0.")
    return n


# ----------------------------------------------------------------------------------------------------------------
# Gaussian mixture with exact score / denoiser
# ----------------------------------------------------------------------------------------------------------------


class GaussianMixture2D(ToyDistribution):
    r"""Mixture of 2-D Gaussians with full covariances: exact sampling, density, score and denoiser.

    ``p(x0) = sum_k w_k N(x0; mu_k, S_k)``. Noising ``x = x0 + sigma z`` gives another mixture with covariances
    ``C_k = S_k + sigma^2 I``, so (all exact, closed form)

    * ``log_prob(x, sigma)  = logsumexp_k [log w_k + log N(x; mu_k, C_k)]``
    * ``score(x, sigma)     = -sum_k r_k(x) C_k^{-1} (x - mu_k)``, ``r_k`` the posterior component weights
    * ``denoiser(x, sigma)  = sum_k r_k(x) [mu_k + S_k C_k^{-1} (x - mu_k)]`` (per-component Wiener filter),
      which equals ``x + sigma^2 score(x, sigma)`` (Tweedie).

    With ``class_labels`` [n] the mixture is restricted to that class's components (class-conditional
    density/score/denoiser); a label outside ``[0, num_classes)`` (e.g. ``-1`` or a CFG "null" label equal to
    ``num_classes``) means unconditional for that row.

    ``sigma`` is a python float, a 0-d tensor, or a tensor with ``n`` elements (``[n]`` or ``[n, 1]``).
    Computations are done in float64 and returned in ``x``'s dtype; large batches are processed in chunks.

    Args:
        weights: ``[K]`` non-negative mixture weights (normalised here).
        means: ``[K, 2]``.
        covs: ``[K, 2, 2]`` symmetric positive definite.
        component_class: ``[K]`` int class of each component (default: ``arange(K)``, one class per component).
        num_classes: number of classes (default ``max(component_class) + 1``).
        name: a name for messages.
    """

    has_log_prob = True
    _CHUNK_ELEMENTS = 2**20  # rows x components processed at once (16 MiB per float64 temporary)

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covs: Tensor,
        component_class: Tensor | None = None,
        num_classes: int | None = None,
        name: str = "gmm",
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        k = w.numel()
        if mu.shape != (k, 2) or cov.shape != (k, 2, 2):
            raise ValueError(
                f"GaussianMixture2D: expected weights [K], means [K, 2], covs [K, 2, 2]; got {tuple(w.shape)}, "
                f"{tuple(mu.shape)}, {tuple(cov.shape)}."
            )
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("GaussianMixture2D: weights must be non-negative with a positive sum.")
        if not torch.allclose(cov, cov.transpose(-1, -2)):
            raise ValueError("GaussianMixture2D: covariances must be symmetric.")
        self.chol = torch.linalg.cholesky(cov)  # raises if not positive definite
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        if component_class is None:
            component_class = torch.arange(k)
        self.component_class = torch.as_tensor(component_class, dtype=torch.long).flatten()
        if self.component_class.numel() != k or (self.component_class < 0).any():
            raise ValueError("GaussianMixture2D: component_class must hold one non-negative class per component.")
        self.num_classes = int(num_classes) if num_classes is not None else int(self.component_class.max()) + 1
        if int(self.component_class.max()) >= self.num_classes:
            raise ValueError("GaussianMixture2D: a component_class entry is >= num_classes.")
        self.name = name
        # log of the total weight of each class, for class-conditional normalisation
        class_w = torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.component_class, self.weights)
        self._log_class_weight = class_w.log()
        self.sigma_data = _rms_sigma(float(self.second_moment().trace()))

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    def to(self, device: torch.device | str) -> "GaussianMixture2D":
        """Move the parameters to ``device`` in place (so score/denoiser calls need no copies); returns self.
        ``sample`` always draws on the CPU (with a CPU generator)."""
        for key in ("weights", "means", "covs", "chol", "component_class", "_log_class_weight"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    # ---- exact moments -------------------------------------------------------------------------------------
    def mean(self) -> Tensor:
        """Exact mean ``[2]`` (float64)."""
        return self.weights @ self.means

    def second_moment(self) -> Tensor:
        """Exact ``E[x x^T]`` ``[2, 2]`` (float64)."""
        outer = self.covs + self.means[:, :, None] * self.means[:, None, :]
        return (self.weights[:, None, None] * outer).sum(0)

    def covariance(self) -> Tensor:
        """Exact covariance ``[2, 2]`` (float64)."""
        m = self.mean()
        return self.second_moment() - torch.outer(m, m)

    # ---- sampling ------------------------------------------------------------------------------------------
    def sample(
        self, n: int, generator: torch.Generator | None = None, class_label: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` points ``(x [n, 2] float32, y [n] int64 class)``; ``class_label`` restricts to one class."""
        n = _check_n(n)
        w, cls = self.weights.cpu(), self.component_class.cpu()
        if class_label is not None:
            if not 0 <= class_label < self.num_classes:
                raise ValueError(f"class_label: {class_label} is not in [0, {self.num_classes}).")
            w = torch.where(cls == class_label, w, torch.zeros_like(w))
        if n == 0:
            return torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = self.means.cpu()[comp] + (self.chol.cpu()[comp] @ z[:, :, None]).squeeze(-1)
        return x.float(), cls[comp].clone()

    # ---- exact noised quantities ---------------------------------------------------------------------------
    def _prepare(self, x: Tensor, sigma, class_labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x: expected shape [n, 2], got {tuple(x.shape)}.")
        n = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if s.numel() == 1:
            s = s.reshape(1).expand(n)
        elif s.numel() == n:
            s = s.reshape(n)
        else:
            raise ValueError(f"sigma: expected a scalar or {n} values (one per row of x), got shape {tuple(s.shape)}.")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device).long().reshape(-1)
            if class_labels.numel() != n:
                raise ValueError(f"class_labels: expected {n} labels, got {class_labels.numel()}.")
        return x.to(torch.float64), s, class_labels

    def _terms(self, x: Tensor, s: Tensor, labels: Tensor | None):
        """Per-row/component pieces for rows ``x [m, 2]`` (float64) at noise ``s [m]``."""
        mu = self.means.to(x.device)
        cov = self.covs.to(x.device)
        s2 = (s * s)[:, None]  # [m, 1]
        a, b, d = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]  # [K]
        ca, cd = a + s2, d + s2  # [m, K]; C = [[ca, b], [b, cd]]
        det = ca * cd - b * b
        dx = x[:, None, 0] - mu[:, 0]  # [m, K]
        dy = x[:, None, 1] - mu[:, 1]
        ux = (cd * dx - b * dy) / det  # u = C^{-1} (x - mu)
        uy = (ca * dy - b * dx) / det
        quad = dx * ux + dy * uy
        log_w = self.weights.to(x.device).log()
        logits = log_w - _LOG_2PI - 0.5 * det.log() - 0.5 * quad  # [m, K]
        log_norm = None
        if labels is not None:
            cls = self.component_class.to(x.device)
            uncond = (labels < 0) | (labels >= self.num_classes)
            keep = (cls[None, :] == labels[:, None]) | uncond[:, None]
            logits = logits.masked_fill(~keep, float("-inf"))
            lcw = self._log_class_weight.to(x.device)
            log_norm = torch.where(uncond, torch.zeros_like(s), lcw[labels.clamp(0, self.num_classes - 1)])
        return logits, ux, uy, log_norm, (a, b, d), mu

    def _chunked(self, fn: Callable, x: Tensor, sigma, class_labels: Tensor | None) -> Tensor:
        out_dtype = x.dtype
        xx, s, labels = self._prepare(x, sigma, class_labels)
        outs = []
        chunk = max(1, self._CHUNK_ELEMENTS // self.num_components)
        for i in range(0, xx.shape[0], chunk):
            sl = slice(i, i + chunk)
            outs.append(fn(xx[sl], s[sl], None if labels is None else labels[sl]))
        if not outs:
            return fn(xx, s, labels).to(out_dtype)
        return torch.cat(outs).to(out_dtype)

    def log_prob(self, x: Tensor, sigma=0.0, class_labels: Tensor | None = None) -> Tensor:
        """Exact ``log p_sigma(x [| class])`` ``[n]`` of the mixture convolved with ``N(0, sigma^2 I)``."""

        def fn(x, s, labels):
            logits, *_rest = self._terms(x, s, labels)
            lp = torch.logsumexp(logits, dim=1)
            log_norm = _rest[2]
            return lp if log_norm is None else lp - log_norm

        return self._chunked(fn, x, sigma, class_labels)

    def score(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        """Exact ``grad_x log p_sigma(x [| class])`` ``[n, 2]``."""

        def fn(x, s, labels):
            logits, ux, uy, *_ = self._terms(x, s, labels)
            r = torch.softmax(logits, dim=1)
            return -torch.stack([(r * ux).sum(1), (r * uy).sum(1)], dim=1)

        return self._chunked(fn, x, sigma, class_labels)

    def denoiser(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        """Exact ``E[x0 | x0 + sigma z = x (, class)]`` ``[n, 2]``: posterior-weighted per-component Wiener filters."""

        def fn(x, s, labels):
            logits, ux, uy, _norm, (a, b, d), mu = self._terms(x, s, labels)
            r = torch.softmax(logits, dim=1)
            ex = mu[:, 0] + a * ux + b * uy  # mu_k + S_k C_k^{-1} (x - mu_k)
            ey = mu[:, 1] + b * ux + d * uy
            return torch.stack([(r * ex).sum(1), (r * ey).sum(1)], dim=1)

        return self._chunked(fn, x, sigma, class_labels)

    def __repr__(self) -> str:
        return (
            f"GaussianMixture2D(name={self.name!r}, components={self.num_components}, "
            f"num_classes={self.num_classes}, sigma_data={self.sigma_data})"
        )


def _rotated_cov(angle: float, std_along: float, std_across: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([std_along**2, std_across**2], dtype=torch.float64)) @ rot.T


def eight_gaussians(radius: float = 2.0, std: float = 0.15) -> GaussianMixture2D:
    """8 equal isotropic Gaussians evenly spaced on a circle; label = component (8 classes)."""
    ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone()
    return GaussianMixture2D(torch.ones(8), means, covs, torch.arange(8), 8, name="eight_gaussians")


def tree(depth: int = 4, extent: float = 2.5) -> GaussianMixture2D:
    """Branching tree of small anisotropic Gaussians (in the spirit of the toy in Karras et al. 2024,
    "Guiding a diffusion model with a bad version of itself"; our own construction).

    A vertical trunk splits into two main branches, one per class; each branch splits recursively into two
    thinner, shorter sub-branches (``depth`` times). Each straight segment is covered by a few elongated
    Gaussians (std along the segment ~0.6 x their spacing, across it the branch half-width), weighted by their
    area so the density is roughly uniform over the tree and thin tips carry little mass. The trunk belongs to
    both classes (each class holds a half-weight copy), so each class-conditional is trunk + its own subtree.
    The result is centred on its exact mean and scaled so that component means lie in ``[-extent, extent]``.
    """
    weights: list[float] = []
    means: list[Tensor] = []
    covs: list[Tensor] = []
    classes: list[int] = []

    def segment(cls: int, start: Tensor, angle: float, length: float, width: float, weight_scale: float = 1.0):
        n = max(2, round(length / (3.0 * width)))
        spacing = length / n
        direction = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        cov = _rotated_cov(angle, 0.6 * spacing, width)
        for i in range(n):
            means.append(start + (i + 0.5) * spacing * direction)
            covs.append(cov)
            weights.append(weight_scale * spacing * width)
            classes.append(cls)
        return start + length * direction

    def branch(cls: int, start: Tensor, angle: float, length: float, width: float, level: int):
        end = segment(cls, start, angle, length, width)
        if level >= depth:
            return
        # slightly asymmetric split angles so the two classes' subtrees are not mirror images
        spread = 0.42 + 0.08 * ((level + cls) % 2)
        tilt = 0.06 * (1 if cls == 0 else -1)
        for side in (-1.0, 1.0):
            branch(cls, end, angle + side * spread + tilt, 0.72 * length, max(0.72 * width, 0.012), level + 1)

    origin = torch.zeros(2, dtype=torch.float64)
    trunk_len, trunk_w = 1.0, 0.06
    for cls in (0, 1):
        top = segment(cls, origin, math.pi / 2, trunk_len, trunk_w, weight_scale=0.5)
    branch(0, top, math.pi / 2 + 0.55, 0.85, 0.05, 0)
    branch(1, top, math.pi / 2 - 0.5, 0.85, 0.05, 0)

    w = torch.tensor(weights, dtype=torch.float64)
    mu = torch.stack(means)
    cov = torch.stack(covs)
    w = w / w.sum()
    mu = mu - (w @ mu)
    scale = extent / float(mu.abs().max())
    return GaussianMixture2D(w, mu * scale, cov * scale**2, torch.tensor(classes), 2, name="tree")


# ----------------------------------------------------------------------------------------------------------------
# Non-Gaussian toys
# ----------------------------------------------------------------------------------------------------------------


class Checkerboard(ToyDistribution):
    """Uniform on the 8 "black" unit squares of a 4x4 board on ``[-2, 2]^2`` (squares with even ``i + j``).

    Label = square index 0..7 (row-major over the black squares). Exact density: ``1/8`` inside a black square
    (half-open ``[lo, lo + 1)``), ``-inf`` log-density outside.
    """

    name = "checkerboard"
    num_classes = 8
    has_log_prob = True

    def __init__(self) -> None:
        corners = [(-2.0 + i, -2.0 + j) for j in range(4) for i in range(4) if (i + j) % 2 == 0]
        self.corners = torch.tensor(corners, dtype=torch.float64)  # [8, 2] lower-left corners
        # E[x^2] of U[a, a+1] = ((a+1)^3 - a^3) / 3, averaged over squares, summed over both coordinates
        c = self.corners
        self.sigma_data = _rms_sigma(float((((c + 1) ** 3 - c**3) / 3).mean(0).sum()))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = _check_n(n)
        sq = torch.randint(0, 8, (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return (self.corners[sq] + u).float(), sq

    def square_index(self, x: Tensor) -> Tensor:
        """Index ``[n]`` of the black square holding each point, ``-1`` if none."""
        c = self.corners.to(device=x.device, dtype=torch.float64)
        xx = x.to(torch.float64)[:, None, :]
        inside = ((xx >= c) & (xx < c + 1)).all(-1)  # [n, 8]
        return torch.where(inside.any(1), inside.long().argmax(1), torch.full_like(inside[:, 0], -1, dtype=torch.long))

    def log_prob(self, x: Tensor) -> Tensor:
        inside = self.square_index(x) >= 0
        lp = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)
        lp[inside] = -math.log(8.0)
        return lp.to(x.dtype if x.is_floating_point() else torch.float32)


class TwoMoons(ToyDistribution):
    """Two interleaved half circles (as sklearn's ``make_moons``), centred, scaled by 1.5, plus N(0, noise^2) noise.

    Label = moon (0 upper, 1 lower); each point's moon is drawn with probability 1/2. No closed-form density.
    """

    name = "moons"
    num_classes = 2
    sigma_data = 1.062  # 10^6 samples, manual_seed(0); see module docstring

    def __init__(self, noise: float = 0.1) -> None:
        self.noise = noise

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = _check_n(n)
        y = torch.randint(0, 2, (n,), generator=generator)
        t = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        upper = torch.stack([t.cos(), t.sin()], dim=1)
        lower = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)
        p = torch.where(y[:, None] == 0, upper, lower)
        p = 1.5 * (p - torch.tensor([0.5, 0.25], dtype=torch.float64))
        x = p + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return x.float(), y


class TwoSpirals(ToyDistribution):
    """Two interleaved Archimedean spirals (1.5 turns, radius up to 2.6) plus N(0, noise^2) noise.

    The position along a spiral is ``u = sqrt(U[0, 1])`` (roughly uniform along the arc), angle ``3 pi u`` (+ pi for
    the second spiral), radius ``2.6 u``. Label = spiral. No closed-form density.
    """

    name = "spirals"
    num_classes = 2
    sigma_data = 1.302  # 10^6 samples, manual_seed(0); see module docstring

    def __init__(self, noise: float = 0.08, radius: float = 2.6, turns: float = 1.5) -> None:
        self.noise, self.radius, self.turns = noise, radius, turns

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = _check_n(n)
        y = torch.randint(0, 2, (n,), generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
        ang = 2.0 * math.pi * self.turns * u + math.pi * y.to(torch.float64)
        p = self.radius * u[:, None] * torch.stack([ang.cos(), ang.sin()], dim=1)
        x = p + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return x.float(), y


class CategoricalGrid(ToyDistribution):
    """A discrete toy: a categorical distribution over the centres of a ``cells x cells`` grid on
    ``[-extent, extent]^2`` (Analog Bits' data is discrete; this one has an exact probability table).

    Cell (i, j) (i along x, j along y) has weight ``1 + (i j mod 3)`` when ``i + j`` is even and 0 otherwise, so
    half the cells are impossible and the others hold three different masses. ``probs`` [cells, cells] (float64)
    is the exact table; every sample is a cell centre ``-extent + (i + 1/2) 2 extent / cells``. One class (label 0).
    There is no density (the distribution is atomic): ``log_prob`` raises.
    """

    name = "grid"
    num_classes = 1

    def __init__(self, cells: int = 8, extent: float = 2.0) -> None:
        if cells < 2:
            raise ValueError(f"cells: the grid needs at least 2 cells per axis, got {cells}.")
        self.cells, self.extent = int(cells), float(extent)
        i = torch.arange(self.cells, dtype=torch.float64)
        ii, jj = torch.meshgrid(i, i, indexing="ij")
        w = ((ii + jj) % 2 == 0).double() * (1.0 + (ii * jj) % 3)
        self.probs = w / w.sum()
        self.centres = -self.extent + (i + 0.5) * (2.0 * self.extent / self.cells)
        c2 = self.centres[:, None] ** 2 + self.centres[None, :] ** 2
        self.sigma_data = _rms_sigma(float((self.probs * c2).sum()))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = _check_n(n)
        idx = torch.multinomial(self.probs.flatten(), n, replacement=True, generator=generator)
        x = torch.stack([self.centres[idx // self.cells], self.centres[idx % self.cells]], dim=1)
        return x.float(), torch.zeros(n, dtype=torch.long)

    def cell_index(self, x: Tensor) -> Tensor:
        """(i, j) ``[n, 2]`` int64 of the nearest cell centre of each point ``x [n, 2]``."""
        width = 2.0 * self.extent / self.cells
        return ((x.double() + self.extent) / width - 0.5).round().clamp(0, self.cells - 1).long()


_TOYS: dict[str, Callable[[], ToyDistribution]] = {
    "eight_gaussians": eight_gaussians,
    "checkerboard": Checkerboard,
    "moons": TwoMoons,
    "spirals": TwoSpirals,
    "tree": tree,
    "grid": CategoricalGrid,
}
TOY_NAMES: tuple[str, ...] = tuple(_TOYS)


def make_toy(name: str) -> ToyDistribution:
    """Build the toy distribution called ``name`` (one of :data:`TOY_NAMES`)."""
    if name not in _TOYS:
        raise ValueError(f"data.name: unknown toy {name!r}; choose one of {', '.join(TOY_NAMES)}.")
    return _TOYS[name]()


# ----------------------------------------------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------------------------------------------


class Toy2DDataModule(_OfflineDataModule):
    """A 2-D toy as a LightningDataModule; batches ``(x [B, 2] float32, y [B] int64)``.

    The train set (``num_train`` points) and val set (``num_val``) are drawn once from the exact sampler, with
    ``torch.Generator().manual_seed(seed + 1_000_000)`` and ``manual_seed(seed + 2_000_000)`` respectively, so
    neither overlaps ``reference_samples(n, seed=s)`` (a fresh exact draw with ``manual_seed(s)``) for small ``s``.
    The train loader is a ``StatefulDataLoader`` shuffled by a generator seeded with ``seed``. test = val.

    Args:
        name: one of ``eight_gaussians``, ``checkerboard``, ``moons``, ``spirals``, ``tree``.
        batch_size: batch size of all loaders.
        num_train: training-set size (>= batch_size).
        num_val: validation-set size.
        num_workers: DataLoader workers.
        seed: seeds the training set draw and the training shuffle.
    """

    is_image = False
    _TRAIN_STREAM = 1_000_000
    _VAL_STREAM = 2_000_000

    def __init__(
        self,
        name: str = "tree",
        batch_size: int = 256,
        num_train: int = 20000,
        num_val: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self._distribution = make_toy(name)
        self.name = name
        self.num_train = self._check_int("data.num_train", num_train, 1)
        self.num_val = self._check_int("data.num_val", num_val, 1)
        if num_train < batch_size:
            raise ValueError(
                f"data.batch_size: {batch_size} is larger than data.num_train={num_train}, so no full training batch "
                "exists; lower data.batch_size or raise data.num_train."
            )
        self.data_shape = (2,)
        self.num_classes = self._distribution.num_classes
        self.sigma_data = self._distribution.sigma_data

    @property
    def distribution(self) -> ToyDistribution:
        return self._distribution

    def _build_datasets(self):
        g_train = torch.Generator().manual_seed(self.seed + self._TRAIN_STREAM)
        g_val = torch.Generator().manual_seed(self.seed + self._VAL_STREAM)
        train = _TensorPairDataset(*self._distribution.sample(self.num_train, g_train))
        val = _TensorPairDataset(*self._distribution.sample(self.num_val, g_val))
        return train, val

    def reference_samples(self, n: int, seed: int = 0, split: str = "val") -> tuple[Tensor, Tensor]:
        """``n`` fresh exact samples drawn with ``torch.Generator().manual_seed(seed)``.

        ``split`` is checked (``train``/``val``/``test``) but does not matter: the sampler is exact.
        """
        self._check_split(split)
        self._check_int("n", n, 1)
        return self._distribution.sample(n, torch.Generator().manual_seed(seed))
