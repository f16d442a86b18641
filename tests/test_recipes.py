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

from tests.helpers import N_TEST, N_TRAIN, fake_images, wait_all, write_idx

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


#: data set -> (its fake files, the IDRS run's name, the script's settings); resnet110 itself: test_models
GRIDS = {"mnist": (fake_mnist, "idrs_sb0.25_mpaper", {}),
         "cifar10": (fake_cifar10, "idrs_sb0.25_mours", {"M": "ours", "ARCH": "resnet20"})}


def reproduce(dataset, folder: Path) -> subprocess.Popen:
    """Start ``scripts/reproduce_DATASET.sh`` on ``folder/data`` into ``folder/out`` (output in ``folder/log``),
    on one core: the two grids run side by side, and their processes mostly import."""
    extra = GRIDS[dataset][2]
    env = dict(os.environ, WANDB_SILENT="true", DATA=str(folder / "data"), OUT=str(folder / "out"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", **SMALL, **extra,
               PYTHONPATH=os.pathsep.join([str(folder / "data"), str(REPO)]))
    with open(folder / "log", "ab") as log:
        return subprocess.Popen(["bash", str(REPO / "scripts" / f"reproduce_{dataset}.sh")], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen, folder: Path) -> None:
    assert wait_all([process], timeout=900) == [0], (folder / "log").read_text()[-6000:]


@pytest.mark.slow
def test_both_reproduction_grids_run_and_resume(tmp_path):
    """Both scripts end to end on fake data, side by side. The resume logic lives in reproduce.sh, which
    both run: it is checked once, on MNIST (a second pass costs three more processes)."""
    started = {}
    for dataset, (fake, _, _) in GRIDS.items():
        (tmp_path / dataset / "data").mkdir(parents=True)
        fake(tmp_path / dataset / "data")
        started[dataset] = reproduce(dataset, tmp_path / dataset)
    for dataset, process in started.items():
        finished(process, tmp_path / dataset)
    for dataset, (_, idrs, _) in GRIDS.items():
        out = tmp_path / dataset / "out"
        for name in ("rs_sb0.25", idrs):
            summary = json.loads((out / name / "certify" / "summary.json").read_text())
            assert summary["num_points"] == 3 and summary["n"] == 100 and summary["skip"] == 5
            assert summary["dataset"] == dataset
        assert "best checkpoint:" in (out / idrs / "fit.log").read_text()
        table = (out / "results.md").read_text()
        assert "rs_sb0.25" in table and idrs in table
        assert ("Cohen et al. 2019" in table) == (dataset == "cifar10")
    out, idrs = tmp_path / "mnist" / "out", GRIDS["mnist"][1]
    fits = (out / idrs / "fit.log").read_text()
    certified = (out / idrs / "certify.log").read_text()
    assert re.findall(r"certified (\d+) new point", certified) == ["3"]
    finished(reproduce("mnist", tmp_path / "mnist"), tmp_path / "mnist")  # everything done: nothing is redone
    assert (out / idrs / "fit.log").read_text() == fits and (out / idrs / "certify.log").read_text() == certified


STUB = """#!/usr/bin/env bash
# stands in for python: records each command; a fit prints its checkpoint as fit does
echo "$*" >> "$CALLS"
case "$*" in *" fit "*) echo "best checkpoint: /ckpt/$RANDOM.ckpt" ;; esac
"""


def test_reproduce_sh_redoes_nothing_finished_and_certifies_again_when_a_setting_changes(tmp_path):
    """reproduce.sh's own logic, with a stand-in for python (no process imports anything)."""
    python, calls = tmp_path / "python", tmp_path / "calls"
    python.write_text(STUB)
    python.chmod(0o755)

    def grid(**settings):
        env = dict(os.environ, DATA=str(tmp_path), OUT=str(tmp_path / "out"), PYTHON=str(python), CALLS=str(calls),
                   SIGMAS="0.25 0.5", **settings)
        subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "mnist"], env=env, check=True,
                       capture_output=True, timeout=60)
        commands = calls.read_text().splitlines()
        calls.unlink()
        return [c.split()[2] for c in commands if c.startswith("-m lightning_idrs ")]  # the command's name

    assert grid() == ["fit", "certify"] * 4  # rs and idrs at two sigma_b
    assert grid() == []  # finished: nothing started again
    assert grid(MAX="7") == ["certify"] * 4  # another setting: certified again, never trained again
    assert grid(MAX="7") == []
    (tmp_path / "out" / "rs_sb0.5" / "certified.txt").unlink()  # e.g. a certification that did not finish
    assert grid(MAX="7") == ["certify"]
