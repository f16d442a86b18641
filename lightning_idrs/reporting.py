"""What a certification run reports, for the Callback and the ``certify`` command alike.

* :class:`ReportOptions` and :func:`radius_grid`: the radius grid of the curve, the table and the
  ``PREFIX/acc@R`` scalars (an explicit list, or 0, step, 2 step, ... up to a maximum, by default
  just past the largest radius found);
* :func:`scalars`: the scalar keys logged to every logger (``PREFIX/acc@R``, ``PREFIX/acr``, the
  class-wise fairness ``PREFIX/worst_class_acc@R`` and ``PREFIX/class_gap@R``, ...);
* :func:`plot_curves`: certified accuracy vs radius as a PNG (matplotlib's Agg canvas, no display);
* :func:`write_summary`: ``summary.json``, written atomically as strict JSON (:mod:`lightning_idrs.jsonfiles`);
* :func:`keep_run_files_under`: W&B's and matplotlib's own files go under the run's folder.

What goes to W&B (tables, charts, runs) is :mod:`lightning_idrs.wandb_logging`'s, built on these.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_idrs.arguments import NonNegativeFloat, PositiveFloat, UsageError, check, one_line
from lightning_idrs.jsonfiles import SUMMARY_NAME, fsync_dir, json_ready, read_summary, write_json_atomic, write_summary
from lightning_idrs.statistics import certified_accuracy, default_radius_grid, radius_key

__all__ = ["PLOT_NAME", "SUMMARY_NAME", "ReportOptions", "curve", "figure", "plot_curves", "radius_grid", "read_summary",
           "read_compare", "scalars", "fsync_dir", "json_ready", "keep_run_files_under", "write_json_atomic",
           "write_summary"]

Curve = Tuple[Sequence[float], Sequence[float]]
PathLike = Union[str, "os.PathLike[str]"]
PLOT_NAME = "certified_accuracy.png"
_MAX_GRID = 10_000


@dataclass
class ReportOptions:
    """The radius grid of the reported curve and scalars.

    Args:
        radii: explicit grid, e.g. [0.25, 0.5, 0.75, 1.0]; overrides radii_step / radii_max.
        radii_step: step of the grid 0, step, 2 step, ...
        radii_max: largest radius of the grid (None: just past the largest radius found).
    """

    radii: Optional[list[NonNegativeFloat]] = None
    radii_step: PositiveFloat = 0.05
    radii_max: Optional[NonNegativeFloat] = None

    def __post_init__(self):
        self.radii_step = check(PositiveFloat, self.radii_step, "radii_step")
        if self.radii_max is not None:
            self.radii_max = check(NonNegativeFloat, self.radii_max, "radii_max")
            if self.radii_max / self.radii_step > _MAX_GRID:
                raise ValueError(f"the radius grid (radii_max / radii_step) has over {_MAX_GRID:,} points")
        if self.radii is not None:
            self.radii = [check(NonNegativeFloat, r, "radii") for r in self.radii]
            if not self.radii:
                raise ValueError("radii must hold at least one radius (or be null)")


def radius_grid(options: ReportOptions, radius=None) -> np.ndarray:
    """The grid of ``options``; with no maximum, up to one step past the largest finite ``radius``."""
    if options.radii is not None:
        return np.asarray(sorted(set(options.radii)), dtype=np.float64)
    step, top = options.radii_step, options.radii_max
    if top is None:
        finite = np.asarray([] if radius is None else radius, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        top = math.ceil((float(finite.max()) if finite.size else 0.0) / step) * step + step
    return default_radius_grid(top, step)


def curve(summary: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(radii, certified accuracy) of a summary (``lightning_idrs.statistics.summarize``)."""
    radii = np.asarray(summary["radii"], dtype=np.float64)
    return radii, np.asarray([summary["certified_accuracy"][radius_key(r)] for r in radii])


def scalars(summary: Mapping, prefix: str = "certify") -> dict:
    """The scalars of a summary under ``prefix/``: certified accuracy on the grid, ACR, accuracy of the smoothed
    classifier, abstain rate, mean sigma, points and samples, and per grid radius the worst class's certified
    accuracy and the best-worst class gap (no per-class keys: the class-wise results are a table)."""
    out = {f"{prefix}/acc@{key}": acc for key, acc in summary["certified_accuracy"].items()}
    for key in ("acr", "abstain_rate", "clean_accuracy", "mean_sigma"):
        out[f"{prefix}/{key}"] = float(summary[key])
    out[f"{prefix}/num_points"] = float(summary["num_points"])
    for key in ("total_samples", "mean_samples"):  # estimation samples drawn (fewer when sequential)
        if key in summary:
            out[f"{prefix}/{key}"] = float(summary[key])
    by_class = list(summary["class_certified_accuracy"].values())
    for key in summary["certified_accuracy"]:
        accuracy = [class_curve[key] for class_curve in by_class if key in class_curve]
        if accuracy:
            out[f"{prefix}/worst_class_acc@{key}"] = float(min(accuracy))
            out[f"{prefix}/class_gap@{key}"] = float(max(accuracy) - min(accuracy))
    return out


def curve_from_tsv_columns(columns: Mapping, radii) -> np.ndarray:
    """Certified accuracy on ``radii`` of TSV columns (``lightning_idrs.tsv_log.read_tsv``)."""
    if len(columns["idx"]) == 0:
        raise ValueError("no rows to plot")
    return certified_accuracy(columns["radius"], columns["correct"], radii)


def read_compare(path: Optional[str]):
    """(label, columns) of ``--certify.compare``'s certify.tsv (None without one), read before any point is
    certified; UsageError if it is not a certify.tsv with rows."""
    if path is None:
        return None
    from lightning_idrs.tsv_log import read_tsv

    try:
        columns = read_tsv(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
        reason = reason.split(". This is not a certify.tsv")[0].replace(f"{path}: ", "")
        raise UsageError(f"--certify.compare {path} is not a certify.tsv of this version ({reason}); name the "
                         "certify.tsv of another certify run") from None
    if len(columns["idx"]) == 0:
        raise UsageError(f"--certify.compare {path}: the file holds no rows")
    try:
        label = read_summary(Path(path).parent / SUMMARY_NAME)["sigma_label"]
    except (OSError, ValueError, KeyError, TypeError):
        label = Path(path).resolve().parent.name or "compare"
    return label, columns


def figure(title: Optional[str], xlabel: str, ylabel: str, *, dpi: int = 120,
           figsize: Tuple[float, float] = (6.0, 4.0)):
    """(figure, axes) on matplotlib's Agg canvas (no display, no pyplot state), titled, labelled, gridded:
    the one figure set-up of every plot the package writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_curves(curves: Mapping[str, Curve], path, title: Optional[str] = None, *, dpi: int = 120,
                figsize: Tuple[float, float] = (6.0, 4.0)) -> Path:
    """One or several certified-accuracy curves ``{label: (radii, accuracy)}`` as a PNG at ``path``."""
    if not curves:
        raise ValueError("no curves to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = figure(title, "radius (l2)", "certified accuracy", dpi=dpi, figsize=figsize)
    for label, (radii, acc) in curves.items():
        radii, acc = np.asarray(radii, dtype=np.float64), np.asarray(acc, dtype=np.float64)
        if radii.shape != acc.shape or radii.ndim != 1:
            raise ValueError(f"curve {label!r}: radii and accuracy must be 1-D of equal length")
        ax.plot(radii, acc, label=str(label), linewidth=1.8)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(left=0.0)
    if len(curves) > 1 or next(iter(curves)):
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


# ------------------------------------------------------------------------------ summary.json
_WANDB_FOLDERS = {"WANDB_CACHE_DIR": ".cache", "WANDB_CONFIG_DIR": ".config", "WANDB_DATA_DIR": ".data",
                  "WANDB_ARTIFACT_DIR": ".artifacts"}
_SET_BY_US: dict = {}


def keep_run_files_under(root, wandb: bool = True) -> Path:
    """Point the files a run writes outside its output at ``root``: matplotlib's font cache
    (``root/.matplotlib``) and, with ``wandb``, W&B's own logs, cache, settings and artifact staging
    (``root/wandb/...``), instead of the home folder. A variable the user set stays as it is.
    Returns ``root``; OSError if it cannot be written."""
    root = Path(root)
    places = {"MPLCONFIGDIR": root / ".matplotlib"}
    if wandb:
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        places.update({variable: root / "wandb" / name for variable, name in _WANDB_FOLDERS.items()})
    for variable, path in places.items():
        current = os.environ.get(variable)
        if current is None or current == _SET_BY_US.get(variable):
            os.environ[variable] = _SET_BY_US[variable] = str(path.resolve())
    return root
