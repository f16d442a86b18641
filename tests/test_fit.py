"""Training through ``python -m lightning_idrs fit`` (LightningCLI) on the bundled digits."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_idrs import IDRSClassifier, KnnSigma, add_noise, load_checkpoint
from lightning_idrs.commands import main
from lightning_idrs.commands.fit import CONFIGS, DEFAULT_CONFIG, cli_main
from lightning_idrs.data import DigitsDataModule, MNISTDataModule

REPO = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(tmp_path, *extra):
    args = ["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *extra]
    return cli_main(args)


@pytest.mark.slow
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
    loaded = load_checkpoint(path)  # the one loader: safe unpickler, data module rebuilt, sigma fitted
    info = loaded.metadata
    assert info["dim"] == 64 and info["input_shape"] == [1, 8, 8] and info["dataset"] == "digits"
    assert info["data_fingerprint"] == datamodule.fingerprint() == loaded.datamodule.fingerprint()
    assert info["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma" and info["semi_elasticity"] == 0.2
    torch.testing.assert_close(loaded.model.sigma(x), trained.sigma(x), rtol=0, atol=0)


@pytest.mark.slow
def test_default_fit_learns_from_any_directory_with_the_packaged_config(tmp_path, monkeypatch, capsys):
    # The README's main command, shortened: no config file in the working directory.
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--trainer.max_epochs", "8", "--trainer.enable_progress_bar", "false"])
    result = capsys.readouterr()
    assert code == 0, result.err[-3000:]
    line = [l for l in result.out.splitlines() if l.startswith("best checkpoint: ")][-1]
    checkpoint = (tmp_path / line.split(": ", 1)[1]).resolve()
    assert checkpoint.is_file() and tmp_path in checkpoint.parents
    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # W&B runs offline inside the run folder, with all its
    deadline = time.monotonic() + 60  # W&B's service writes output.log just after the run finished
    while not (run / "files" / "output.log").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "files" / "output.log").is_file()  # files: W&B's service, started by an earlier test in another
    wandb_line = next(l for l in result.out.splitlines() if l.startswith("W&B: offline run"))  # folder, once wrote
    assert wandb_line.endswith(f"wandb sync wandb/{run.name}")  # this one there (the run folder was relative)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    noisy_acc = state["callbacks"][next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    assert noisy_acc > 0.8, f"smoothed (noisy) validation accuracy {noisy_acc:.3f} after 8 epochs"


def test_noise_is_per_input_and_scales_with_sigma():
    module = IDRSClassifier(sigma=KnnSigma(0.25, 2.0, k=3))
    rng = torch.Generator().manual_seed(0)
    train = torch.rand(40, 1, 8, 8, generator=rng)
    train[:20] *= 0.1  # a dense cluster and a spread-out one: very different kNN distances
    module.sigma.fit(train)
    sigma = module.sigma.training_sigma(train, torch.arange(40))
    assert sigma.max() / sigma.min() > 1.5
    x = train.repeat_interleave(50, dim=0)
    torch.manual_seed(0)
    noise = add_noise(x, sigma.repeat_interleave(50)) - x
    per_image_std = noise.flatten(1).std(dim=1).reshape(40, 50).mean(dim=1)
    torch.testing.assert_close(per_image_std, sigma, rtol=0.05, atol=0)  # 4 standard errors


def test_training_step_uses_each_training_points_own_sigma(monkeypatch):
    module = IDRSClassifier(sigma=KnnSigma(0.25, 2.0, k=3))
    train = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    module.sigma.fit(train)
    seen = []
    monkeypatch.setattr("lightning_idrs.objectives.add_noise", lambda x, s: (seen.append(s), x)[1])
    idx = torch.tensor([3, 17, 5])
    module.training_step((train[idx], torch.tensor([0, 1, 2]), idx), 0)
    torch.testing.assert_close(seen[0], module.sigma.training_sigma(None, idx))


@pytest.mark.slow
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
    logged = [float(r["monitor/num_points"]) for r in rows if r.get("monitor/num_points")]  # the Callback: monitor/
    assert logged == [100.0]


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("flags, message", [
    (["--model.sigma_bse", "0.3"], "error: "),
    (["--model.sigma.sigma_base", "0"], "error: --model.sigma.sigma_base must be a finite number > 0, got 0"),
    (["--model.sigma.k", "2.5"], "error: --model.sigma.k must be an integer >= 1, got 2.5"),
    (["--model.sigma.semi_elasticity", "-1"], "error: --model.sigma.semi_elasticity must be a finite number >= 0, got -1"),
])
def test_bad_options_are_one_error_line(tmp_path, capsys, flags, message):
    code = main(["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(message), err
    assert not list(tmp_path.iterdir()), "nothing may be written for a bad option"


@pytest.mark.slow
def test_checkpoint_for_other_data_is_refused(tmp_path):
    cli = fit(tmp_path, "--trainer.max_epochs", "1")
    loaded = IDRSClassifier.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu")
    with pytest.raises(ValueError, match=r"this model was trained on 'digits' data with fingerprint [0-9a-f]{12}\.\.\., "
                       r"but the datamodule 'digits' gives [0-9a-f]{12}\.\.\."):
        loaded.attach_data(DigitsDataModule(seed=1))  # same data set, different training split
    with pytest.raises(ValueError, match=r"data 'mnist' has input shape / classes \(\(1, 28, 28\), 10\), "
                                         r"the model expects \(\(1, 8, 8\), 10\)"):
        loaded.attach_data(MNISTDataModule(root=str(tmp_path)))


def printed_config(capsys, *configs):
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *(f"--config={name}" for name in configs), "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("data, arch", [("digits", "small_cnn"), ("mnist", "lenet"), ("cifar10", "resnet20")])
def test_packaged_configs_by_name_and_rs_keeps_the_data_sets_sigma_b(capsys, data, arch):
    assert DEFAULT_CONFIG == CONFIGS / "digits.yaml"
    idrs = printed_config(capsys, data)
    rs = printed_config(capsys, data, "rs")
    assert idrs["model"]["arch"] == rs["model"]["arch"] == arch
    assert idrs["model"]["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma"
    assert rs["model"]["sigma"]["class_path"] == "lightning_idrs.sigma.ConstantSigma"
    assert rs["model"]["sigma"]["init_args"]["sigma_base"] == idrs["model"]["sigma"]["init_args"]["sigma_base"]
    assert printed_config(capsys, str(CONFIGS / f"{data}.yaml")) == idrs  # a path works as well as a name


@pytest.mark.slow
def test_test_subcommand_evaluates_a_checkpoint_clean_and_noisy(tmp_path):
    cli = fit(tmp_path, "--trainer.max_epochs", "3")
    path = cli.trainer.checkpoint_callback.best_model_path
    tested = cli_main(["test", "--ckpt_path", path, "--trainer.logger", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    metrics = tested.trainer.callback_metrics
    assert 0.5 < float(metrics["test/clean_acc"]) <= 1 and 0.3 < float(metrics["test/noisy_acc"]) <= 1


@pytest.mark.slow
def test_embedding_and_index_options_are_reachable_from_the_command_line(tmp_path):
    cli = fit(tmp_path, "--trainer.max_epochs", "1", "--model.sigma.embedding", "PCAProjection",
              "--model.sigma.embedding.dim", "12", "--model.sigma.index_factory", "Flat", "--model.sigma.k", "7")
    sigma = cli.model.sigma
    assert type(sigma.embedding).__name__ == "PCAProjection" and sigma.embedding.components.shape == (12, 64)
    assert sigma.k == 7 and sigma.semi_elasticity == 0.2  # Lip(PCA projection) = 1
    loaded = load_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    x = torch.stack([loaded.datamodule.split_dataset("test")[i][0] for i in range(32)])
    torch.testing.assert_close(loaded.model.sigma.embedding.components, sigma.embedding.components.cpu())
    torch.testing.assert_close(loaded.model.sigma(x), sigma(x), rtol=0, atol=0)
