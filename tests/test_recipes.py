"""The reproduction scripts run end to end on tiny fake data sets in the torchvision file format."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import N_TEST, N_TRAIN, fake_images, write_idx

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(SIGMAS="0.25", EPOCHS="1", N="100", N0="10", SKIP="5", MAX="3", BATCH="16",
             EXTRA_FIT="--data.val_size 2 --trainer.enable_progress_bar false")  # 2 points for the Callback


def fake_mnist(root: Path):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", N_TRAIN, 0), ("t10k", N_TEST, 100)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", fake_images(n, (28, 28), offset))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def fake_cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        x = fake_images(12 if name != "test_batch" else N_TEST, (3, 32, 32), 12 * b)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x.reshape(len(x), -1), "labels": [i % 10 for i in range(len(x))]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    # torchvision checks the md5 of the real CIFAR-10 files; the fake ones pass on existence alone
    (root / "sitecustomize.py").write_text(
        "import pathlib, torchvision.datasets.cifar as c\n"
        "c.check_integrity = lambda fpath, md5=None: pathlib.Path(fpath).is_file()\n")


def reproduce(script, data, out, **extra):
    env = dict(os.environ, WANDB_SILENT="true", DATA=str(data), OUT=str(out), PYTHON=sys.executable, **SMALL, **extra,
               PYTHONPATH=os.pathsep.join([str(data), str(REPO)]))
    return subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)


# the resume logic lives in reproduce.sh, which both data sets run: checked once (it costs three processes)
@pytest.mark.parametrize("dataset, fake, idrs, resumes", [("mnist", fake_mnist, "idrs_sb0.25_mpaper", True),
                                                          ("cifar10", fake_cifar10, "idrs_sb0.25_mours", False)])
@pytest.mark.slow
def test_the_reproduction_grid_runs_and_resumes(dataset, fake, idrs, resumes, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    fake(data)
    extra = {"M": "ours", "ARCH": "resnet20"} if dataset == "cifar10" else {}  # resnet110: test_models
    first = reproduce(f"reproduce_{dataset}.sh", data, out, **extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in ("rs_sb0.25", idrs):
        summary = json.loads((out / name / "certify" / "summary.json").read_text())
        assert summary["num_points"] == 3 and summary["n"] == 100 and summary["skip"] == 5
        assert summary["dataset"] == dataset
    hparams = (out / idrs / "fit.log").read_text()
    assert "best checkpoint:" in hparams
    table = (out / "results.md").read_text()
    assert "rs_sb0.25" in table and idrs in table
    assert ("Cohen et al. 2019" in table) == (dataset == "cifar10")
    if not resumes:
        return
    fits = (out / idrs / "fit.log").read_text()
    again = reproduce(f"reproduce_{dataset}.sh", data, out, **extra)  # everything done: nothing is redone
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / idrs / "fit.log").read_text() == fits
    assert re.findall(r"certified (\d+) new point", (out / idrs / "certify.log").read_text()) == ["3", "0"]
