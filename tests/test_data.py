"""Tests for lightning_idrs.data: digits (real, bundled) and MNIST / CIFAR-10 (tiny fake files)."""
import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_idrs.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
)
from tests.helpers import N_TEST, N_TRAIN, fake_images, write_idx


def _rows(x: torch.Tensor) -> set:
    return {bytes(r) for r in (x * 16).round().to(torch.uint8).flatten(1).numpy()}


def _all_labels(ds) -> torch.Tensor:
    return torch.tensor([ds[i][1] for i in range(len(ds))])


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_digits_attributes_before_setup():
    dm = DigitsDataModule()
    assert dm.name == "digits"
    assert dm.input_shape == (1, 8, 8)
    assert dm.num_classes == 10
    assert len(dm.mean) == len(dm.std) == 1


def test_digits_mean_std_match_data(digits):
    from sklearn.datasets import load_digits

    x = load_digits().images / 16.0
    assert digits.mean[0] == pytest.approx(x.mean(), abs=1e-3)
    assert digits.std[0] == pytest.approx(x.std(), abs=1e-3)


def test_digits_split_sizes_disjoint_stratified(digits):
    sizes = {s: len(digits.split_dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1077, "val": 360, "test": 360}
    rows = {s: _rows(digits.split_dataset(s).inputs()) for s in sizes}
    # the 1797 digits images are pairwise distinct, so set sizes prove disjointness and coverage
    assert len(rows["train"] | rows["val"] | rows["test"]) == 1797
    for s in sizes:
        assert len(rows[s]) == sizes[s]
    counts = {s: torch.bincount(digits.split_dataset(s).labels, minlength=10) for s in sizes}
    total = sum(counts.values())
    for s in sizes:
        expected = total.double() * sizes[s] / 1797
        assert (counts[s] - expected).abs().max() <= 1.5, (s, counts[s], expected)


def test_digits_shapes_and_range(digits):
    for split in ("train", "val", "test"):
        ds = digits.split_dataset(split)
        x, y = ds[0]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10
    xs = digits.train_inputs()
    assert xs.shape == (1077, 1, 8, 8) and xs.dtype == torch.float32
    assert xs.min() == 0.0 and xs.max() == 1.0
    # values are k/16
    assert torch.equal(xs * 16, (xs * 16).round())


def test_digits_deterministic_per_seed(digits):
    same = DigitsDataModule(seed=0)
    other = DigitsDataModule(seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(same.split_dataset(split).inputs(), digits.split_dataset(split).inputs())
        assert torch.equal(same.split_dataset(split).labels, digits.split_dataset(split).labels)
    assert _rows(other.split_dataset("test").inputs()) != _rows(digits.split_dataset("test").inputs())
    assert other.fingerprint() != digits.fingerprint()


def test_digits_setup_idempotent(digits):
    train = digits.split_dataset("train")
    digits.setup("fit")
    digits.setup("test")
    assert digits.split_dataset("train") is train


def test_digits_train_batches_carry_idx(digits):
    inputs = digits.train_inputs()
    labels = digits.split_dataset("train").labels
    seen = []
    for x, y, idx in digits.train_dataloader():
        assert idx.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
        assert torch.equal(inputs[idx], x)
        assert torch.equal(labels[idx], y)
        seen.append(idx)
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(1077))  # one epoch = each example once
    assert not torch.equal(seen, torch.arange(1077))  # shuffled


def test_digits_shuffle_seeded():
    def first_idx(seed):
        return next(iter(DigitsDataModule(batch_size=16, seed=seed).train_dataloader()))[2]

    # split differs between seeds too, but idx is a position, so order is what is compared
    assert torch.equal(first_idx(0), first_idx(0))
    assert not torch.equal(first_idx(0), first_idx(1))


def test_digits_val_test_loaders(digits):
    batches = list(digits.val_dataloader())
    assert all(len(b) == 2 for b in batches)
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, digits.split_dataset("val").inputs())  # not shuffled
    assert sum(len(b[1]) for b in digits.test_dataloader()) == 360


def test_digits_unknown_split(digits):
    with pytest.raises(ValueError, match="^unknown split 'bogus'; expected one of train, val, test$"):
        digits.split_dataset("bogus")


@pytest.mark.slow
def test_digits_fingerprint_is_the_sha256_of_the_split(digits):
    fp = digits.fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", fp)  # a sha256 hex digest ...
    data = digits.split_dataset("train")  # ... of exactly this: name, shape, scale, size, images, labels
    header = f"digits|{tuple(digits.input_shape)}|{digits._scale}|{len(data)}|".encode()
    assert fp == hashlib.sha256(header + data.images.numpy().tobytes() + data.labels.to(torch.int64).numpy().tobytes()).hexdigest()
    assert len({fp, digits.fingerprint("val"), digits.fingerprint("test")}) == 3
    assert DigitsDataModule(seed=1).fingerprint() != fp  # another seed, another split
    assert DigitsDataModule(seed=0, batch_size=7).fingerprint() == fp  # batch size is irrelevant
    # the same in a new process (no salted hashing): test_certify's certify process records it in its summary


def test_hparams_recorded():
    dm = DigitsDataModule(batch_size=5, seed=3)
    assert dm.hparams["batch_size"] == 5 and dm.hparams["seed"] == 3
    cifar = CIFAR10DataModule(root="somewhere", augment=False)
    assert cifar.hparams["root"] == "somewhere" and cifar.hparams["augment"] is False


def test_bad_arguments():
    with pytest.raises(ValueError, match="^batch_size must be an integer >= 1, got 0$"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"^val_fraction \+ test_fraction must be < 1, got 0\.5 \+ 0\.5$"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"^num_workers must be an integer >= 0, got -1$"):
        DigitsDataModule(num_workers=-1)


# ----------------------------------------------------------------------------- fake MNIST
@pytest.fixture
def mnist_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {
        "train": (fake_images(N_TRAIN, (28, 28), 0), np.arange(N_TRAIN) % 10),
        "t10k": (fake_images(N_TEST, (28, 28), 100), np.arange(N_TEST) % 10),
    }
    for prefix, (x, y) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return tmp_path, data


@pytest.mark.parametrize("make_root", [False, True])
def test_mnist_missing_root(tmp_path, make_root):
    root = tmp_path / "nowhere"
    if make_root:
        root.mkdir()
    dm = MNISTDataModule(root=str(root))
    assert dm.input_shape == (1, 28, 28) and dm.name == "mnist"
    with pytest.raises(FileNotFoundError, match="download") as err:
        dm.setup("fit")
    assert str(root) in str(err.value) and "MNIST/raw" in str(err.value)


def test_mnist_from_local_files(mnist_root):
    root, data = mnist_root
    dm = MNISTDataModule(root=str(root), val_size=10, batch_size=8, seed=0)
    dm.prepare_data()  # download=False: nothing to do, must not fail
    dm.setup("fit")
    assert [len(dm.split_dataset(s)) for s in ("train", "val", "test")] == [50, 10, 20]
    x, y = dm.split_dataset("test")[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(data["t10k"][0][3]).float().div(255).unsqueeze(0))
    assert y == int(data["t10k"][1][3])
    train_x = dm.train_inputs()
    assert train_x.shape == (50, 1, 28, 28) and 0 <= train_x.min() and train_x.max() == 1.0
    # train and val partition the official training set (first pixel = image id)
    ids = lambda t: set((t[:, 0, 0, 0] * 255).round().long().tolist())  # noqa: E731
    train_ids, val_ids = ids(train_x), ids(dm.split_dataset("val").inputs())
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(N_TRAIN))
    # seeded hold-out: same seed, same split; another seed, another split
    again = MNISTDataModule(root=str(root), val_size=10, seed=0)
    assert ids(again.split_dataset("val").inputs()) == val_ids
    assert ids(MNISTDataModule(root=str(root), val_size=10, seed=1).split_dataset("val").inputs()) != val_ids
    assert again.fingerprint() == dm.fingerprint()
    # training batches: no augmentation, idx points into train_inputs()
    xb, yb, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(train_x[idx], xb)
    # download=True with the files present does not try the network
    MNISTDataModule(root=str(root), val_size=10, download=True).setup()


def test_mnist_val_size_validated(mnist_root):
    root, _ = mnist_root
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(root=str(root), val_size=N_TRAIN).setup()


# ----------------------------------------------------------------------------- fake CIFAR-10
@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks md5 sums of the real files; accept any file that exists
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for b, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]):
        batches[name] = fake_images(12, (3, 32, 32), 12 * b)
    batches["test_batch"] = fake_images(N_TEST, (3, 32, 32), 100)
    for name, x in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), "labels": list(range(len(x)))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return tmp_path, batches


def test_cifar_missing_root(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"))
    assert dm.input_shape == (3, 32, 32) and len(dm.mean) == len(dm.std) == 3
    with pytest.raises(FileNotFoundError, match="download"):
        dm.setup()


def test_cifar_from_local_files(cifar_root):
    root, batches = cifar_root
    dm = CIFAR10DataModule(root=str(root), val_size=10, batch_size=16, seed=0)
    assert [len(dm.split_dataset(s)) for s in ("train", "val", "test")] == [50, 10, 20]
    x, y = dm.split_dataset("test")[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # pickled rows are CHW-flattened; the module must give back the same CHW image / 255
    assert torch.equal(x, torch.from_numpy(batches["test_batch"][5]).float().div(255))
    assert y == 5
    train_x = dm.train_inputs()
    assert train_x.shape == (50, 3, 32, 32) and 0 <= train_x.min() and train_x.max() == 1.0
    ids = set((train_x[:, 0, 0, 0] * 255).round().long().tolist())
    val_ids = set((dm.split_dataset("val").inputs()[:, 0, 0, 0] * 255).round().long().tolist())
    assert ids.isdisjoint(val_ids) and ids | val_ids == set(range(60))


def test_cifar_augmentation(cifar_root):
    root, _ = cifar_root
    plain = CIFAR10DataModule(root=str(root), val_size=10, batch_size=50, augment=False)
    x, _, idx = next(iter(plain.train_dataloader()))
    assert torch.equal(plain.train_inputs()[idx], x)

    torch.manual_seed(0)
    aug = CIFAR10DataModule(root=str(root), val_size=10, batch_size=50, augment=True)
    x, y, idx = next(iter(aug.train_dataloader()))
    clean = aug.train_inputs()[idx]
    assert x.shape == (50, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(clean, x)  # 50 random crops/flips are not all the identity
    # train_inputs and split_dataset("train") stay clean
    assert torch.equal(aug.split_dataset("train")[int(idx[0])][0], clean[0])
