"""Fixtures shared by the test modules: one trained digits checkpoint for the whole session, and a
model registered for one test at a time."""
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
