"""Certified-accuracy statistics (NumPy) of randomized smoothing results (Cohen et al. 2019, Sukenik et al. 2022).

Definitions (docs/math.md, "what is reported"): a test point is *certified at radius R* when the
smoothed prediction is correct (it did not abstain) and its certified radius is >= R. The certified
accuracy at R is the fraction of all test points certified at R (abstained and wrong points count
in the denominator, never in the numerator). The average certified radius (ACR) is the mean over
all points of ``radius * correct``.

Everything here is plain NumPy and vectorised over points. ``lightning_idrs.metric.CertifiedAccuracy``
wraps the same statistics in a torchmetrics ``Metric`` gathered across DDP ranks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "abstain_rate",
    "as_radius_grid",
    "average_certified_radius",
    "certified_accuracy",
    "certified_counts",
    "class_certified_accuracy",
    "class_certified_accuracy_matrix",
    "default_radius_grid",
    "radius_key",
    "summarize",
]

ABSTAIN = -1


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------
def _as_1d(name: str, x, dtype=None) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _radius(radius) -> np.ndarray:
    r = _as_1d("radius", radius, dtype=np.float64)
    if np.isnan(r).any():
        raise ValueError("radius contains NaN")
    if (r < 0).any():
        raise ValueError("radius must be >= 0 (abstained points have radius 0)")
    return r


def _correct(correct) -> np.ndarray:
    c = _as_1d("correct", correct)
    if c.dtype == bool:
        return c
    cf = c.astype(np.float64)
    if not np.isin(cf, (0.0, 1.0)).all():
        raise ValueError("correct must contain only 0/1 (or booleans)")
    return cf == 1.0


def _labels(labels) -> np.ndarray:
    lab = _as_1d("labels", labels)
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        labf = lab.astype(np.float64)
        if not np.all(labf == np.round(labf)):
            raise ValueError("labels must be integers")
        lab = labf
    lab = lab.astype(np.int64)
    if (lab < 0).any():
        raise ValueError("labels must be >= 0")
    return lab


def as_radius_grid(radii) -> np.ndarray:
    """``radii`` as a non-empty, finite float64 grid (ValueError otherwise)."""
    g = _as_1d("radii", radii, dtype=np.float64)
    if g.size == 0:
        raise ValueError("the radius grid is empty")
    if not np.isfinite(g).all():
        raise ValueError("the radius grid must be finite")
    return g


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-point arrays have different lengths: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("no points: the statistics of an empty result set are undefined")
    return n


# --------------------------------------------------------------------------------------------
# radius grid
# --------------------------------------------------------------------------------------------
def default_radius_grid(max_radius: float = 4.0, step: float = 0.25) -> np.ndarray:
    """``0, step, 2*step, ..., <= max_radius`` (Cohen et al.'s tables use step 0.25 or 0.5).

    The grid is built as ``k * step`` (not by repeated addition) so that e.g. 0.75 is exactly the
    float ``0.75`` and ``max_radius`` itself is included when it is a multiple of ``step``.
    """
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be a positive finite number, got {step}")
    if not (max_radius >= 0 and math.isfinite(max_radius)):
        raise ValueError(f"max_radius must be a finite number >= 0, got {max_radius}")
    k = int(math.floor(max_radius / step + 1e-9))
    return np.round(np.arange(k + 1, dtype=np.float64) * step, 12)


def radius_key(r: float) -> str:
    """The key of radius ``r`` in a summary's ``certified_accuracy`` dict (``f"{r:g}"``)."""
    return f"{float(r):g}"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def certified_counts(radius, correct, radii) -> np.ndarray:
    """Number of points with ``correct == 1`` and ``radius >= R`` for each R in ``radii``."""
    r = _radius(radius)
    c = _correct(correct)
    _same_length(radius=r, correct=c)
    g = as_radius_grid(radii)
    certified_radii = np.sort(r[c])
    # count of certified radii >= R  ==  total - (number strictly below R)
    return len(certified_radii) - np.searchsorted(certified_radii, g, side="left")


def certified_accuracy(radius, correct, radii) -> np.ndarray:
    """Certified accuracy at each radius of ``radii``: ``mean(correct & (radius >= R))``.

    Returns a float array of ``len(radii)``. Nonincreasing in R for a sorted grid. A correct
    point with radius 0 counts at R = 0 (and at no positive R).
    """
    n = len(_as_1d("radius", radius))
    counts = certified_counts(radius, correct, radii)
    return counts / float(n)


def average_certified_radius(radius, correct) -> float:
    """ACR: mean over all points of ``radius * correct`` (0 for wrong or abstained points)."""
    r = _radius(radius)
    c = _correct(correct)
    _same_length(radius=r, correct=c)
    if np.isinf(r[c]).any():
        return float("inf")
    return float(np.where(c, r, 0.0).mean())


def abstain_rate(predict) -> float:
    """Fraction of points whose smoothed prediction abstained (``predict == -1``)."""
    p = _as_1d("predict", predict)
    if p.size == 0:
        raise ValueError("no points: the abstain rate of an empty result set is undefined")
    return float(np.mean(p == ABSTAIN))


def class_certified_accuracy_matrix(labels, radius, correct, radii, num_classes: Optional[int] = None):
    """Per-class certified accuracy as a ``(num_classes, len(radii))`` array plus per-class counts.

    Row ``k`` is the certified accuracy over the points whose TRUE label is ``k``. Classes without
    points get a row of NaN (and count 0). ``num_classes`` defaults to ``max(labels) + 1``.
    Returns ``(matrix, counts)``.
    """
    lab = _labels(labels)
    r = _radius(radius)
    c = _correct(correct)
    _same_length(labels=lab, radius=r, correct=c)
    g = as_radius_grid(radii)
    max_label = int(lab.max())
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"label {max_label} is out of range for num_classes={num_classes}")
    counts = np.bincount(lab, minlength=num_classes)
    # O(n + C*G) memory: a certified point with b grid values <= its radius is certified at the
    # first b values of the sorted grid. Histogram (class, b), then count b > j by a reverse cumsum.
    order = np.argsort(g, kind="stable")
    G = len(g)
    b = np.searchsorted(g[order], r[c], side="right")  # in 0..G
    hist = np.bincount(lab[c] * (G + 1) + b, minlength=num_classes * (G + 1)).reshape(num_classes, G + 1)
    tail = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # tail[:, j] = #points with b >= j
    hits = np.empty((num_classes, G), dtype=np.float64)
    hits[:, order] = tail[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = hits / counts[:, None]
    matrix[counts == 0] = np.nan
    return matrix, counts


def class_certified_accuracy(
    labels, radius, correct, radii, num_classes: Optional[int] = None
) -> Dict[int, List[float]]:
    """Per-class certified-accuracy curves ``{class: [acc at R for R in radii]}``.

    Only classes that have at least one point are included (an empty class has no accuracy).
    """
    matrix, counts = class_certified_accuracy_matrix(labels, radius, correct, radii, num_classes)
    return {int(k): [float(v) for v in matrix[k]] for k in np.flatnonzero(counts)}


def summarize(
    labels,
    predict,
    radius,
    correct,
    sigma,
    radii,
    num_classes: Optional[int] = None,
    samples=None,
) -> dict:
    """All statistics of one certification run as plain JSON-serialisable Python values.

    Keys: ``num_points``, ``certified_accuracy`` (``{radius_key(R): acc}``), ``acr``,
    ``abstain_rate``, ``clean_accuracy`` (fraction of points predicted correctly by the smoothed
    classifier), ``mean_sigma``, ``class_certified_accuracy`` (``{str(class): {radius_key(R):
    acc}}``, classes with at least one point), ``class_num_points`` (``{str(class): count}``) and
    ``radii`` (the grid as a list); with ``samples`` (estimation samples per point) also
    ``total_samples`` and ``mean_samples``. Class keys are strings so that the dict equals its own
    JSON round trip.

    Raises ValueError on empty input, on mismatched lengths, and on an abstained point marked
    correct (that is a bug upstream).
    """
    lab = _labels(labels)
    pred = _as_1d("predict", predict)
    r = _radius(radius)
    c = _correct(correct)
    s = _as_1d("sigma", sigma, dtype=np.float64)
    n = _same_length(labels=lab, predict=pred, radius=r, correct=c, sigma=s)
    g = as_radius_grid(radii)
    keys = [radius_key(R) for R in g]
    if len(set(keys)) != len(keys):
        raise ValueError("the radius grid has values that are equal after formatting with '%g'")
    if (c & (pred == ABSTAIN)).any():
        raise ValueError("a point with predict == -1 (abstain) is marked correct")

    curve = certified_accuracy(r, c, g)
    matrix, counts = class_certified_accuracy_matrix(lab, r, c, g, num_classes)
    extra = {}
    if samples is not None:
        used = _as_1d("samples", samples, dtype=np.int64)
        _same_length(labels=lab, samples=used)
        extra = {"total_samples": int(used.sum()), "mean_samples": float(used.mean())}
    return {**extra,
        "num_points": int(n),
        "radii": [float(R) for R in g],
        "certified_accuracy": {k: float(a) for k, a in zip(keys, curve)},
        "acr": average_certified_radius(r, c),
        "abstain_rate": abstain_rate(pred),
        "clean_accuracy": float(c.mean()),
        "mean_sigma": float(s.mean()),
        "class_certified_accuracy": {
            str(int(k)): {key: float(a) for key, a in zip(keys, matrix[k])} for k in np.flatnonzero(counts)
        },
        "class_num_points": {str(int(k)): int(counts[k]) for k in np.flatnonzero(counts)},
    }


def summarize_columns(columns, radii, num_classes: Optional[int] = None) -> dict:
    """:func:`summarize` of certify rows given by column (``certify.tsv``'s names: label, predict,
    radius, correct, sigma and, if present, samples): the one way from rows to a summary."""
    return summarize(columns["label"], columns["predict"], columns["radius"], columns["correct"], columns["sigma"],
                     radii, num_classes, samples=columns.get("samples"))
