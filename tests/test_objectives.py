"""Training objectives: the noise path, the losses against their formulas, RS / IDRS steps, a user objective."""
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import lightning_idrs.objectives as objectives
from lightning_idrs import ConstantSigma, DigitsDataModule, IDRSClassifier, KnnSigma
from lightning_idrs.commands import main
from lightning_idrs.commands.fit import cli_main
from lightning_idrs.objectives import (ConsistencyRegularization, GaussianAugmentation, MACER, Objective,
                                       ObjectiveOutput)
from lightning_idrs.smoothing import add_noise

ALL = [GaussianAugmentation(), ConsistencyRegularization(), MACER(num_noise=4)]


class LabelSmoothing(Objective):
    """A user's objective: label-smoothed cross-entropy on one noisy copy."""

    calls = 0

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, model, x, y, sigma):
        LabelSmoothing.calls += 1
        logits = model(add_noise(x, sigma))
        return ObjectiveOutput(F.cross_entropy(logits, y, label_smoothing=self.smoothing), logits)


class Fixed(nn.Module):
    """Logits that ignore the input (so every noisy copy predicts the same)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.flatten(1)[:, :1]


def test_gaussian_augmentation_is_todays_training_row_for_row():
    torch.manual_seed(0)
    model, x, y, sigma = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.rand(8, 1, 8, 8), torch.arange(8), torch.rand(8)
    torch.manual_seed(1)
    loss, logits = GaussianAugmentation()(model, x, y, sigma)
    torch.manual_seed(1)
    expected = model(x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape))
    assert torch.equal(logits, expected) and torch.equal(loss, F.cross_entropy(expected, y))


@pytest.mark.parametrize("objective", ALL, ids=lambda o: type(o).__name__)
def test_noise_is_drawn_through_add_noise_at_the_given_sigma(objective, monkeypatch):
    seen = []

    def recording(x, sigma, generator=None):
        seen.append(sigma.clone())
        return add_noise(x, sigma, generator)

    monkeypatch.setattr(objectives, "add_noise", recording)
    sigma = torch.tensor([0.1, 0.2, 0.3])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loss, logits = objective(model, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]), sigma)
    copies = getattr(objective, "num_noise", 1)
    assert len(seen) == 1 and torch.equal(seen[0], sigma.repeat(copies))
    assert loss.dim() == 0 and torch.isfinite(loss) and logits.shape == (3, 10)


def test_consistency_matches_jeong_and_shins_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y, sigma = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4]), torch.full((5,), 0.5)
    objective = ConsistencyRegularization(num_noise=3, lbd=7.0, eta=0.3)
    torch.manual_seed(2)
    loss, _ = objective(model, x, y, sigma)
    torch.manual_seed(2)  # their code: m chunks of the repeated batch, KLDivLoss(log p_i, mean), entropy of the mean
    chunks = model(add_noise(x.repeat(3, 1, 1, 1), sigma.repeat(3))).chunk(3)
    xent = sum(F.cross_entropy(c, y) for c in chunks) / 3
    mean = sum(F.softmax(c, 1) for c in chunks) / 3
    kl = sum(F.kl_div(F.log_softmax(c, 1), mean, reduction="none").sum(1) for c in chunks) / 3
    entropy = -(mean * mean.log()).sum(1)
    torch.testing.assert_close(loss, xent + 7.0 * kl.mean() + 0.3 * entropy.mean())
    # copies that agree have no consistency term: the loss is CE + eta * entropy
    fixed = Fixed([2.0, 0.0, 1.0])
    loss, _ = ConsistencyRegularization(lbd=100.0, eta=0.0)(fixed, x[:3], y[:3], sigma[:3])
    torch.testing.assert_close(loss, F.cross_entropy(fixed(x[:3]), y[:3]))


def test_macer_robustness_term_scales_with_sigma_per_input():
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 0])
    fixed = Fixed([1.0, 0.9, -5.0])  # class 0 on top with a small margin: the hinge is active
    objective = MACER(num_noise=2, lbd=1.0, gamma=8.0, beta=1.0)
    base, _ = MACER(num_noise=2, lbd=0.0)(fixed, x, y, torch.ones(2))
    p = F.softmax(torch.tensor([1.0, 0.9, -5.0]), 0)
    margin = float(torch.distributions.Normal(0, 1).icdf(p[0]) - torch.distributions.Normal(0, 1).icdf(p[1]))
    for sigma in (torch.tensor([0.25, 0.25]), torch.tensor([0.25, 1.0])):
        loss, _ = objective(fixed, x, y, sigma)
        expected = float(base) + float(sigma.sum()) / 2 * (8.0 - margin) / 2
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    wrong, _ = objective(fixed, x, torch.tensor([1, 1]), torch.ones(2))  # misclassified: no hinge
    assert float(wrong) == pytest.approx(float(F.cross_entropy(torch.log(p).expand(2, -1), torch.tensor([1, 1]))), rel=1e-5)


@pytest.mark.parametrize("sigma", ["rs", "idrs"])
@pytest.mark.parametrize("objective", ALL, ids=lambda o: type(o).__name__)
def test_each_objective_trains_steps_with_rs_and_idrs_sigma(objective, sigma, tmp_path):
    pl.seed_everything(0)
    sigma_fn = ConstantSigma(0.25) if sigma == "rs" else KnnSigma(0.25, semi_elasticity=0.2, k=5)
    model = IDRSClassifier(arch="mlp", sigma=sigma_fn, objective=objective, mean=(0.3,), std=(0.4,))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.hparams["_objective"]["class_path"] == f"lightning_idrs.objectives.{type(objective).__name__}"


def test_a_users_objective_by_class_path(tmp_path):
    LabelSmoothing.calls = 0
    cli = cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.default_root_dir", str(tmp_path),
                    "--model.objective", "tests.test_objectives.LabelSmoothing", "--model.objective.smoothing", "0.2"])
    assert isinstance(cli.model.objective, LabelSmoothing) and cli.model.objective.smoothing == 0.2
    assert LabelSmoothing.calls == 4
    assert cli.model.hparams["_objective"] == {"class_path": "tests.test_objectives.LabelSmoothing",
                                               "init_args": {"smoothing": 0.2}}


@pytest.mark.slow
def test_bad_objective_options_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for flags, word in ((["--model.objective", "torch.nn.Linear"], "objective"),
                        (["--model.objective", "ConsistencyRegularization", "--model.objective.num_noise", "0"],
                         "num_noise")):
        code = main(["fit", "--trainer.logger", "false", *flags])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err[-2000:]
        assert not list(tmp_path.iterdir()), "a refused fit wrote files"