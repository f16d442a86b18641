"""A sigma function defined outside the package, plugged in by class_path: fit, Callback, certify."""
import pytest
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lightning_idrs import IDRSClassifier, Sigma, certified_radius, load_checkpoint
from lightning_idrs.commands.fit import cli_main
from lightning_idrs.reporting import SUMMARY_NAME, read_summary
from lightning_idrs.tsv_log import TSV_NAME, read_tsv

REPO = Path(__file__).resolve().parents[1]


class NormSigma(Sigma):
    """sigma(x) = sigma_b * exp(r * (||x|| - m)).

    r-semi-elastic: |log sigma(x) - log sigma(y)| = r | ||x|| - ||y|| | <= r ||x - y||.
    """

    def __init__(self, sigma_base: float = 0.25, r: float = 0.1, m: float = 3.9):
        super().__init__()
        self.sigma_base, self.r, self.m = sigma_base, r, m

    @property
    def semi_elasticity(self) -> float:
        return self.r

    def forward(self, x):
        norm = torch.linalg.vector_norm(x.flatten(1).double(), dim=1)
        return (self.sigma_base * torch.exp(self.r * (norm - self.m))).float()


SIGMA = ["--model.sigma", "tests.test_user_sigma.NormSigma", "--model.sigma.r", "0.3"]
CALLBACK = ["--trainer.callbacks+=lightning_idrs.callbacks.CertificationCallback",
            "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.num_points=30", "--trainer.callbacks.n=64"]


def test_built_in_python_the_model_records_the_sigma_as_class_path():
    model = IDRSClassifier(sigma=NormSigma(0.5, 0.2, 4.0))
    assert model.hparams["sigma"] == {"class_path": "tests.test_user_sigma.NormSigma",
                                      "init_args": {"sigma_base": 0.5, "r": 0.2, "m": 4.0}}


@pytest.mark.slow
def test_user_sigma_trains_with_the_callback_and_certifies_from_the_command_line(tmp_path):
    cli = cli_main(["fit", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
                    "--trainer.callbacks=[]", *CALLBACK, *SIGMA])
    assert type(cli.model.sigma).__name__ == "NormSigma" and cli.model.sigma.r == 0.3
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("monitor/acr")]
    assert len(rows) == 2 and float(rows[-1]["monitor/num_points"]) == 30
    assert float(rows[-1]["monitor/acc_R0"]) > 0.3  # the Callback certified with the user's sigma
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    loaded = load_checkpoint(checkpoint)
    assert type(loaded.model.sigma).__name__ == "NormSigma" and loaded.metadata["semi_elasticity"] == 0.3

    out = tmp_path / "certify"
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_SILENT="true")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_idrs", "certify", "--ckpt_path", checkpoint, "--certify.n0", "10",
         "--certify.n", "300", "--certify.max", "12", "--certify.out", str(out), "--wandb.mode", "disabled"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tsv, summary = read_tsv(out / TSV_NAME), read_summary(out / SUMMARY_NAME)
    assert summary["sigma"]["class_path"] == "tests.test_user_sigma.NormSigma" and summary["semi_elasticity"] == 0.3
    test = loaded.datamodule.split_dataset("test")
    x = torch.stack([test[int(i)][0] for i in tsv["idx"]])
    np.testing.assert_array_equal(tsv["sigma"], NormSigma(r=0.3)(x).double().numpy())
    assert tsv["sigma"].std() > 0
    certified = tsv["predict"] >= 0
    assert certified.sum() >= 6
    # forward returns float32 (no further rounding in the noise): the slack is twice the default log_error
    expected = certified_radius(tsv["p_a_lower"], tsv["sigma"], 0.3, 64, log_slack=2 * Sigma.DEFAULT_LOG_ERROR)
    np.testing.assert_allclose(tsv["radius"][certified], expected[certified], rtol=1e-12)
