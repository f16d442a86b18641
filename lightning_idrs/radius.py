"""Certified l2 radii for Gaussian smoothing with constant (RS) or input-dependent (IDRS) noise.

NumPy / SciPy only: no torch, no Lightning. Notation follows docs/math.md (after Sukenik et al., ICML 2022).

Cohen et al. (2019), constant sigma:  R = sigma * Phi^{-1}(pA_lower).

IDRS (docs/math.md, "the IDRS radius"). With pB = 1 - pA_lower at x0, sigma0 = sigma(x0), an adversary x1 at
distance R smoothed with sigma1 can raise the probability of the runner-up set B to at most

    xi_>(R) = F( (sigma0^2/sigma1^2) F^{-1}(pB; N, lam0); N, lam1 )            sigma1 < sigma0
    xi_<(R) = 1 - F( (sigma0^2/sigma1^2) F^{-1}(1 - pB; N, lam0); N, lam1 )    sigma1 > sigma0

F = CDF of the noncentral chi-square, lam_i = sigma_i^2 R^2 / (sigma0^2 - sigma1^2)^2. For an
r-semi-elastic sigma, sigma1 is in [sigma0 e^{-rR}, sigma0 e^{rR}] and the certified radius is
CR = sup{R : xi(R) < 1/2}, xi taken at both ends of that interval.

How we evaluate it (each step equivalent or conservative):

* Scale: with s = sigma1/sigma0, rho = r * sigma0 and R' = R / sigma0, xi depends on
  (pB, rho, R', N) only, so CR / sigma0 is a function of (pA_lower, rho, N).
* Quantile form: since F is continuous and increasing, xi_< < 1/2  <=>  pB < pB*_<(R) and
  xi_> < 1/2  <=>  pB < pB*_>(R) with the *critical runner-up mass*

      pB*_<(R) = 1 - F(s^2 * median(N, lam1); N, lam0),     s = e^{rho R'}
      pB*_>(R) =     F(s^2 * median(N, lam1); N, lam0),     s = e^{-rho R'}

  (sigma0 = 1). This needs one median and one tail probability, both well conditioned, instead
  of a tail quantile. We bracket the median and take the side that lowers pB* (conservative).
* Search: R' -> pB*(R') decreases (xi grows with R); we find its crossing with pB by a bracketed
  Illinois (regula falsi) search on Phi^{-1}(pB*(R')) - Phi^{-1}(pB), which is almost linear in R'
  (exactly linear for Cohen), vectorised over all points. The returned radius is the lower end of
  the final bracket, i.e. a radius at which certification was *verified*, never one interpolated.
* Upper bound: the interval of sigma1 contains sigma0 itself, so the IDRS radius can never exceed
  Cohen's; we return min(IDRS, Cohen).
* sigma1/sigma0 -> 1 (rho -> 0): lam ~ 1/(4 rho^2) explodes and the noncentral chi-square becomes
  slow and inaccurate in SciPy. A sigma that is r-semi-elastic is also r'-semi-elastic for every
  r' > r, and the set of admissible sigma1 only grows with r', so CR is non-increasing in rho.
  Hence for 0 < rho < RHO_FLOOR we evaluate at rho = RHO_FLOOR: the result is a valid, slightly
  smaller radius. rho == 0 exactly is Cohen's formula.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

__all__ = [
    "RHO_FLOOR",
    "certified_radius",
    "cohen_radius",
    "critical_runner_up_mass",
    "sigma_ratio_bounds",
    "worst_case_probability",
]

#: Smallest r * sigma0 evaluated exactly; below it the radius at RHO_FLOOR is returned (conservative).
RHO_FLOOR = 1e-4
#: Relative width (in units of Cohen's radius) at which the radius search stops.
RADIUS_RTOL = 1e-7
_MAX_ITERATIONS = 60


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _as_array(value, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {value!r}") from error
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def _check_probability(p, name: str) -> np.ndarray:
    p = _as_array(p, name)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1], got values in [{p.min()}, {p.max()}]")
    return p


def _check_sigma(sigma, name: str = "sigma") -> np.ndarray:
    sigma = _as_array(sigma, name)
    if (~np.isfinite(sigma) | (sigma <= 0)).any():
        raise ValueError(f"{name} must be finite and > 0, got min {sigma.min()}")
    return sigma


def _check_slack(log_slack) -> np.ndarray:
    slack = _as_array(log_slack, "log_slack")
    if (~np.isfinite(slack) | (slack < 0)).any():
        raise ValueError(f"log_slack must be finite and >= 0, got min {slack.min()}")
    return slack


def _check_dim(dim) -> int:
    if dim is None:
        raise ValueError("dim (the input dimension N) is required when semi_elasticity > 0")
    if isinstance(dim, bool) or int(dim) != dim or int(dim) < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


# --------------------------------------------------------------------------------------------
# Cohen et al.
# --------------------------------------------------------------------------------------------
def cohen_radius(p_a_lower, sigma) -> np.ndarray:
    """Cohen et al. (2019), Thm. 1: R = sigma * Phi^{-1}(pA_lower), 0 where pA_lower <= 1/2."""
    p = _check_probability(p_a_lower, "p_a_lower")
    sigma = _check_sigma(sigma)
    z = special.ndtri(np.clip(p, 0.5, 1.0))
    return np.where(p > 0.5, sigma * z, 0.0)


# --------------------------------------------------------------------------------------------
# the worst case (docs/math.md, "the IDRS radius")
# --------------------------------------------------------------------------------------------
def _noncentralities(log_ratio, distance):
    """(lam0, lam1, ratio^2) for sigma0 = 1, sigma1 = e^log_ratio, ||x1 - x0|| = distance (sigma0 units).

    sigma0^2 - sigma1^2 = -expm1(2 log_ratio) has no cancellation, even for log_ratio ~ 1e-300.
    """
    ratio_sq = np.exp(2.0 * log_ratio)
    lam0 = (distance / -np.expm1(2.0 * log_ratio)) ** 2
    return lam0, ratio_sq * lam0, ratio_sq


def worst_case_probability(p_b, sigma0, sigma1, distance, dim) -> np.ndarray:
    """Largest probability of the runner-up set at x1 (xi of docs/math.md), broadcasting.

    Direct transcription of xi_> (sigma1 < sigma0), xi_< (sigma1 > sigma0) and Cohen's
    Phi(Phi^{-1}(pB) + R/sigma0) (sigma1 == sigma0). Meant for inspection and tests; the radius
    search uses the equivalent, better conditioned :func:`critical_runner_up_mass`.
    """
    p_b = _check_probability(p_b, "p_b")
    sigma0, sigma1 = _check_sigma(sigma0, "sigma0"), _check_sigma(sigma1, "sigma1")
    distance = _as_array(distance, "distance")
    dim = _check_dim(dim)
    p_b, sigma0, sigma1, distance = np.broadcast_arrays(p_b, sigma0, sigma1, distance)
    ratio, dist = sigma1 / sigma0, distance / sigma0
    with np.errstate(all="ignore"):
        lam0, lam1, ratio_sq = _noncentralities(np.log(sigma1) - np.log(sigma0), dist)
        smaller = stats.ncx2.cdf(stats.ncx2.ppf(p_b, dim, lam0) / ratio_sq, dim, lam1)
        larger = stats.ncx2.sf(stats.ncx2.isf(p_b, dim, lam0) / ratio_sq, dim, lam1)
    cohen = special.ndtr(special.ndtri(p_b) + dist)
    xi = np.where(ratio < 1, smaller, larger)
    xi = np.where((ratio == 1) | (dist == 0), np.where(dist == 0, p_b, cohen), xi)
    return xi[()] if xi.ndim == 0 else xi


def _ncx2_median_bounds(dim: int, nc: np.ndarray):
    """Lower and upper bounds m_lo <= median <= m_hi of chi'^2(dim, nc), verified with the CDF.

    Start: Sankaran's (1963) cube-root approximation; two Newton steps; then widen a small bracket
    until F(m_lo) <= 1/2 <= F(m_hi) holds for the computed CDF.
    """
    k = float(dim)
    mean, var = k + nc, 2.0 * (k + 2.0 * nc)
    h = 1.0 - (2.0 / 3.0) * (k + nc) * (k + 3.0 * nc) / (k + 2.0 * nc) ** 2
    p = (k + 2.0 * nc) / (k + nc) ** 2
    mm = (h - 1.0) * (1.0 - 3.0 * h)
    median = mean * (1.0 + h * p * (h - 1.0 - 0.5 * (2.0 - h) * mm * p)) ** (1.0 / h)
    for _ in range(2):
        density = np.maximum(stats.ncx2.pdf(median, k, nc), 1e-300)
        median = median - (stats.ncx2.cdf(median, k, nc) - 0.5) / density
    sd = np.sqrt(var)
    low, high = median.copy(), median.copy()
    step = 1e-14 * sd + 1e-15 * mean  # a tight bracket keeps the radius tight for pA_lower near 1/2
    need_low = np.ones(median.shape, dtype=bool)
    need_high = need_low.copy()
    for _ in range(40):
        if need_low.any():
            low[need_low] = median[need_low] - step[need_low]
            need_low[need_low] = stats.ncx2.cdf(low[need_low], k, nc[need_low]) > 0.5
        if need_high.any():
            high[need_high] = median[need_high] + step[need_high]
            need_high[need_high] = stats.ncx2.cdf(high[need_high], k, nc[need_high]) < 0.5
        if not (need_low.any() or need_high.any()):
            return low, high
        step = step * 10.0
    raise FloatingPointError("could not bracket the noncentral chi-square median")


def _critical_mass_normalised(distance: np.ndarray, rho: np.ndarray, dim: int, slack=0.0) -> np.ndarray:
    """pB*(R') = min(pB*_<, pB*_>) for sigma0 = 1; distance > 0, rho >= RHO_FLOOR (arrays).

    The ends of sigma1's interval are e^{+-(rho R' + slack)} (``slack``: see ``certified_radius``).
    """
    result = None
    for sign in (+1.0, -1.0):  # sigma1 = e^{+(rho R' + slack)} (xi_<) and e^{-(rho R' + slack)} (xi_>)
        lam0, lam1, ratio_sq = _noncentralities(sign * (rho * distance + slack), distance)
        m_lo, m_hi = _ncx2_median_bounds(dim, lam1)
        if sign > 0:  # a larger median lowers 1 - F(s^2 m; lam0): conservative side is m_hi
            result = stats.ncx2.sf(ratio_sq * m_hi, dim, lam0)
        else:  # a smaller median lowers F(s^2 m; lam0): conservative side is m_lo
            mass = stats.ncx2.cdf(ratio_sq * m_lo, dim, lam0)
            result = np.minimum(result, mass)
    return result


def critical_runner_up_mass(distance, sigma0, semi_elasticity, dim, log_slack=0.0) -> np.ndarray:
    """pB*(R): x1 at distance R from x0 is certified iff pB < pB*(R) (both ends of sigma1's range).

    Equivalent to xi(R) < 1/2 (module docstring). For semi_elasticity == 0 it is Cohen's
    Phi(-R/sigma0); for rho = r*sigma0 below RHO_FLOOR it is evaluated at RHO_FLOOR (smaller).
    ``log_slack`` widens sigma1's interval as in :func:`certified_radius`.
    """
    sigma0 = _check_sigma(sigma0, "sigma0")
    r = _as_array(semi_elasticity, "semi_elasticity")
    if (r < 0).any():
        raise ValueError("semi_elasticity must be >= 0")
    distance = _as_array(distance, "distance")
    if (distance < 0).any():
        raise ValueError("distance must be >= 0")
    distance, sigma0, r = np.broadcast_arrays(distance, sigma0, r)
    dist = distance / sigma0
    out = special.ndtr(-dist)
    idrs = (r > 0) & (dist > 0)
    if idrs.any():
        dim = _check_dim(dim)
        rho = np.maximum(r[idrs] * sigma0[idrs], RHO_FLOOR)
        slack = np.broadcast_to(_check_slack(log_slack), out.shape)[idrs]
        out[idrs] = np.minimum(out[idrs], _critical_mass_normalised(dist[idrs], rho, dim, slack))
    return out[()] if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------
# the certified radius
# --------------------------------------------------------------------------------------------
def _idrs_radius_normalised(z: np.ndarray, p_b: np.ndarray, rho: np.ndarray, dim: int, slack: np.ndarray):
    """Largest verified R' in [0, z] with pB < pB*(R'); z = Phi^{-1}(pA_lower) > 0 (Cohen's R')."""
    target = special.ndtri(p_b)  # = -z; the gap Phi^{-1}(pB*) - Phi^{-1}(pB) is > 0 iff certified
    lo, g_lo = np.zeros_like(z), z.copy()  # R' -> 0: pB* -> 1/2, so the gap tends to z
    hi = z.copy()
    g_hi = special.ndtri(_critical_mass_normalised(hi, rho, dim, slack)) - target
    radius = np.zeros_like(z)
    at_cohen = g_hi > 0  # certified at Cohen's radius already (only through rounding): keep Cohen
    radius[at_cohen] = z[at_cohen]
    active = ~at_cohen
    side = np.zeros_like(z)  # Illinois bookkeeping: which end was kept last time
    for _ in range(_MAX_ITERATIONS):
        active &= (hi - lo) > RADIUS_RTOL * z
        if not active.any():
            break
        a = np.flatnonzero(active)
        # regula falsi point, kept strictly inside the bracket
        t = g_lo[a] / (g_lo[a] - g_hi[a])
        t = np.clip(t, 0.02, 0.98)
        mid = lo[a] + t * (hi[a] - lo[a])
        g_mid = special.ndtri(_critical_mass_normalised(mid, rho[a], dim, slack[a])) - target[a]
        ok = g_mid > 0
        good, bad = a[ok], a[~ok]
        lo[good], g_lo[good] = mid[ok], g_mid[ok]
        hi[bad], g_hi[bad] = mid[~ok], g_mid[~ok]
        # Illinois: halve the stale end's value when the same end moves twice in a row
        g_hi[good[side[good] > 0]] *= 0.5
        g_lo[bad[side[bad] < 0]] *= 0.5
        side[good], side[bad] = 1.0, -1.0
    radius[~at_cohen] = lo[~at_cohen]
    return radius


def certified_radius(p_a_lower, sigma, semi_elasticity=0.0, dim=None, log_slack=0.0) -> np.ndarray:
    """Certified l2 radius of the smoothed classifier at x0, vectorised with broadcasting.

    Args:
        p_a_lower: lower confidence bound on the top-class probability pA at x0.
        sigma: the noise level sigma0 = sigma(x0) used at x0 (the value the noise used).
        semi_elasticity: r such that log sigma(.) is r-Lipschitz in l2 (0: constant sigma).
        dim: input dimension N (required when semi_elasticity > 0).
        log_slack: s >= 0 such that |log sigma(x) - log sigma(y)| <= r ||x - y|| + s for x != y, for
            the floating-point sigma that the noise used (rounding; docs/math.md, "Floating point").
            sigma1 then lies in [sigma0 e^{-(rR + s)}, sigma0 e^{rR + s}]. Ignored where r == 0 (a
            constant sigma is the same number everywhere).

    Returns:
        0 where p_a_lower <= 1/2; Cohen's sigma * Phi^{-1}(p_a_lower) where r == 0; otherwise the
        IDRS radius sup{R : xi(R) < 1/2} over both ends sigma0 e^{-rR}, sigma0 e^{rR}
        (docs/math.md), computed conservatively (see the module docstring). inf where
        p_a_lower == 1 (then pB = 0 under every Gaussian).

    Examples:
        >>> from scipy.stats import norm
        >>> round(float(certified_radius(0.99, 0.25)), 4), round(float(0.25 * norm.ppf(0.99)), 4)  # r = 0: Cohen
        (0.5816, 0.5816)
        >>> idrs = certified_radius(0.99, 0.25, semi_elasticity=0.1, dim=784)  # an MNIST-sized input
        >>> round(float(idrs), 4), bool(idrs < certified_radius(0.99, 0.25))
        (0.4106, True)
        >>> certified_radius([0.4, 0.9, 0.999], 0.5, semi_elasticity=0.01, dim=3072).round(4)
        array([0.    , 0.5964, 1.4377])
    """
    p = _check_probability(p_a_lower, "p_a_lower")
    sigma = _check_sigma(sigma)
    r = _as_array(semi_elasticity, "semi_elasticity")
    if (~np.isfinite(r) | (r < 0)).any():
        raise ValueError(f"semi_elasticity must be finite and >= 0, got min {r.min()}")
    if (r > 0).any():
        dim = _check_dim(dim)
    elif dim is not None:
        _check_dim(dim)
    p, sigma, r, slack = np.broadcast_arrays(p, sigma, r, _check_slack(log_slack))
    radius = cohen_radius(p, sigma)
    idrs = (r > 0) & (p > 0.5) & (p < 1.0)
    if idrs.any():
        z = radius[idrs] / sigma[idrs]
        rho = np.maximum(r[idrs] * sigma[idrs], RHO_FLOOR)
        normalised = _idrs_radius_normalised(z, 1.0 - p[idrs], rho, dim, slack[idrs])
        radius[idrs] = np.minimum(radius[idrs], sigma[idrs] * normalised)
    return radius[()] if radius.ndim == 0 else radius


# --------------------------------------------------------------------------------------------
# curse of dimensionality
# --------------------------------------------------------------------------------------------
def _log_equation_roots(c: np.ndarray):
    """The roots t_low < 0 < t_high of log(1 + t) - t = c for c < 0 (u = 1 + t solves log u + 1 - u = c).

    Start: the Lambert W solution u = -W_k(-e^{c-1}) where it is accurate, and near the branch point
    (|c| < 1e-3, i.e. large N) the series t = -p + p^2/3 - 11 p^3 / 72 with p = +-sqrt(-2c); then three
    Newton steps on log1p(t) - t - c, which has no cancellation however small t is.
    """
    w = np.sqrt(-2.0 * c)
    arg = -np.exp(c - 1.0)
    roots = []
    for branch, p in ((0, w), (-1, -w)):
        series = -p + p**2 / 3.0 - 11.0 * p**3 / 72.0
        t = np.where(np.abs(c) < 1e-3, series, -special.lambertw(arg, branch).real - 1.0)
        for _ in range(3):
            t = t + (np.log1p(t) - t - c) * (1.0 + t) / t
        roots.append(t)
    return roots


def sigma_ratio_bounds(p_b, dim):
    """Thresholds on s = sigma1/sigma0 outside which x1 can never be certified (Thm. 2.4).

    sigma1 < sigma0: impossible if log(s^2) + 1 - s^2 < 2 log(pB)/N.
    sigma1 > sigma0: impossible if the same holds for s^2 (N-1)/N.
    With c = 2 log(pB)/N, log u + 1 - u = c has two roots u_low < 1 < u_high (computed without
    cancellation for any N, see ``_log_equation_roots``). Returns (lower, upper) with
    lower = sqrt(u_low) and upper = sqrt(u_high N/(N-1)); for N == 1 the upper bound is inf.

    Examples:
        >>> lower, upper = sigma_ratio_bounds(0.001, 784)  # MNIST, pB = 0.001 (the paper's Table 1)
        >>> round(float(lower), 4), round(float(upper), 4)
        (0.9076, 1.096)
        >>> [round(float(b), 4) for b in sigma_ratio_bounds(0.1, 3072)]  # CIFAR-10 is stricter
        [0.9727, 1.0277]
    """
    p_b = _check_probability(p_b, "p_b")
    if ((p_b <= 0) | (p_b >= 1)).any():
        raise ValueError("p_b must lie in (0, 1)")
    dim = np.asarray(dim)
    bad = (dim < 1) | (np.floor(dim) != dim)
    if bad.any():
        raise ValueError(f"dim must be a positive integer, got {np.ravel(dim)[np.ravel(bad)][0].item()!r}")
    dim = dim.astype(np.float64)
    t_low, t_high = _log_equation_roots(2.0 * np.log(p_b) / dim)
    lower = np.sqrt(1.0 + t_low)
    with np.errstate(divide="ignore"):
        # u_high N / (N - 1) = (1 + t_high)(1 + 1/(N - 1)), without forming N / (N - 1) - 1
        upper = np.where(dim > 1, np.sqrt((1.0 + t_high) * (1.0 + 1.0 / np.maximum(dim - 1.0, 1.0))), np.inf)
    if lower.ndim == 0:
        return float(lower), float(upper)
    return lower, upper
