"""FID / KID through torchmetrics with a pluggable feature network, and cached reference statistics.

Everything here works offline: a feature network is any ``nn.Module`` mapping images ``[N, C, H, W]`` to
``[N, d]`` (e.g. :class:`lit_fewstep.metrics.features.DigitsFeatures`). With a custom module torchmetrics
passes images to it unchanged (``normalize`` only matters for its default Inception), so feed the metric the
same float images in [-1, 1] your model produces.

InceptionV3 is never downloaded: :class:`InceptionFeatures` needs a local weights file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

__all__ = [
    "make_fid",
    "make_kid",
    "frechet_distance",
    "gaussian_stats",
    "InceptionFeatures",
    "reference_stats",
    "tensor_sha256",
    "state_dict_sha256",
]

INCEPTION_WEIGHTS_ERROR = (
    "metrics.inception_weights: InceptionV3 weights are never downloaded; pass a local copy of "
    "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's release asset is named "
    "weights-inception-2015-12-05-6726825d.pth), e.g. InceptionFeatures('/path/to/weights-inception-2015-12-05-6726825d.pth')"
)


def _check_feature_net(feature_net: nn.Module) -> None:
    if not isinstance(feature_net, nn.Module):
        raise TypeError(f"feature_net: expected an nn.Module mapping images -> [N, d], got {type(feature_net).__name__}")


def make_fid(feature_net: nn.Module, reset_real_features: bool = True, **kwargs) -> FrechetInceptionDistance:
    """``FrechetInceptionDistance`` using ``feature_net`` (offline). Extra kwargs go to torchmetrics.

    Usage: ``fid.update(real_images, real=True); fid.update(fake_images, real=False); fid.compute()``.
    The feature net becomes the metric's child module (its weights are in the metric's ``state_dict``):
    keep metrics out of model checkpoints.
    """
    _check_feature_net(feature_net)
    feature_net.eval().requires_grad_(False)
    kwargs.setdefault("normalize", True)  # float inputs; torchmetrics does not rescale them for custom nets
    return FrechetInceptionDistance(feature=feature_net, reset_real_features=reset_real_features, **kwargs)


def make_kid(
    feature_net: nn.Module, subsets: int = 100, subset_size: int = 1000, reset_real_features: bool = True, **kwargs
) -> KernelInceptionDistance:
    """``KernelInceptionDistance`` using ``feature_net`` (offline); ``subset_size`` must not exceed the number of
    real and fake samples. ``compute()`` returns ``(kid_mean, kid_std)``. Note: torchmetrics draws the KID
    subsets with the global torch RNG; seed it before ``compute()`` for reproducible numbers."""
    _check_feature_net(feature_net)
    feature_net.eval().requires_grad_(False)
    kwargs.setdefault("normalize", True)
    return KernelInceptionDistance(
        feature=feature_net, subsets=subsets, subset_size=subset_size, reset_real_features=reset_real_features, **kwargs
    )


def _sqrtm_psd(a: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    r"""Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), with
    Tr (sigma1 sigma2)^{1/2} = sum sqrt(eig(S1^{1/2} sigma2 S1^{1/2})) (a symmetric PSD matrix with the same
    eigenvalues as sigma1 sigma2; negative round-off eigenvalues clamped to 0). This is the quantity torchmetrics'
    FID computes (it takes eigenvalues of sigma1 @ sigma2 directly). Returns a float64 scalar tensor.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or mu1.dim() != 1 or s1.shape != (mu1.shape[0],) * 2 or s2.shape != s1.shape:
        raise ValueError(
            f"frechet_distance: expected mu [d] and sigma [d, d]; got {tuple(mu1.shape)}, {tuple(s1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    s2 = s2.to(s1.device)
    mu2 = mu2.to(mu1.device)
    r1 = _sqrtm_psd(0.5 * (s1 + s1.T))
    m = r1 @ (0.5 * (s2 + s2.T)) @ r1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2.0 * tr_covmean


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (float64) of features ``[N, d]`` (as torchmetrics' FID)."""
    f = features.detach().to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats: expected features [N >= 2, d], got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


class InceptionFeatures(nn.Module):
    """InceptionV3 pool features (2048-d) from torchmetrics/torch-fidelity, loaded from a LOCAL weights file.

    Input: float images in [-1, 1], ``[N, 1 or 3, H, W]`` (grayscale is repeated to RGB), or uint8 in [0, 255].
    They are converted to uint8 and resized to 299 by the extractor, as torch-fidelity does.
    Needs ``torch-fidelity`` installed (``pip install torch-fidelity``); nothing is ever downloaded.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None) -> None:
        super().__init__()
        if weights_path is None or not Path(weights_path).is_file():
            raise FileNotFoundError(f"{INCEPTION_WEIGHTS_ERROR} (got {weights_path!r})")
        try:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path))
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"metrics.inception_weights: InceptionFeatures needs torch-fidelity (pip install torch-fidelity): {e}"
            ) from e
        self.net = fid.inception

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x)


def _update_hash_tensor(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    _update_hash_tensor(h, t)
    return h.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's class name and its ``state_dict`` (keys sorted; names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|".encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + b"|")
        if isinstance(v, Tensor):
            _update_hash_tensor(h, v)
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


@torch.no_grad()
def _features(feature_net: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    dev = next((p.device for p in feature_net.parameters()), images.device)
    out = [feature_net(images[s : s + batch_size].to(dev)).to(torch.float64).cpu() for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def reference_stats(
    feature_net: nn.Module, real_images: Tensor, cache_dir: str | os.PathLike, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Feature mean/covariance ``(mu [d], sigma [d, d])`` (float64, CPU) of ``real_images``, cached on disk.

    Cache file: ``<cache_dir>/refstats-<sha256(feature net state_dict)[:16]>-<sha256(real bytes)[:16]>.pt``,
    a dict of plain tensors written with ``torch.save`` and read back with ``weights_only=True``. Any change of
    the feature net's weights or of the real data gives a new key. Compare with :func:`frechet_distance`.
    """
    _check_feature_net(feature_net)
    key = f"refstats-{state_dict_sha256(feature_net)[:16]}-{tensor_sha256(real_images)[:16]}"
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["mu"], d["sigma"]
    was_training = feature_net.training
    feature_net.eval()
    try:
        mu, sigma = gaussian_stats(_features(feature_net, real_images, batch_size))
    finally:
        feature_net.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"mu": mu, "sigma": sigma, "num_samples": torch.tensor(len(real_images))}, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return mu, sigma
