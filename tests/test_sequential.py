"""Sequential certification: sound for any stopping rule, the same grid buckets as fixed n, far fewer samples."""
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_idrs import ConstantSigma, Sigma, SmoothedClassifier, smoothing
from lightning_idrs.smoothing import ABSTAIN, clopper_pearson_upper, sequential_schedule

GRID = [0.25, 0.5, 0.75, 1.0]


class Halfspace(nn.Module):
    """f(x) = 1 if x_0 > 0 else 0: under N(x, s^2 I) the probability of class 1 is Phi(x_0 / s)."""

    def forward(self, x):
        score = x.flatten(1)[:, 0]
        return torch.stack([-score, score], dim=1)


class FirstPixelSigma(Sigma):
    """sigma(x) = 0.2 + |x_1| (an input-dependent level; its r plays no part in pA_lower)."""

    semi_elasticity = 0.0

    def forward(self, x):
        return (0.2 + x.flatten(1)[:, 1].abs()).float()


def points(margins, second=0.0):
    x = torch.zeros(len(margins), 4)
    x[:, 0] = torch.as_tensor(margins, dtype=torch.float32)
    x[:, 1] = second
    return x


def test_the_schedule():
    assert sequential_schedule(100_000) == [1000, 3162, 10000, 31623, 100000]
    assert sequential_schedule(500) == [500]
    assert sequential_schedule(2500) == [1000, 2500]


def test_upper_bound_is_the_beta_quantile():
    assert clopper_pearson_upper(30, 100, 0.01) == pytest.approx(stats.beta.ppf(0.99, 31, 70))
    assert clopper_pearson_upper(100, 100, 0.01) == 1.0


@pytest.mark.parametrize("sigma", ["constant", "input-dependent"])
def test_coverage_of_sequential_lower_bounds(sigma):
    """2,400 sequential runs on points of known pA: P(pA_lower > pA) <= alpha + 3 SE."""
    runs_per_point, alpha = 400, 0.05
    margins = np.array([0.05, 0.15, 0.3, 0.45, 0.6, 0.9])  # pA across every grid bucket
    if sigma == "constant":
        level, sigma_fn, second = np.full(len(margins), 0.5), ConstantSigma(0.5), np.zeros(len(margins))
    else:
        second = np.array([0.1, 0.3, 0.5, 0.2, 0.4, 0.6])
        level, sigma_fn = 0.2 + second, FirstPixelSigma()
    true_p_a = stats.norm.cdf(margins / level.astype(np.float32))
    x = points(np.repeat(margins, runs_per_point), torch.as_tensor(np.repeat(second, runs_per_point)).float())
    smoothed = SmoothedClassifier(Halfspace(), sigma_fn, num_classes=2)
    cert = smoothed.certify(x, 20, 10_000, alpha, batch_size=50_000, generator=torch.Generator().manual_seed(1),
                            radii=GRID)
    covered = cert.prediction != 0  # the selection picked the true top class (class 1) or abstained
    violations = (cert.p_a_lower > np.repeat(true_p_a, runs_per_point)) & covered
    runs = len(x)
    assert violations.mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    assert (cert.samples < 10_000).mean() > 0.3, "the test must exercise early stopping"


@pytest.mark.parametrize("stages_counted", [True, False], ids=["alpha/K", "mutant:alpha-per-stage"])
def test_coverage_with_true_p_a_on_the_bucket_edges(monkeypatch, stages_counted):
    """The hardest case for a stopping rule: true pA exactly on a grid edge (margin = radius = edge), so
    points keep sampling and every stage is a chance to overshoot. 2,400 runs: P(pA_lower > pA) <= alpha +
    3 SE with each stage at alpha / K; the same runs with each stage spending the whole alpha (a planted
    bug, run here as a mutant) overshoot far more often, so this test can tell the two apart."""
    runs_per_point, alpha, n = 600, 0.05, 10_000
    if not stages_counted:
        real_schedule = smoothing.sequential_schedule

        class CountsAsOneStage(list):  # the bookkeeping bug: level = alpha / 1
            def __len__(self):
                return 1

        monkeypatch.setattr(smoothing, "sequential_schedule", lambda n: CountsAsOneStage(real_schedule(n)))
    edges = np.array(GRID)  # Halfspace + constant sigma s: radius = s * Phi^-1(pA) = margin
    true_p_a = stats.norm.cdf(edges / np.float32(0.5))
    x = points(np.repeat(edges, runs_per_point))
    smoothed = SmoothedClassifier(Halfspace(), ConstantSigma(0.5), num_classes=2)
    cert = smoothed.certify(x, 20, n, alpha, batch_size=100_000, generator=torch.Generator().manual_seed(1),
                            radii=GRID)
    overshoot = ((cert.p_a_lower > np.repeat(true_p_a, runs_per_point)) & (cert.prediction != 0)).mean()
    bound = alpha + 3 * np.sqrt(alpha * (1 - alpha) / len(x))
    assert (cert.samples > 1000).mean() > 0.5, "points on an edge must go past the first stage"
    if stages_counted:
        assert overshoot <= bound
    else:
        assert overshoot > bound, f"a per-stage alpha went unnoticed: {overshoot:.3f} <= {bound:.3f}"


def test_every_sequential_bound_is_taken_at_alpha_over_the_stages(monkeypatch):
    """Exact bookkeeping: each lower bound of the sequential estimation uses alpha / len(schedule)."""
    levels = []
    real_lower = smoothing.clopper_pearson_lower

    def recording_lower(successes, trials, alpha):
        levels.append(alpha)
        return real_lower(successes, trials, alpha)

    monkeypatch.setattr(smoothing, "clopper_pearson_lower", recording_lower)
    smoothed = SmoothedClassifier(Halfspace(), ConstantSigma(0.5), num_classes=2)
    smoothed.certify(points([0.25, 0.5, 1.3]), 20, 100_000, 0.001, 100_000, torch.Generator().manual_seed(5),
                     radii=GRID)
    stages = len(smoothing.sequential_schedule(100_000))
    assert levels and all(level == pytest.approx(0.001 / stages, rel=1e-12) for level in levels)


def test_sequential_and_fixed_n_agree_on_the_grid_far_from_bucket_edges():
    margins = np.array([-0.3, 0.0, 0.12, 0.37, 0.62, 0.87, 1.2])  # radii in the middle of their buckets
    x = points(np.repeat(margins, 5))
    smoothed = SmoothedClassifier(Halfspace(), ConstantSigma(0.5), num_classes=2)
    fixed = smoothed.certify(x, 100, 100_000, 0.001, 100_000, torch.Generator().manual_seed(2))
    seq = smoothed.certify(x, 100, 100_000, 0.001, 100_000, torch.Generator().manual_seed(3), radii=GRID)

    def bucket(cert):
        return np.where(cert.prediction == ABSTAIN, -1, np.searchsorted(GRID, cert.radius, side="right"))

    np.testing.assert_array_equal(bucket(seq), bucket(fixed))
    np.testing.assert_array_equal(seq.prediction, fixed.prediction)
    assert (seq.radius <= fixed.radius + 1e-9).all() or (seq.radius[seq.prediction >= 0] > 0).all()
    assert fixed.samples.tolist() == [100_000] * len(x)
    assert seq.samples.sum() < 0.3 * fixed.samples.sum()
    assert (seq.samples[np.repeat(margins, 5) == 1.2] <= 3162).all()  # above the grid within two stages


def test_a_point_that_can_reach_no_higher_bucket_stops_and_one_that_can_goes_on():
    smoothed = SmoothedClassifier(Halfspace(), ConstantSigma(0.5), num_classes=2)
    near_edge = points([0.255] * 4)  # fixed-n radius just above 0.25: worth sampling further
    cert = smoothed.certify(near_edge, 100, 100_000, 0.001, 100_000, torch.Generator().manual_seed(4), radii=GRID)
    assert (cert.samples > 1000).all()
