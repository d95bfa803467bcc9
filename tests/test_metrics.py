"""Tests for lit_fewstep.metrics: distribution metrics, FID/KID helpers, digits feature net, DDP equality."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import nn

from lit_fewstep.metrics import (
    MMD,
    DigitsFeatures,
    ExactNLL,
    InceptionFeatures,
    PrecisionRecall,
    SlicedWasserstein2,
    frechet_distance,
    gaussian_stats,
    load_digits_classifier,
    load_digits_features,
    make_fid,
    make_kid,
    reference_stats,
)
from lit_fewstep.metrics.distribution import wasserstein2_1d_squared
from lit_fewstep.metrics.fid import state_dict_sha256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).double()
    return -0.5 * x.square().sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------- SW2
def test_sw2_same_distribution_near_zero():
    a, b = torch.randn(5000, 2, generator=_gen(1)), torch.randn(5000, 2, generator=_gen(2))
    m = SlicedWasserstein2()
    m.update(fake=a, real=b)
    assert m.compute().item() < 0.05


def test_sw2_gaussian_shift_closed_form():
    # N(0, I) vs N(mu, I): sliced W2^2 = E_theta[(theta . mu)^2] = |mu|^2 / d
    d, mu = 2, torch.tensor([2.0, -1.0])
    a, b = torch.randn(5000, d, generator=_gen(3)) + mu, torch.randn(5000, d, generator=_gen(4))
    m = SlicedWasserstein2(num_projections=1000, seed=0)
    m.update(a, b)
    expected = (mu.square().sum() / d).sqrt().item()
    assert m.compute().item() == pytest.approx(expected, rel=0.05)
    # deterministic: same value from a fresh metric and after re-compute
    m2 = SlicedWasserstein2()
    m2.update(a, b)
    assert m2.compute().item() == m.compute().item()


def test_w2_1d_unequal_counts_exact():
    x = torch.randn(3, 4, dtype=torch.float64, generator=_gen(5)).sort(0).values
    y = torch.randn(5, 4, dtype=torch.float64, generator=_gen(6)).sort(0).values
    # replicating each sample to a common count 15 gives the same empirical measure
    ref = wasserstein2_1d_squared(x.repeat_interleave(5, 0), y.repeat_interleave(3, 0))
    torch.testing.assert_close(wasserstein2_1d_squared(x, y), ref)
    # shift-only case: W2^2 between {0,1} and {0,1}+c is c^2
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert wasserstein2_1d_squared(z, z + 0.5).item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------- MMD
def test_mmd_same_vs_different():
    a, b = torch.randn(1500, 2, generator=_gen(7)), torch.randn(1500, 2, generator=_gen(8))
    same = MMD()
    same.update(a, b)
    diff = MMD()
    diff.update(a + torch.tensor([1.0, 0.0]), b)
    v_same, v_diff = same.compute().item(), diff.compute().item()
    assert abs(v_same) < 2e-3
    assert v_diff > 0.05 and v_diff > 20 * abs(v_same)
    # unbiased estimator: may be negative for identical distributions; a fixed-scale kernel also works
    fixed = MMD(scale=1.0)
    fixed.update(a, b)
    assert abs(fixed.compute().item()) < 2e-3


def test_mmd_reset_keeps_real_when_asked():
    a, b = torch.randn(200, 3, generator=_gen(9)), torch.randn(300, 3, generator=_gen(10))
    m = MMD(reset_real=False)
    m.update(a, b)
    v = m.compute()
    m.reset()
    m.update(fake=a)
    assert torch.equal(m.compute(), v)


@pytest.mark.parametrize("metric_cls", [MMD, PrecisionRecall, SlicedWasserstein2])
def test_remembered_reference_terms_are_keyed_by_the_references_values(metric_cls):
    """MMD's reference kernel sum, the reference's k-NN radii and its sorted projections are remembered per
    reference set: a remembered term gives exactly the fresh figure, and a reference changed in place is not
    served a stale term."""
    from lit_fewstep.metrics import distribution

    def fresh(x, y):
        distribution._REFERENCE_TERMS.clear()
        m = metric_cls()
        m.update(x, y)
        return m.compute()

    a, b = torch.randn(300, 2, generator=_gen(11)), torch.randn(400, 2, generator=_gen(12))
    distribution._REFERENCE_TERMS.clear()
    m = metric_cls()
    m.update(a, b)
    first = m.compute()
    assert len(distribution._REFERENCE_TERMS) == 1
    assert torch.equal(first, fresh(a, b))
    m = metric_cls()
    m.update(a * 1.3 + 0.5, b)  # another sample set against the same reference: the remembered term
    remembered = m.compute()
    assert torch.equal(remembered, fresh(a * 1.3 + 0.5, b))
    b[:20] += 3.0  # the reference changed in place: its term is computed again, not reused
    m = metric_cls()
    m.update(a, b)
    changed = m.compute()
    assert not torch.equal(changed, first) and torch.equal(changed, fresh(a, b))


# ----------------------------------------------------------------------------------------------- NLL
def test_exact_nll_is_mean_neg_log_prob():
    x = torch.randn(1000, 2, generator=_gen(11)) * 1.3
    m = ExactNLL(std_normal_log_prob)
    m.update(x[:400])
    m.update(x[400:])
    torch.testing.assert_close(m.compute(), -std_normal_log_prob(x).mean())


# ------------------------------------------------------------------------------------ PrecisionRecall
def test_precision_recall_identical_and_disjoint():
    a = torch.randn(500, 5, generator=_gen(12))
    m = PrecisionRecall(k=3)
    m.update(a, a.clone())
    assert m.compute().tolist() == [1.0, 1.0]
    m = PrecisionRecall()
    m.update(a + 100.0, a)
    assert m.compute().tolist() == [0.0, 0.0]
    # mode dropping: fake covers one of two real clusters -> precision high, recall ~ 1/2
    real = torch.cat([torch.randn(300, 2, generator=_gen(13)), torch.randn(300, 2, generator=_gen(14)) + 20])
    m = PrecisionRecall()
    m.update(torch.randn(300, 2, generator=_gen(15)), real)
    p, r = m.compute().tolist()
    assert p > 0.9 and 0.4 < r < 0.6


# ----------------------------------------------------------------------------------------------- FID
def test_frechet_distance_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 1.0])
    # commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(torch.tensor([0.5]), torch.tensor([[4.0]]), torch.tensor([0.0]), torch.tensor([[1.0]])).item() == pytest.approx(1.25)
    # general covariances: agrees with scipy's sqrtm and torchmetrics' formula
    g = _gen(16)
    A, B = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = A @ A.T + 0.1 * torch.eye(6), B @ B.T + 0.1 * torch.eye(6)
    m1, m2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    got = frechet_distance(m1, s1, m2, s2).item()
    from torchmetrics.image.fid import _compute_fid

    assert got == pytest.approx(_compute_fid(m1, s1, m2, s2).item(), rel=1e-9)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm((s1 @ s2).numpy()).real
    ref = ((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * float(covmean.trace())).item()
    assert got == pytest.approx(ref, rel=1e-9)


class LinearFeatures(nn.Module):
    """A fixed linear feature net (flatten -> Linear), deterministic weights."""

    def __init__(self, in_dim: int = 64, num_features: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        self.lin = nn.Linear(in_dim, num_features)
        with torch.no_grad():
            g = _gen(seed)
            self.lin.weight.copy_(torch.randn(num_features, in_dim, generator=g) / in_dim**0.5)
            self.lin.bias.copy_(torch.randn(num_features, generator=g))

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1).float())


def test_fid_metric_matches_frechet_distance_of_features():
    net = LinearFeatures()
    real = torch.rand(600, 1, 8, 8, generator=_gen(17)) * 2 - 1
    fake = (torch.rand(500, 1, 8, 8, generator=_gen(18)) * 2 - 1) * 0.7 + 0.1
    fid = make_fid(net)
    fid.update(real[:300], real=True)
    fid.update(real[300:], real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        fr, ff = net(real).double(), net(fake).double()
    expected = frechet_distance(*gaussian_stats(ff), *gaussian_stats(fr)).item()
    assert fid.compute().item() == pytest.approx(expected, rel=1e-3)
    # same distribution -> much smaller
    fid2 = make_fid(LinearFeatures())
    fid2.update(real[:300], real=True)
    fid2.update(real[300:], real=False)
    assert fid2.compute().item() < 0.1 * expected


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_runs_with_custom_features():
    """KID is an unbiased MMD^2: near zero between two draws of one distribution, clearly positive after a shift."""
    def kid_of(shift):
        kid = make_kid(LinearFeatures(), subsets=5, subset_size=50)
        kid.update(torch.rand(100, 1, 8, 8, generator=_gen(19)), real=True)
        kid.update(torch.rand(100, 1, 8, 8, generator=_gen(20)) + shift, real=False)
        torch.manual_seed(0)
        return kid.compute()

    (same, same_std), (shifted, shifted_std) = kid_of(0.0), kid_of(0.5)
    assert torch.isfinite(same_std) and torch.isfinite(shifted_std)
    assert shifted.item() > 0 and abs(same.item()) < 0.1 * shifted.item()


def test_inception_features_never_downloads(tmp_path):
    for p in (None, str(tmp_path / "missing.pth")):
        with pytest.raises(FileNotFoundError, match=r"^metrics\.inception_weights: InceptionV3 weights are never downloaded"):
            InceptionFeatures(p)


def test_reference_stats_cache(tmp_path):
    net = LinearFeatures()
    real = torch.rand(200, 1, 8, 8, generator=_gen(21))
    mu, sigma = reference_stats(net, real, tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1
    torch.testing.assert_close((mu, sigma), gaussian_stats(net(real).detach()))
    # cache hit: identical tensors (loaded back with weights_only=True)
    mtime = files[0].stat().st_mtime_ns
    mu2, sigma2 = reference_stats(net, real, tmp_path)
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    assert files[0].stat().st_mtime_ns == mtime
    d = torch.load(files[0], weights_only=True)
    assert torch.equal(d["mu"], mu)
    # a changed feature-net weight changes the key (new cache file, new stats)
    key = state_dict_sha256(net)
    with torch.no_grad():
        net.lin.weight[0, 0] += 1e-3
    assert state_dict_sha256(net) != key
    mu3, _ = reference_stats(net, real, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(mu3, mu)
    # changed data changes the key too
    reference_stats(net, real[:-1], tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 3


# ------------------------------------------------------------------------------------ digits features
def test_digits_classifier_weights_and_accuracy():
    from importlib import resources

    path = resources.files("lit_fewstep") / "assets" / "digits_classifier.pt"
    assert path.is_file() and os.path.getsize(path) < 1024 * 1024
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "meta"} and ckpt["meta"]["val_accuracy"] >= 0.97

    images = pytest.importorskip("lit_fewstep.data.images")
    dm = images.DigitsDataModule(image_size=16, batch_size=512, val_fraction=0.1, seed=0)
    dm.setup("fit")
    net, meta = load_digits_classifier()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            correct += (net(x).argmax(1) == y).sum().item()
            total += len(y)
    acc = correct / total
    print(f"digits classifier val accuracy {acc:.4f} ({correct}/{total})")
    assert acc >= 0.97
    assert acc == pytest.approx(meta["val_accuracy"], abs=1e-6)

    feats = load_digits_features()
    assert isinstance(feats, DigitsFeatures) and feats.num_features == 128
    x, _ = next(iter(dm.val_dataloader()))
    f = feats(x)
    assert f.shape == (len(x), 128) and not f.requires_grad
    # uint8 [0, 255] input maps to the same [-1, 1] range
    xu = ((x + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(feats(xu), f, atol=0.05, rtol=0.05)
    # 8x8 inputs are accepted (bilinear upsampling inside)
    assert feats(torch.zeros(2, 1, 8, 8)).shape == (2, 128)
    # as a torchmetrics feature net: real vs real FID is far below real vs shuffled-pixel FID
    fid = make_fid(feats)
    half = len(x) // 2
    fid.update(x[:half], real=True)
    fid.update(x[half:], real=False)
    v_same = fid.compute().item()
    fid.reset()
    fid.update(x[:half], real=True)
    noise = x[half:].flatten(1)[:, torch.randperm(256, generator=_gen(0))].reshape(-1, 1, 16, 16)
    fid.update(noise, real=False)
    assert fid.compute().item() > 5 * v_same


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_data():
    g = _gen(123)
    fake = torch.randn(301, 3, generator=g) * 1.2 + 0.3  # odd count: uneven shards across ranks
    real = torch.randn(240, 3, generator=g)
    return fake, real


def _ddp_metrics():
    return {
        "sw2": SlicedWasserstein2(num_projections=200),
        "mmd": MMD(),
        "nll": ExactNLL(std_normal_log_prob),
        "pr": PrecisionRecall(),
        "fid": make_fid(LinearFeatures(in_dim=3, num_features=3)),
    }


def _ddp_update(metrics, fake, real):
    for name, m in metrics.items():
        if name == "nll":
            m.update(fake)
        elif name == "fid":
            m.update(real, real=True)
            m.update(fake, real=False)
        else:
            m.update(fake=fake, real=real)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fake, real = _ddp_data()
        metrics = _ddp_metrics()
        _ddp_update(metrics, fake.tensor_split(world_size)[rank], real.tensor_split(world_size)[rank])
        res = {k: m.compute().double() for k, m in metrics.items()}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    fake, real = _ddp_data()
    single = _ddp_metrics()
    _ddp_update(single, fake, real)
    expected = {k: m.compute().double() for k, m in single.items()}

    out = str(tmp_path / "res")
    # torch.multiprocessing.spawn's machinery with the fork start method: children inherit the imported modules
    # (a spawned child re-imports torch + torchmetrics, ~6-10 s on a 2-core box). Each child sets 1 intra-op
    # thread before any op.
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=f"{k} rank {rank}")


# ------------------------------------------------------------------------------------------------ LPIPS
@pytest.fixture(scope="module")
def random_vgg16(tmp_path_factory):
    """A random VGG16 in torchvision's state-dict layout (the real file is never downloaded in tests)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    net = vgg16(weights=None).features.eval()
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in net.state_dict().items()}, path)
    return net, path


def lpips_by_hand(net, heads, a, b, resolution):
    """LPIPS written out from Zhang et al. (Eq. 1) on a torchvision VGG16: relu1_2 ... relu5_3."""
    def feats(x):
        x = torch.nn.functional.interpolate(x.repeat(1, 3, 1, 1), size=(resolution,) * 2, mode="bilinear",
                                            align_corners=False)
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        out = []
        for i, layer in enumerate(net):
            x = layer(x)
            if i in (3, 8, 15, 22, 29):
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum(((fa - fb) ** 2 * heads[f"lin{l}.model.1.weight"]).sum(1).mean((1, 2))
               for l, (fa, fb) in enumerate(zip(feats(a), feats(b))))


def test_lpips_matches_its_definition_for_both_file_layouts(random_vgg16, tmp_path):
    from lit_fewstep.metrics.lpips import LPIPS, torchmetrics_lpips_heads

    net, torchvision_file = random_vgg16
    heads = torch.load(torchmetrics_lpips_heads(), map_location="cpu", weights_only=True)
    assert all((w >= 0).all() for w in heads.values())  # the official heads, not random ones
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        expected = lpips_by_hand(net, heads, a, b, 32)
        lpips = LPIPS(str(torchvision_file), resolution=32)
        torch.testing.assert_close(lpips(a, b), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lpips(b, a), expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(lpips(a, a), torch.zeros(3))
        # The lpips package's own layout: net.slice{s}.{torchvision index}.* plus lin{l}.model.1.weight.
        slices = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))
        package = {f"net.slice{s}.{k}": v for s, lo, hi in slices for k, v in net.state_dict().items()
                   if lo <= int(k.split(".")[0]) < hi}
        torch.save({**package, **heads}, tmp_path / "lpips_vgg.pth")
        torch.testing.assert_close(LPIPS(str(tmp_path / "lpips_vgg.pth"), resolution=32)(a, b), expected,
                                   rtol=1e-5, atol=1e-7)


def test_lpips_errors_name_the_field(tmp_path):
    from lit_fewstep.metrics.lpips import LPIPS

    with pytest.raises(FileNotFoundError, match="lpips_weights: .* never downloaded"):
        LPIPS(str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="lpips_weights: .* lacks"):
        LPIPS(str(tmp_path / "other.pth"))


def test_energy_distance_reference_values():
    from lit_fewstep.metrics.distribution import energy_distance

    x = torch.tensor([[0.0], [2.0]])
    # 2 E|X-Y| - E|X-X'| - E|Y-Y'| with Y = {1}: 2 * 1 - (0 + 2 + 2 + 0) / 4 - 0 = 1
    assert float(energy_distance(x, torch.tensor([[1.0]]))) == pytest.approx(1.0)
    assert float(energy_distance(x, x)) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, 2, generator=g), torch.randn(3000, 2, generator=g)
    assert float(energy_distance(a, b)) < 0.01 < float(energy_distance(a, b + 0.5))
