"""Fixtures shared by the test modules: one trained digits checkpoint for the whole session, and a
model registered for one test at a time; tests marked ``gpu`` are skipped where torch sees no CUDA,
and every other test runs on the CPU even where a GPU is visible (``cpu_unless_marked_gpu``)."""
from pathlib import Path

import pytest
import torch

from lightning_idrs.commands.fit import cli_main
from tests.helpers import QUIET, ViewCNN


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: without it they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu): torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """The tests not marked ``gpu`` state what happens on a CPU (its defaults: 1,000 samples per pass, no
    compilation, CPU rows): where a GPU is visible they still run on the CPU, in this process (torch and
    Lightning see no CUDA device) and in the processes they start (CUDA_VISIBLE_DEVICES is empty). The
    ``gpu`` tests (``pytest -m gpu``) are the ones that use the GPU. Nothing changes on a machine without one."""
    if request.node.get_closest_marker("gpu") is not None or not torch.cuda.is_available():
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """One IDRS digits checkpoint of the default config (sigma knn, r = 0.2), trained 2 epochs on the CPU, no
    logger. Tests read it or copy it; none may change the file."""
    root = tmp_path_factory.mktemp("fit")
    cli = cli_main(["fit", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
                    "--trainer.accelerator", "cpu", "--trainer.logger", "false", *QUIET])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.fixture
def viewcnn_arch():
    """The name of a registered architecture that cannot run channels-last; unregistered afterwards."""
    from lightning_idrs.models import MODELS, register_model

    register_model("viewcnn")(ViewCNN)
    yield "viewcnn"
    MODELS.pop("viewcnn", None)
