"""The certification math: Cohen's radius, the IDRS radius, the curse-of-dimensionality bounds."""
import numpy as np
import pytest
from scipy import special, stats

from lightning_idrs import certified_radius, cohen_radius, sigma_ratio_bounds, worst_case_probability
from lightning_idrs.radius import RHO_FLOOR, critical_runner_up_mass
from tests.helpers import PAPER_TABLE

P_A = np.array([0.55, 0.7, 0.9, 0.99, 0.999, 0.99993])


def test_zero_semi_elasticity_is_cohen_exactly():
    p = np.linspace(0.0, 0.999999, 101)
    sigma = np.linspace(0.05, 2.0, 101)
    expected = np.where(p > 0.5, sigma * special.ndtri(p), 0.0)
    assert np.array_equal(certified_radius(p, sigma), expected)
    assert np.array_equal(certified_radius(p, sigma, 0.0, dim=3072), expected)


@pytest.mark.parametrize("dim", [2, 64, 784, 3072])
def test_radius_grows_with_p_a_and_shrinks_with_r_never_above_cohen(dim):
    p = np.linspace(0.51, 0.9999, 25)
    cohen = cohen_radius(p, 0.5)
    previous = cohen
    for r in [0.001, 0.01, 0.05, 0.2, 1.0]:
        radius = certified_radius(p, 0.5, r, dim)
        assert np.all(np.diff(radius) > 0), "radius must increase with p_a_lower"
        assert np.all(radius <= previous), "radius must not grow with r"
        assert np.all(radius <= cohen)
        assert np.all(radius > 0)
        previous = radius


def test_abstain_and_certain_edges():
    radius = certified_radius([0.0, 0.3, 0.5, 1.0], 0.25, 0.1, dim=10)
    assert np.array_equal(radius[:3], [0.0, 0.0, 0.0])
    assert np.isinf(radius[3])


def test_broadcasting_shapes():
    p = np.full((3, 1), 0.9)
    sigma = np.array([0.25, 0.5])
    assert certified_radius(p, sigma, 0.05, dim=100).shape == (3, 2)
    assert np.ndim(certified_radius(0.9, 0.5, 0.05, dim=100)) == 0


# The paper's table (PAPER.md): lower thresholds for sigma1/sigma0.
@pytest.mark.parametrize("dim", sorted(PAPER_TABLE))
def test_sigma_ratio_bounds_reproduce_the_papers_table(dim):
    lower, upper = sigma_ratio_bounds(np.array([0.1, 0.01, 0.001, 0.00007]), dim)
    np.testing.assert_allclose(lower, PAPER_TABLE[dim], atol=1e-3)
    assert np.all(upper > 1) and np.all(lower < 1)
    # the defining equation holds at both thresholds
    c = 2 * np.log([0.1, 0.01, 0.001, 0.00007]) / dim
    u = lower**2
    np.testing.assert_allclose(np.log(u) + 1 - u, c, rtol=1e-9)
    v = upper**2 * (dim - 1) / dim
    np.testing.assert_allclose(np.log(v) + 1 - v, c, rtol=1e-9)


@pytest.mark.parametrize("dim", [784, 3072])
def test_radius_respects_the_curse_of_dimensionality(dim):
    # At the certified radius, sigma0 e^{+-rR} must lie inside Thm. 2.4's feasible band.
    r = 0.3
    radius = certified_radius(P_A, 0.5, r, dim)
    lower, upper = sigma_ratio_bounds(1 - P_A, dim)
    assert np.all(np.exp(r * radius) <= upper)
    assert np.all(np.exp(-r * radius) >= lower)


@pytest.mark.parametrize("dim", [10, 784, 3072])
@pytest.mark.parametrize("r", [0.02, 0.3])
def test_radius_is_tight_and_verified_with_the_direct_formula(dim, r):
    sigma0 = 0.4
    radius = certified_radius(P_A, sigma0, r, dim)
    p_b = 1 - P_A

    def worst(distance):
        up = worst_case_probability(p_b, sigma0, sigma0 * np.exp(r * distance), distance, dim)
        down = worst_case_probability(p_b, sigma0, sigma0 * np.exp(-r * distance), distance, dim)
        return np.maximum(up, down)

    assert np.all(worst(radius) < 0.5), "certificate must be verified at the returned radius"
    assert np.all(worst(radius * 1.001) > 0.5), "radius should be tight (within 0.1%)"


def test_upper_end_binds_and_lower_end_alone_would_overstate():
    # PAPER.md: at the radius it is typically sigma1 > sigma0 (xi_<) that binds; a radius from
    # xi_> alone is too large.
    from scipy.optimize import brentq

    sigma0, r, dim = 0.5, 0.1, 3072
    radius = certified_radius(P_A, sigma0, r, dim)
    lower_only = np.array(
        [
            brentq(
                lambda d: worst_case_probability(1 - p, sigma0, sigma0 * np.exp(-r * d), d, dim) - 0.5,
                1e-6,
                cohen_radius(p, sigma0),
            )
            for p in P_A
        ]
    )
    assert np.all(lower_only >= radius)
    assert (lower_only / radius).max() > 1.02


@pytest.mark.parametrize("dim", [5, 784, 3072])
def test_interior_of_the_sigma_interval_is_never_worse_than_its_ends(dim):
    rng = np.random.default_rng(dim)
    for _ in range(20):
        p_b = 10 ** rng.uniform(-5, -0.5)
        rho, distance = 10 ** rng.uniform(-2.5, -0.5), rng.uniform(0.05, 2.0)
        ends = worst_case_probability(p_b, 1.0, np.exp([-rho * distance, rho * distance]), distance, dim)
        inside = np.exp(np.linspace(-rho * distance, rho * distance, 41)[1:-1])
        xi = worst_case_probability(p_b, 1.0, inside, distance, dim)
        assert np.all(xi <= ends.max() + 1e-9)


@pytest.mark.parametrize("dim", [10, 3072])
def test_critical_mass_decreases_with_distance_and_matches_xi(dim):
    distance = np.linspace(0.01, 3.0, 60)
    p_star = critical_runner_up_mass(distance, 1.0, 0.05, dim)
    assert np.all(np.diff(p_star) < 0)
    # xi evaluated at pB = pB*(R) is 1/2 for the binding end (the quantile form is equivalent)
    up = worst_case_probability(p_star, 1.0, np.exp(0.05 * distance), distance, dim)
    down = worst_case_probability(p_star, 1.0, np.exp(-0.05 * distance), distance, dim)
    np.testing.assert_allclose(np.maximum(up, down), 0.5, atol=1e-6)


def test_critical_mass_is_cohen_for_constant_sigma():
    distance = np.linspace(0, 3, 7)
    np.testing.assert_allclose(critical_runner_up_mass(distance, 0.5, 0.0, None), stats.norm.sf(distance / 0.5))


# ---------------------------------------------------------------------------------------------
# sigma1 / sigma0 -> 1 and huge N: conservative, finite, and close to the exact value
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [784, 3072, 196608])
def test_tiny_semi_elasticity_is_conservative_and_finite(dim):
    sigma0 = 0.5
    rs = np.array([1e-9, 1e-7, 1e-5, RHO_FLOOR / sigma0, 4 * RHO_FLOOR / sigma0, 1e-3, 1e-2])
    p = 0.999
    radius = certified_radius(p, sigma0, rs, dim)
    assert np.all(np.isfinite(radius)) and np.all(radius > 0)
    # non-increasing in r across the floor: below it we return the (smaller) value at the floor
    assert np.all(np.diff(radius) <= 0)
    floor_value = radius[3]
    np.testing.assert_array_equal(radius[:3], floor_value)
    assert np.all(radius <= cohen_radius(p, sigma0))
    # and not uselessly small: near Cohen's radius where sqrt(N) * r * sigma0 is small
    if dim <= 3072:
        assert radius[0] > 0.99 * cohen_radius(p, sigma0)


# ---------------------------------------------------------------------------------------------
# Monte Carlo: the worst-case set really has mass pB under x0 and xi under x1
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3, 5, 10])
@pytest.mark.parametrize("ratio", [0.8, 1.25])
def test_monte_carlo_worst_case_set(dim, ratio):
    rng = np.random.default_rng(100 * dim + int(ratio * 10))
    sigma0, sigma1, distance, p_b = 1.0, ratio, 0.6, 0.2
    x0 = np.zeros(dim)
    x1 = np.zeros(dim)
    x1[0] = distance
    n = 200_000
    z0 = x0 + sigma0 * rng.standard_normal((n, dim))
    z1 = x1 + sigma1 * rng.standard_normal((n, dim))

    center = (sigma0**2 * x1 - sigma1**2 * x0) / (sigma0**2 - sigma1**2)
    lam0 = sigma0**2 * distance**2 / (sigma0**2 - sigma1**2) ** 2
    if sigma1 < sigma0:  # B = ball around c with P0(B) = pB
        radius_sq = sigma0**2 * stats.ncx2.ppf(p_b, dim, lam0)
        in_b = lambda z: ((z - center) ** 2).sum(1) <= radius_sq  # noqa: E731
    else:  # B = complement of a ball with P0(B) = pB
        radius_sq = sigma0**2 * stats.ncx2.ppf(1 - p_b, dim, lam0)
        in_b = lambda z: ((z - center) ** 2).sum(1) > radius_sq  # noqa: E731
    xi = worst_case_probability(p_b, sigma0, sigma1, distance, dim)

    def close(estimate, value):
        return abs(estimate - value) < 4 * np.sqrt(value * (1 - value) / n)

    assert close(in_b(z0).mean(), p_b)
    assert close(in_b(z1).mean(), xi)
    # A half-space with the same mass under x0 (Cohen's worst case for equal sigmas) gives less.
    threshold = sigma0 * stats.norm.isf(p_b)
    half_space_0 = (z0[:, 0] >= threshold).mean()
    half_space_1 = (z1[:, 0] >= threshold).mean()
    assert close(half_space_0, p_b)
    assert half_space_1 < xi - 4 * np.sqrt(xi * (1 - xi) / n)
    # and a half-space pointing the other way gives less still
    assert (z1[:, 0] <= -threshold).mean() < half_space_1


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(p_a_lower=1.2, sigma=0.5), r"^p_a_lower must lie in \[0, 1\], got values in \[1\.2, 1\.2\]$"),
        (dict(p_a_lower=-0.1, sigma=0.5), r"^p_a_lower must lie in \[0, 1\], got values in \[-0\.1, -0\.1\]$"),
        (dict(p_a_lower=np.nan, sigma=0.5), "^p_a_lower contains NaN$"),
        (dict(p_a_lower=0.9, sigma=0.0), r"^sigma must be finite and > 0, got min 0\.0$"),
        (dict(p_a_lower=0.9, sigma=-1.0), r"^sigma must be finite and > 0, got min -1\.0$"),
        (dict(p_a_lower=0.9, sigma=0.5, semi_elasticity=-0.1, dim=10),
         r"^semi_elasticity must be finite and >= 0, got min -0\.1$"),
        (dict(p_a_lower=0.9, sigma=0.5, semi_elasticity=0.1),
         r"^dim \(the input dimension N\) is required when semi_elasticity > 0$"),
        (dict(p_a_lower=0.9, sigma=0.5, semi_elasticity=0.1, dim=0), "^dim must be a positive integer, got 0$"),
        (dict(p_a_lower=0.9, sigma=0.5, semi_elasticity=0.1, dim=2.5), r"^dim must be a positive integer, got 2\.5$"),
    ],
)
def test_bad_input_names_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        certified_radius(**kwargs)


def test_sigma_ratio_bounds_bad_input():
    with pytest.raises(ValueError, match=r"^p_b must lie in \(0, 1\)$"):
        sigma_ratio_bounds(0.0, 10)
    with pytest.raises(ValueError, match="^dim must be a positive integer, got "):
        sigma_ratio_bounds(0.1, 0)
