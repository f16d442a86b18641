"""A results table of certify runs, as a paper prints it: one row per run, ACR and certified accuracy at
fixed radii, the best value of each column in bold; Markdown or LaTeX (``python -m lightning_idrs table``).

Each run is a certify output folder (``summary.json`` + ``certify.tsv``). The numbers are computed from the
rows of the points the folder's summary selected (its split, ``skip`` and ``max``), so any radius can be
asked for, not only those of the folder's grid; for the radii of that grid they equal ``summary.json``'s.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lightning_idrs.arguments import UsageError, one_line
from lightning_idrs.jsonfiles import SUMMARY_NAME, read_summary
from lightning_idrs.reporting import DEFAULT_REPORT_RADII, run_name
from lightning_idrs.statistics import average_certified_radius, certified_accuracy, radius_key

__all__ = ["FORMATS", "CertifyRun", "read_run", "results_table"]

FORMATS = ("markdown", "latex")


class CertifyRun:
    """One certify folder: its summary, the rows of the points it selected, and a label."""

    def __init__(self, folder: Path, summary: dict, columns: dict):
        self.folder, self.summary, self.columns = folder, summary, columns
        self.label = run_name(summary.get("dataset"), {"sigma": summary.get("sigma")})

    def row(self, radii) -> list:
        radius, correct = self.columns["radius"], self.columns["correct"]
        return [average_certified_radius(radius, correct), *certified_accuracy(radius, correct, radii).tolist()]


def read_run(folder) -> CertifyRun:
    """A certify folder, or UsageError (one line) saying why it is not one."""
    from lightning_idrs.tsv_log import TSV_NAME, read_tsv

    folder = Path(folder)
    try:
        summary = read_summary(folder / SUMMARY_NAME)
        columns = read_tsv(folder / TSV_NAME)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
        raise UsageError(f"{folder} is not a finished certify folder ({reason}); name folders written by "
                         "`python -m lightning_idrs certify` (with summary.json and certify.tsv)") from None
    skip, most = int(summary.get("skip") or 1), summary.get("max")
    chosen = (columns["idx"] % skip == 0) & (columns["idx"] < (np.inf if most is None else int(most) * skip))
    columns = {name: values[chosen] for name, values in columns.items()}
    if len(columns["idx"]) == 0:
        raise UsageError(f"{folder}: certify.tsv holds no rows of the points its summary.json selected")
    return CertifyRun(folder, summary, columns)


def _cells(values: np.ndarray, digits: int, bold) -> list:
    """Formatted values; the best of the column (by what is printed) in bold."""
    text = [f"{v:.{digits}f}" for v in values]
    best = max(float(t) for t in text)
    return [bold(t) if float(t) == best and len(text) > 1 else t for t in text]


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(text: str) -> str:
    """``text`` as LaTeX prints it (a run's or folder's name may hold _ or &)."""
    return re.sub(r"[\\&%$#_{}~^]", lambda match: _LATEX[match.group()], text)


def results_table(folders: Sequence, radii: Optional[Sequence[float]] = None, fmt: str = "markdown",
                  digits: int = 3) -> str:
    """The table of the certify ``folders``: run, n, points, ACR and certified accuracy at ``radii`` (default:
    the report grid the runs share, else 0, 0.25, 0.5, 0.75, 1), best of each column in bold."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    runs = [read_run(folder) for folder in folders]
    if radii is None:
        shared = [set(map(radius_key, run.summary.get("report_radii") or ())) for run in runs]
        keys = set.intersection(*shared) if all(shared) else set()
        radii = sorted(float(k) for k in keys) or list(DEFAULT_REPORT_RADII)
    radii = sorted({radius_key(r): float(r) for r in radii}.values())
    labels = [run.label for run in runs]
    labels = [label if labels.count(label) == 1 else f"{label} ({run.folder.name})" for label, run in zip(labels, runs)]
    values = np.asarray([run.row(radii) for run in runs], dtype=np.float64)
    bold = (lambda t: f"**{t}**") if fmt == "markdown" else (lambda t: rf"\textbf{{{t}}}")
    columns = [_cells(values[:, j], digits, bold) for j in range(values.shape[1])]
    header = ["run", "n", "points", "ACR", *[f"R={radius_key(r)}" for r in radii]]
    body = [[label, str(run.summary.get("n")), str(len(run.columns["idx"])), *[column[i] for column in columns]]
            for i, (label, run) in enumerate(zip(labels, runs))]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"
    header = ["run", "$n$", "points", "ACR", *[f"$R={radius_key(r)}$" for r in radii]]
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\hline", " & ".join(header) + r" \\", r"\hline"]
    lines += [" & ".join([_latex(row[0]), *row[1:]]) + r" \\" for row in body]
    return "\n".join(lines + [r"\hline", r"\end{tabular}"]) + "\n"
