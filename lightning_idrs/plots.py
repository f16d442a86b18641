"""Certified-accuracy curves with matplotlib (Agg canvas; no display and no pyplot global state)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .metrics import certified_accuracy, default_radius_grid
from .results import read_tsv

__all__ = ["plot_certified_accuracy", "curve_from_tsv", "plot_tsvs"]

PathLike = Union[str, "os.PathLike[str]"]
Curve = Tuple[Sequence[float], Sequence[float]]


def curve_from_tsv(path: PathLike, radii: Optional[Sequence[float]] = None, step: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """``(radii, certified accuracy)`` of a certify.tsv.

    ``radii`` defaults to a grid of ``step`` from 0 to just past the largest certified radius.
    """
    cols = read_tsv(path)
    if len(cols["idx"]) == 0:
        raise ValueError(f"{path}: no rows to plot")
    if radii is None:
        finite = cols["radius"][np.isfinite(cols["radius"])]
        top = float(finite.max()) if finite.size else 0.0
        radii = default_radius_grid(np.ceil(top / step) * step + step, step)
    radii = np.asarray(radii, dtype=np.float64)
    return radii, certified_accuracy(cols["radius"], cols["correct"], radii)


def plot_certified_accuracy(
    curves: Mapping[str, Curve],
    path: PathLike,
    title: Optional[str] = None,
    *,
    dpi: int = 120,
    figsize: Tuple[float, float] = (6.0, 4.0),
) -> Path:
    """Plot one or several certified-accuracy curves ``{label: (radii, accuracy)}`` into a PNG at ``path``.

    Several curves overlay with a legend (e.g. ``{"RS": ..., "IDRS": ...}``). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no curves to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (radii, acc) in curves.items():
        radii = np.asarray(radii, dtype=np.float64)
        acc = np.asarray(acc, dtype=np.float64)
        if radii.shape != acc.shape or radii.ndim != 1:
            raise ValueError(f"curve {label!r}: radii and accuracy must be 1-D of equal length")
        ax.plot(radii, acc, label=str(label), linewidth=1.8)
    ax.set_xlabel("radius (l2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(left=0.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1 or next(iter(curves)):
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def plot_tsvs(
    tsvs: Mapping[str, PathLike],
    path: PathLike,
    radii: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
) -> Path:
    """Overlay the curves of several certify.tsv files ``{label: tsv path}`` on a common grid."""
    if radii is None:
        tops = []
        for p in tsvs.values():
            r = read_tsv(p)["radius"]
            r = r[np.isfinite(r)]
            tops.append(float(r.max()) if r.size else 0.0)
        step = 0.05
        radii = default_radius_grid(np.ceil(max(tops, default=0.0) / step) * step + step, step)
    curves = {label: curve_from_tsv(p, radii) for label, p in tsvs.items()}
    return plot_certified_accuracy(curves, path, title=title)
