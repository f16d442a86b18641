"""What a certification run reports, for the Callback and the ``certify`` command alike.

* :class:`ReportOptions`: two grids of radii. The *report grid* (:func:`report_radii`: ``radii``, by
  default the data set's ``report_radii``) is fixed before anything is certified: it names the scalar
  keys (``PREFIX/acc_R0p25``, ...), so every run of a data set logs the same, bounded set. The *curve
  grid* (:func:`radius_grid`: 0, step, 2 step, ... up to ``radii_max``, by default just past the
  largest radius found, plus the report grid) is as fine as wanted: it lives in the curve table,
  the PNG and ``summary.json``;
* :func:`scalars`: the scalar keys logged to every logger (``PREFIX/acc_R0p25``, ``PREFIX/acr``, the
  class-wise fairness ``PREFIX/worst_class_acc_R0p25`` and ``PREFIX/class_gap_R0p25``, ...);
* :func:`run_name`: what a run is, as its name (``digits-IDRS-sb0.25-r0.2-seed0``);
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

__all__ = ["DEFAULT_REPORT_RADII", "PLOT_NAME", "SUMMARY_NAME", "ReportOptions", "curve", "decision_grid", "figure",
           "merge_grids", "plot_curves", "radius_grid", "radius_name", "read_compare", "read_summary", "report_radii",
           "run_name", "scalars", "sigma_kind", "fsync_dir", "json_ready", "keep_run_files_under", "write_json_atomic",
           "write_summary"]

Curve = Tuple[Sequence[float], Sequence[float]]
PathLike = Union[str, "os.PathLike[str]"]
PLOT_NAME = "certified_accuracy.png"
_MAX_GRID = 10_000
#: The report grid of a data set that declares none (``IDRSDataModule.report_radii``): 0 and Cohen et
#: al.'s CIFAR-10 table radii. Every packaged data set's grid contains it (the dashboard's panels use it).
DEFAULT_REPORT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ReportOptions:
    """The radius grids: the report grid of the scalars, and the finer grid of the curve.

    Args:
        radii: the report grid, e.g. [0, 0.25, 0.5, 0.75, 1.0]: the scalar keys (acc_R0p25, ...), the
            radii printed, and the grid that sequential certification decides on (None: the data set's
            ``report_radii``). The curve holds these radii too.
        radii_step: step of the curve's grid 0, step, 2 step, ...
        radii_max: largest radius of the curve's grid (None: just past the largest radius found).
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


def report_radii(options: ReportOptions, default=DEFAULT_REPORT_RADII) -> np.ndarray:
    """The report grid: ``options.radii``, else ``default`` (the data set's ``report_radii``)."""
    radii = default if options.radii is None else options.radii
    return np.asarray(sorted({radius_key(r): float(r) for r in radii}.values()), dtype=np.float64)


def radius_grid(options: ReportOptions, radius=None, report=()) -> np.ndarray:
    """The curve's grid: 0, step, ... up to ``radii_max`` (with no maximum: one step past the largest finite
    ``radius``), with the report radii ``report`` added."""
    step, top = options.radii_step, options.radii_max
    if top is None:
        finite = np.asarray([] if radius is None else radius, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        top = math.ceil((float(finite.max()) if finite.size else 0.0) / step) * step + step
    return merge_grids(default_radius_grid(top, step), report)


def merge_grids(*grids) -> np.ndarray:
    """The sorted union of radius grids, one radius per key of summary.json (``f"{r:g}"``; later grids win)."""
    merged = {radius_key(r): float(r) for grid in grids for r in grid}
    return np.asarray(sorted(merged.values()), dtype=np.float64)


def decision_grid(options: ReportOptions) -> np.ndarray:
    """The grid sequential certification decides on: ``options.radii``, else 0, step, ... up to ``radii_max``."""
    return report_radii(options) if options.radii is not None else radius_grid(options)


def radius_name(radius: float) -> str:
    """Radius ``radius`` in a metric key: ``R0p25`` for 0.25, ``R1`` for 1 (no '.': W&B reads it as nesting)."""
    return "R" + radius_key(radius).replace(".", "p").replace("-", "m")


def curve(summary: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(radii, certified accuracy) of a summary (``lightning_idrs.statistics.summarize``)."""
    radii = np.asarray(summary["radii"], dtype=np.float64)
    return radii, np.asarray([summary["certified_accuracy"][radius_key(r)] for r in radii])


def scalars(summary: Mapping, prefix: str = "certify") -> dict:
    """The scalars of a summary under ``prefix/``, a fixed set for a fixed report grid (``summary["report_radii"]``,
    else every radius of the curve): certified accuracy ``acc_R0p25``, the worst class's ``worst_class_acc_R0p25``
    and the best-worst class gap ``class_gap_R0p25`` per report radius; ACR, accuracy of the smoothed
    classifier, abstain rate, mean sigma, points and samples (no per-class keys: the class-wise results are a
    table, the finer curve is the curve table)."""
    radii = summary.get("report_radii", summary["radii"])
    keys = {radius_name(r): radius_key(r) for r in radii}
    out = {f"{prefix}/acc_{name}": float(summary["certified_accuracy"][key]) for name, key in keys.items()}
    for key in ("acr", "abstain_rate", "clean_accuracy", "mean_sigma"):
        out[f"{prefix}/{key}"] = float(summary[key])
    out[f"{prefix}/num_points"] = float(summary["num_points"])
    for key in ("total_samples", "mean_samples"):  # estimation samples drawn (fewer when sequential)
        if key in summary:
            out[f"{prefix}/{key}"] = float(summary[key])
    by_class = list(summary["class_certified_accuracy"].values())
    for name, key in keys.items():
        accuracy = [class_curve[key] for class_curve in by_class if key in class_curve]
        if accuracy:
            out[f"{prefix}/worst_class_acc_{name}"] = float(min(accuracy))
            out[f"{prefix}/class_gap_{name}"] = float(max(accuracy) - min(accuracy))
    return out


def sigma_kind(class_path: Optional[str]) -> str:
    """RS for a constant sigma, IDRS for the package's input-dependent ones, else the user's class name."""
    name = str(class_path or "").rsplit(".", 1)[-1]
    if name == "ConstantSigma":
        return "RS"
    return "IDRS" if str(class_path).startswith("lightning_idrs.") else (name or "sigma")


def run_name(dataset: Optional[str], model: Optional[Mapping], seed=None) -> str:
    """What a run is, as its name: data set, kind of sigma, sigma_b, r, the objective unless it is the default,
    and the seed, e.g. ``digits-IDRS-sb0.25-r0.2-seed0`` or ``mnist5k-RS-sb0.5-consistencyregularization-seed1``.
    ``model``: the model's config or hyper-parameters (``sigma`` and ``objective`` as class_path / init_args)."""
    model = model or {}
    sigma = model.get("sigma") if isinstance(model.get("sigma"), Mapping) else {}
    args, kind = dict(sigma.get("init_args") or {}), sigma_kind(sigma.get("class_path"))
    parts = [str(dataset or "data"), kind]
    if args.get("sigma_base") is not None:
        parts.append(f"sb{float(args['sigma_base']):g}")
    r = args.get("semi_elasticity", args.get("r"))
    if r is not None and kind != "RS":
        parts.append(f"r{float(r):g}")
    objective = model.get("objective") if isinstance(model.get("objective"), Mapping) else {}
    name = str(objective.get("class_path") or "").rsplit(".", 1)[-1]
    if name and name != "GaussianAugmentation":
        parts.append(name.lower())
    if seed is not None and not isinstance(seed, bool):
        parts.append(f"seed{seed}")
    return "-".join(parts)


def read_compare(paths) -> list:
    """``[(label, columns)]`` of the runs that ``--certify.compare`` names (a certify.tsv or its folder, one or a
    list), read before any point is certified; a label is the run's sigma (``summary.json``), with the folder's
    name added where two would be equal. UsageError (one line) for a file that is not a certify.tsv."""
    from lightning_idrs.arguments import UsageError, one_line
    from lightning_idrs.tsv_log import TSV_NAME, read_tsv

    if paths is None:
        return []
    found = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        tsv = Path(path) / TSV_NAME if Path(path).is_dir() else Path(path)
        try:
            if not tsv.is_file() and Path(path).is_dir():
                raise ValueError(f"the folder holds no {TSV_NAME}")
            columns = read_tsv(tsv)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
            reason = reason.split(". This is not a certify.tsv")[0].replace(f"{tsv}: ", "")
            raise UsageError(f"--certify.compare {path} is not a certify.tsv of this version ({reason}); name the "
                             "certify.tsv (or the folder) of another certify run") from None
        if len(columns["idx"]) == 0:
            raise UsageError(f"--certify.compare {path}: the file holds no rows")
        try:
            label = str(read_summary(tsv.parent / SUMMARY_NAME)["sigma_label"])
        except (OSError, ValueError, KeyError, TypeError):
            label = tsv.resolve().parent.name or "compare"
        found.append((label, columns, tsv.resolve().parent.name))
    labels = [label for label, _, _ in found]
    labels = [label if labels.count(label) == 1 else f"{label} ({folder})" for label, _, folder in found]
    labels = [label if labels.count(label) == 1 else f"{label} [{i + 1}]" for i, label in enumerate(labels)]
    return [(label, columns) for label, (_, columns, _) in zip(labels, found)]


def curve_from_tsv_columns(columns: Mapping, radii) -> np.ndarray:
    """Certified accuracy on ``radii`` of TSV columns (``lightning_idrs.tsv_log.read_tsv``)."""
    if len(columns["idx"]) == 0:
        raise ValueError("no rows to plot")
    return certified_accuracy(columns["radius"], columns["correct"], radii)


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
