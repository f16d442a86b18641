"""Training through ``python -m lightning_idrs fit`` (LightningCLI) on the bundled digits."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_idrs.cli import DEFAULT_CONFIG, cli_main
from lightning_idrs.data import DigitsDataModule, MNISTDataModule
from lightning_idrs.module import IDRSClassifier
from lightning_idrs.sigma import KnnSigma

REPO = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(tmp_path, *extra):
    args = ["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *extra]
    return cli_main(args)


def test_fit_end_to_end_checkpoint_reloads_identical_sigma_and_predictions(tmp_path):
    cli = fit(tmp_path)
    path = cli.trainer.checkpoint_callback.best_model_path
    assert path and Path(path).is_file() and str(tmp_path) in path

    trained = cli.model.eval()
    loaded = IDRSClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    assert isinstance(loaded.sigma, KnnSigma) and not loaded.sigma.is_fitted
    datamodule = DigitsDataModule()
    loaded.attach_data(datamodule)  # re-fits the index, checks the data fingerprint, keeps m
    assert loaded.sigma.m == trained.sigma.m

    x = torch.stack([datamodule.split_dataset("test")[i][0] for i in range(64)])
    torch.testing.assert_close(loaded.sigma(x), trained.sigma(x), rtol=0, atol=0)
    assert loaded.sigma(x).std() > 0  # the IDRS sigma really depends on x
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.cpu()(x))
    info = torch.load(path, map_location="cpu", weights_only=False)["lightning_idrs"]
    assert info["dim"] == 64 and info["input_shape"] == [1, 8, 8] and info["dataset"] == "digits"
    assert info["data_fingerprint"] == datamodule.fingerprint()


def test_default_fit_learns_from_any_directory_with_the_packaged_config(tmp_path):
    # The README's main command, shortened: no config file in the working directory.
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_SILENT="true")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_idrs", "fit", "--trainer.max_epochs", "8",
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("best checkpoint: ")][-1]
    checkpoint = (tmp_path / line.split(": ", 1)[1]).resolve()
    assert checkpoint.is_file() and tmp_path in checkpoint.parents
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B must run offline inside the run folder"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    noisy_acc = state["callbacks"][next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    assert noisy_acc > 0.8, f"smoothed (noisy) validation accuracy {noisy_acc:.3f} after 8 epochs"


def test_noise_is_per_input_and_scales_with_sigma():
    module = IDRSClassifier(sigma="knn", semi_elasticity=2.0, k=3)
    rng = torch.Generator().manual_seed(0)
    train = torch.rand(40, 1, 8, 8, generator=rng)
    train[:20] *= 0.1  # a dense cluster and a spread-out one: very different kNN distances
    module.sigma.fit(train)
    sigma = module.sigma.training_sigma(train, torch.arange(40))
    assert sigma.max() / sigma.min() > 1.5
    x = train.repeat_interleave(50, dim=0)
    torch.manual_seed(0)
    noise = module.add_noise(x, sigma.repeat_interleave(50)) - x
    per_image_std = noise.flatten(1).std(dim=1).reshape(40, 50).mean(dim=1)
    torch.testing.assert_close(per_image_std, sigma, rtol=0.05, atol=0)  # 4 standard errors


def test_training_step_uses_each_training_points_own_sigma():
    module = IDRSClassifier(sigma="knn", semi_elasticity=2.0, k=3)
    train = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    module.sigma.fit(train)
    seen = []
    module.add_noise = lambda x, s: (seen.append(s), x)[1]
    idx = torch.tensor([3, 17, 5])
    module.training_step((train[idx], torch.tensor([0, 1, 2]), idx), 0)
    torch.testing.assert_close(seen[0], module.sigma.training_sigma(None, idx))


def test_ddp_two_cpu_processes_share_sigma_and_train(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_idrs", "fit", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
         "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "sigma(x) identical on 2 rank(s)" in output
    assert list(tmp_path.rglob("*.ckpt"))
    # the certification callback: each rank certified its shard, rank 0 logged all points once
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [float(r["certify/num_points"]) for r in rows if r.get("certify/num_points")]
    assert logged == [100.0]


# ------------------------------------------------------------------------------------ bad input
def test_unknown_config_key_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        fit(tmp_path, "--model.sigma_bse", "0.3")
    assert error.value.code != 0
    assert "sigma_bse" in capsys.readouterr().err


def test_non_positive_sigma_base_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sigma_base"):
        fit(tmp_path, "--model.sigma_base", "0")


def test_missing_data_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        fit(tmp_path, "--data", "lightning_idrs.data.MNISTDataModule", "--data.root", str(tmp_path / "nowhere"),
            "--model.arch", "lenet")


def test_checkpoint_for_other_data_is_refused(tmp_path):
    cli = fit(tmp_path, "--trainer.max_epochs", "1")
    loaded = IDRSClassifier.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu")
    with pytest.raises(ValueError, match="fingerprint"):
        loaded.attach_data(DigitsDataModule(seed=1))  # same data set, different training split
    with pytest.raises(ValueError, match="input shape"):
        loaded.attach_data(MNISTDataModule(root=str(tmp_path)))


def test_repository_configs_parse_and_default_matches_the_packaged_one():
    assert (REPO / "configs" / "digits_idrs.yaml").read_text() == DEFAULT_CONFIG.read_text()
    names = {"digits_idrs", "digits_rs", "mnist_idrs", "mnist_rs", "cifar10_idrs", "cifar10_rs"}
    assert names <= {p.stem for p in (REPO / "configs").glob("*.yaml")}
    for name in names:
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert config["model"]["sigma"] == ("knn" if name.endswith("idrs") else "constant")
    for data in ("mnist", "cifar10", "digits"):
        idrs = yaml.safe_load((REPO / "configs" / f"{data}_idrs.yaml").read_text())["model"]
        rs = yaml.safe_load((REPO / "configs" / f"{data}_rs.yaml").read_text())["model"]
        assert idrs["sigma_base"] == rs["sigma_base"], "RS must use the same sigma_b as IDRS"


@pytest.mark.parametrize("name", ["digits_rs", "mnist_idrs", "cifar10_rs"])
def test_repository_configs_are_accepted_by_the_cli(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["sigma"] == ("knn" if name.endswith("idrs") else "constant")


def test_test_subcommand_evaluates_a_checkpoint_clean_and_noisy(tmp_path):
    cli = fit(tmp_path, "--trainer.max_epochs", "3")
    path = cli.trainer.checkpoint_callback.best_model_path
    tested = cli_main(["test", "--ckpt_path", path, "--trainer.logger", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    metrics = tested.trainer.callback_metrics
    assert 0.5 < float(metrics["test/clean_acc"]) <= 1 and 0.3 < float(metrics["test/noisy_acc"]) <= 1
