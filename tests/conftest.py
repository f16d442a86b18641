"""Fixtures shared by the test modules: one trained digits checkpoint for the whole session, and a
model registered for one test at a time; tests marked ``gpu`` are skipped without CUDA."""
from pathlib import Path

import pytest

from lightning_idrs.commands.fit import cli_main
from tests.helpers import QUIET, ViewCNN


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """One IDRS digits checkpoint of the default config (sigma knn, r = 0.2), trained 2 epochs, no logger.
    Tests read it or copy it; none may change the file."""
    root = tmp_path_factory.mktemp("fit")
    cli = cli_main(["fit", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
                    "--trainer.logger", "false", *QUIET])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.fixture
def viewcnn_arch():
    """The name of a registered architecture that cannot run channels-last; unregistered afterwards."""
    from lightning_idrs.models import MODELS, register_model

    register_model("viewcnn")(ViewCNN)
    yield "viewcnn"
    MODELS.pop("viewcnn", None)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; skipped without it")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
