"""Tests that fail when a certificate is wrong: exact Monte Carlo bookkeeping, floating point, numerics at the edges.

Each test here was checked to fail on a deliberately planted bug (see the note on issue 9): the
Clopper-Pearson level changed, selection counts added to the estimation counts, pA bounded for the
wrong class, PREDICT's test made one-sided, faiss' ranking trusted without the float64 re-check, and
the rounding of sigma left out of the radius.
"""
import math
import warnings

import faiss
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_idrs import ConstantSigma, KnnSigma, SmoothedClassifier, certified_radius, cohen_radius
from lightning_idrs.radius import sigma_ratio_bounds
from lightning_idrs.smoothing import ABSTAIN


class Scripted(nn.Module):
    """A base classifier that answers class ``script[j]`` for the j-th noisy sample it is shown (its last
    answer once the script runs out)."""

    def __init__(self, script, num_classes=3):
        super().__init__()
        self.script, self.num_classes, self.seen = list(script), num_classes, 0

    def forward(self, x):
        answers = self.script[self.seen:self.seen + len(x)]
        classes = torch.tensor(answers + [self.script[-1]] * (len(x) - len(answers)))
        self.seen += len(x)
        return nn.functional.one_hot(classes, self.num_classes).float()


def certify_scripted(script, n0, n, alpha, sigma=0.5, r=0.0):
    class Elastic(ConstantSigma):
        semi_elasticity = r

    smoothed = SmoothedClassifier(Scripted(script), Elastic(sigma), num_classes=3)
    return smoothed.certify(torch.zeros(1, 4), n0, n, alpha, batch_size=64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_p_a_lower_is_the_clopper_pearson_bound_of_the_estimation_counts_only(alpha):
    n0, n = 20, 1000
    script = [2] * n0 + [2] * 900 + [1] * 100  # selection: class 2; estimation: 900 hits of class 2
    cert = certify_scripted(script, n0, n, alpha)
    expected = stats.beta.ppf(alpha, 900, 101)
    assert cert.prediction.tolist() == [2]
    assert cert.p_a_lower[0] == expected  # exactly: not 2 alpha, not alpha / 2, no selection counts
    assert cert.radius[0] == cohen_radius(expected, 0.5)


def test_the_class_chosen_by_selection_is_the_one_bounded():
    n0, n = 20, 1000
    script = [0] * n0 + [1] * 700 + [0] * 300  # selection says 0; estimation's majority is 1
    cert = certify_scripted(script, n0, n, 0.001)
    assert cert.prediction.tolist() == [ABSTAIN] and cert.radius[0] == 0.0
    assert cert.p_a_lower[0] == stats.beta.ppf(0.001, 300, 701)


def test_predict_uses_a_two_sided_binomial_test():
    n = 100
    alpha = 0.05
    # 59 vs 41: one-sided p = 0.044 <= alpha < two-sided p = 0.089, so PREDICT must abstain
    assert stats.binom.cdf(41, 100, 0.5) <= alpha < 2 * stats.binom.cdf(41, 100, 0.5)
    smoothed = SmoothedClassifier(Scripted([0] * 59 + [1] * 41), ConstantSigma(0.5), num_classes=3)
    assert smoothed.predict(torch.zeros(1, 4), n, alpha, batch_size=64).tolist() == [ABSTAIN]
    clear = SmoothedClassifier(Scripted([0] * 62 + [1] * 38), ConstantSigma(0.5), num_classes=3)
    assert clear.predict(torch.zeros(1, 4), n, alpha, batch_size=64).tolist() == [0]  # two-sided p = 0.021


@pytest.mark.parametrize("n_a, n_b, n_c", [(59, 41, 0), (62, 38, 0), (30, 12, 58), (50, 50, 0), (9, 0, 1)])
def test_predict_decides_with_scipys_binomtest_at_the_boundary(n_a, n_b, n_c):
    # class 2 is the majority in (30, 12, 58): the test is between the top two counts, whatever their classes
    counts = sorted([(n_a, 0), (n_b, 1), (n_c, 2)], reverse=True)
    top, second = counts[0][0], counts[1][0]
    p_value = stats.binomtest(top, top + second, 0.5).pvalue
    script = [0] * n_a + [1] * n_b + [2] * n_c
    for alpha, expected in ((p_value, counts[0][1]), (np.nextafter(p_value, 0), ABSTAIN)):
        if not 0 < alpha < 1:
            expected = ABSTAIN  # p = 1 (a tie): no alpha in (0, 1) predicts
            alpha = 0.5
        smoothed = SmoothedClassifier(Scripted(script), ConstantSigma(0.5), num_classes=3)
        assert smoothed.predict(torch.zeros(1, 4), len(script), alpha, batch_size=64).tolist() == [expected]


def brute_force_mean(queries, train, k):
    """Mean float64 distance to the k nearest of KnnSigma's fixed set {mu + fl32(x_i - mu)}, mu the float64 mean."""
    mu = train.astype(np.float64).mean(0)
    stored = (train.astype(np.float64) - mu).astype(np.float32).astype(np.float64)
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - mu - stored[None]) ** 2).sum(-1))
    return np.sort(dist, axis=1)[:, :k].mean(1)


def test_faiss_matrix_product_distances_are_never_trusted_for_the_ranking():
    rng = np.random.default_rng(7)
    centres = 300.0 * np.sign(rng.normal(size=(400, 1))) * np.ones((1, 512))
    train = (centres + 0.05 * rng.normal(size=(400, 512))).astype(np.float32)
    queries = train[:40] + (0.01 * rng.normal(size=(40, 512))).astype(np.float32)
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0  # faiss' inexact ||a||^2 + ||b||^2 - 2ab, as on a GPU
    try:
        sigma = KnnSigma(0.5, 1.0, k=5).fit(torch.from_numpy(train), cache_training=False)
        got = sigma.neighbour_distance(torch.from_numpy(queries)).numpy()
        index = faiss.IndexFlatL2(512)
        index.add(train - train.mean(0))
        faiss_order = index.search(queries - train.mean(0), 5)[1]
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold
    expected = brute_force_mean(queries, train, 5)
    true_order = np.argsort(((queries[:, None].astype(np.float64) - train[None]) ** 2).sum(-1), axis=1)[:, :5]
    assert (np.sort(faiss_order, 1) != np.sort(true_order, 1)).any(), "faiss' own ranking must be wrong here"
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_float32_rounding_of_sigma_is_covered_by_the_radius_slack():
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).reshape(-1, 64)
    r = 2.0
    sigma = KnnSigma(0.25, r, k=10).fit(images[:1000])
    rng = np.random.default_rng(0)
    x = images[1000:1797][rng.integers(0, 797, 40000)].clone()
    # a central pixel (training values up to 1) moved near 0, where float32 resolves steps of 1e-9
    x[:, 27] = torch.from_numpy(rng.uniform(1e-4, 1e-3, 40000).astype(np.float32))
    y = x.clone()
    y[:, 27] += 1e-9  # pairs about 1e-9 apart
    dist = torch.linalg.vector_norm(x.double() - y.double(), dim=1)
    assert ((dist > 0) & (dist < 2e-9)).all()
    sx, sy = sigma(x), sigma(y)
    excess = (torch.log(sx.double()) - torch.log(sy.double())).abs() - r * dist
    assert (excess > 0).sum() > 20, "float32 rounding must break the bare r ||x - y|| bound for some pairs"
    slack = sigma.log_error(sx, 40 * sx.double()) + sigma.log_error(sy, 40 * sy.double())
    assert (excess <= slack).all()
    radius = certified_radius(0.99, sx[:1].double().numpy(), r, 196_608, log_slack=slack[:1].numpy())
    plain = certified_radius(0.99, sx[:1].double().numpy(), r, 196_608)
    assert 0 < radius < plain and (plain - radius) / plain < 0.01  # the cost at ImageNet's N


def test_radius_near_one_half_is_tight_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = np.array([1e-6, 1e-8, 1e-10, 1e-12])
        radius = certified_radius(0.5 + eps, 0.5, 0.1, 3072)
    per_eps = radius / eps
    assert (radius > 0).all() and (radius < cohen_radius(0.5 + eps, 0.5)).all()
    np.testing.assert_allclose(per_eps, per_eps[0], rtol=0.03)  # linear in pA_lower - 1/2, as it must be


@pytest.mark.parametrize("dim", [1e9, 1e12, 1e15])
def test_thresholds_for_huge_dimensions(dim):
    p_b = np.array([0.1, 0.001])
    lower, upper = sigma_ratio_bounds(p_b, dim)
    c = 2 * np.log(p_b) / dim
    assert np.isfinite(lower).all() and np.isfinite(upper).all() and (lower < 1).all() and (upper > 1).all()
    t_low = lower**2 - 1  # log u + 1 - u = c with u = 1 + t, in the cancellation-free form
    np.testing.assert_allclose(np.log1p(t_low) - t_low, c, rtol=1e-6)
    t_high = upper**2 * (dim - 1) / dim - 1
    np.testing.assert_allclose(np.log1p(t_high) - t_high, c, rtol=1e-3)
    np.testing.assert_allclose(1 - lower, np.sqrt(-c / 2), rtol=1e-3)  # the asymptotic form
    small = sigma_ratio_bounds(p_b, dim / 1000)[0]
    assert (small < lower).all()  # the allowed band narrows as N grows


def test_api_inputs_are_accepted_or_refused_clearly():
    w = torch.zeros(6)
    w[0] = 1.0
    model = nn.Linear(6, 2)
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    x = torch.zeros(2, 6, requires_grad=True)
    cert = smoothed.certify(x, 10, 100, np.float64(0.01), np.int64(50))
    assert cert.radius.shape == (2,)
    with pytest.raises(ValueError, match=r"^alpha must be a number in \(0, 1\), got the string '0\.01'$"):
        smoothed.certify(x, 10, 100, "0.01", 50)
    with pytest.raises(ValueError, match="^n must be an integer >= 1, got None$"):
        smoothed.certify(x, 10, None, 0.01, 50)
    narrow = SmoothedClassifier(nn.Linear(6, 3), ConstantSigma(0.5), num_classes=2)
    with pytest.raises(ValueError, match=r"^the base classifier returns logits of shape \(20, 3\); expected \[20, 2\]"):
        narrow.certify(x, 10, 100, 0.01, 50)
    assert math.isfinite(cert.p_a_lower.sum())


def test_sequential_bounds_spend_alpha_over_the_stages():
    n0, n, alpha = 20, 100_000, 0.001  # 5 stages: 1,000, 3,162, 10,000, 31,623, 100,000 samples
    stages = 5
    script = [2] * n0 + [2] * 1000  # every estimation sample hits: the top of the grid after stage 1
    cert = certify_scripted(script, n0, n, alpha)
    assert cert.samples.tolist() == [100_000]  # fixed n: all of it (the script repeats its last answer)
    smoothed = SmoothedClassifier(Scripted(script + [2] * n), ConstantSigma(0.5), num_classes=3)
    seq = smoothed.certify(torch.zeros(1, 4), n0, n, alpha, batch_size=64, generator=torch.Generator().manual_seed(0),
                           radii=[0.25, 0.5, 0.75, 1.0])
    assert seq.samples.tolist() == [1000]
    assert seq.p_a_lower[0] == pytest.approx((alpha / stages) ** (1 / 1000), rel=1e-12)  # Beta(alpha/K; 1000, 1)
    assert seq.radius[0] == cohen_radius(seq.p_a_lower[0], 0.5) > 1.0
