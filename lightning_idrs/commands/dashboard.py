"""``python -m lightning_idrs dashboard --project P``: a W&B saved workspace for a project of our runs.

    python -m lightning_idrs dashboard --project lightning-idrs [--entity E] [--name N] [--dataset digits]
        [--radii 0,0.25,0.5,0.75,1] [--out dashboard.json] [--save true]

Built with W&B's maintained package for workspaces and reports (``wandb-workspaces``, the ``[wandb]``
extra). Offline (the default) it writes the workspace's spec as JSON and needs no account or network;
``--save true`` saves it to the W&B server (needs ``wandb login`` and ``--entity``). Every panel names a
key every run logs whatever radii it reaches: the scalars are on the report grid (``--radii``, by default
the radii every packaged data set reports, :data:`RADII`), the finer curves are tables. Runs are grouped
(and coloured) by their group, one fit with its certify/test runs; bars by the kind of sigma (RS, IDRS).
With ``--dataset D`` the workspace shows the runs tagged D only. Sections:

* **RS vs IDRS (certify)**: certified accuracy vs radius, one line per certify run (named
  ``certify-DATASET-KIND-...``), ACR / smoothed accuracy / abstain rate / mean sigma and certified accuracy
  at the grid radii by kind of sigma, the ``--certify.compare`` overlays, the PNGs;
* **Class-wise (certify)**: certified accuracy vs radius per class (one line per run and class),
  worst-class accuracy and the best-worst gap at the grid radii;
* **During training (monitor)**: the Callback's curve for every epoch (one line per run and epoch), ACR
  and accuracy over epochs, the fairness scalars over epochs, the sigma(x) histogram, training loss vs
  step, validation vs epoch.

A W&B *report* of the same panels would need the server already to build (the package looks the
project up when it converts a report), so the offline spec is a workspace.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from lightning_idrs.arguments import NonNegativeFloat, UsageError, one_line
from lightning_idrs.reporting import DEFAULT_REPORT_RADII, radius_name
from lightning_idrs.wandb_logging import MONITOR, REPORT, STEP

RADII = DEFAULT_REPORT_RADII  # in every packaged data set's report grid (tests/test_wandb.py checks it)
SCALARS = ("acr", "clean_accuracy", "abstain_rate", "mean_sigma")


def _line(ws_reports, table: str, stroke: str, title: str):
    """A custom line chart of a logged table (radius vs certified accuracy), one line per ``stroke``."""
    return ws_reports.CustomChart(query={"summaryTable": {"tableKey": table}}, chart_name="wandb/line/v0",
                                  chart_fields={"x": "radius", "y": "certified_accuracy", "stroke": stroke},
                                  chart_strings={"title": title})


def build_workspace(project: str, entity: str = "", name: str = "lightning_idrs: certified robustness",
                    radii=RADII, dataset: Optional[str] = None):
    """The workspace (``wandb_workspaces.workspaces.Workspace``): every panel names a key our runs log."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    keys = [radius_name(r) for r in radii]
    kind = wr.Config("sigma.kind")  # certify runs: RS and IDRS side by side
    on = f" on {dataset}" if dataset else ""
    certify = ws.Section(name=f"RS vs IDRS{on} (certify)", is_open=True, panels=[
        _line(wr, f"{REPORT}/curve_table", "line", f"certified accuracy vs radius{on}, one line per run"),
        wr.BarPlot(title="ACR, smoothed accuracy, abstain rate, mean sigma by kind of sigma",
                   metrics=[f"{REPORT}/{k}" for k in SCALARS], groupby=kind),
        wr.BarPlot(title="certified accuracy at the grid radii by kind of sigma",
                   metrics=[f"{REPORT}/acc_{k}" for k in keys], groupby=kind),
        _line(wr, f"{REPORT}/compare_table", "run", "--certify.compare overlays"),
        wr.MediaBrowser(title="certified accuracy (PNG)", media_keys=[f"{REPORT}/plot"]),
    ])
    classes = ws.Section(name="Class-wise (certify)", is_open=True, panels=[
        _line(wr, f"{REPORT}/class_table", "line", "certified accuracy by class, one line per run and class"),
        wr.BarPlot(title="worst-class certified accuracy", metrics=[f"{REPORT}/worst_class_acc_{k}" for k in keys],
                   groupby=kind),
        wr.BarPlot(title="best-worst class gap", metrics=[f"{REPORT}/class_gap_{k}" for k in keys], groupby=kind),
    ])
    training = ws.Section(name="During training (monitor)", is_open=True, panels=[
        _line(wr, f"{MONITOR}/curve_table", "line", "certified accuracy vs radius, one line per run and epoch"),
        wr.LinePlot(title="ACR and smoothed accuracy over epochs", x="epoch",
                    y=[f"{MONITOR}/acr", f"{MONITOR}/clean_accuracy"]),
        wr.LinePlot(title="certified accuracy over epochs", x="epoch", y=[f"{MONITOR}/acc_{k}" for k in keys]),
        wr.LinePlot(title="worst-class accuracy over epochs", x="epoch",
                    y=[f"{MONITOR}/worst_class_acc_{k}" for k in keys]),
        wr.LinePlot(title="sigma(x) on the certified points", x="epoch", y=[f"{MONITOR}/sigma"]),
        wr.LinePlot(title="training", x=STEP, y=["train/loss", "train/noisy_acc"]),
        wr.LinePlot(title="validation", x="epoch", y=["val/clean_acc", "val/noisy_acc"]),
        _line(wr, f"{MONITOR}/class_table", "line", "certified accuracy by class (last epoch), one line per run"),
    ])
    runset = ws.RunsetSettings(groupby=[ws.Metric("Group")],
                               **({"filters": ws.And(ws.Tags().isin([dataset]))} if dataset else {}))
    return ws.Workspace(entity=entity, project=project, name=name, sections=[certify, classes, training],
                        settings=ws.WorkspaceSettings(x_axis="epoch"), runset_settings=runset)


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs dashboard", default_env=False, exit_on_error=False,
                            description="Build a W&B workspace of certified-robustness panels for a project.")
    parser.add_argument("--project", type=str, default="lightning-idrs", help="W&B project of the runs.")
    parser.add_argument("--entity", type=Optional[str], default=None, help="W&B entity (needed with --save).")
    parser.add_argument("--name", type=str, default="lightning_idrs: certified robustness", help="workspace name.")
    parser.add_argument("--radii", type=list[NonNegativeFloat], default=list(RADII),
                        help="radii of the acc_R / worst-class / gap panels, e.g. [0.25,0.5]: radii of the runs' report "
                        "grid (default: those every packaged data set reports).")
    parser.add_argument("--dataset", type=Optional[str], default=None,
                        help="show only the runs of this data set (their tag, e.g. digits): RS vs IDRS on it.")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="where to write the spec (default: dashboard_<project>.json).")
    parser.add_argument("--save", type=bool, default=False, help="save the workspace to the W&B server.")
    return parser


def main(argv=None) -> int:
    """``python -m lightning_idrs dashboard``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(run, sys.argv[1:] if argv is None else list(argv))


def run(argv) -> int:
    cfg = build_parser().parse_args(list(argv))
    if cfg.save and not cfg.entity:
        raise UsageError("--save true needs --entity (your W&B user or team)")
    try:
        workspace = build_workspace(cfg.project, cfg.entity or "", cfg.name, cfg.radii, cfg.dataset)
    except ImportError:
        raise UsageError("the dashboard needs wandb-workspaces: pip install 'lightning_idrs[wandb]'") from None
    out = Path(cfg.out or f"dashboard_{cfg.project}.json")
    spec = workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)  # what save() sends
    try:
        out.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write ({error.strerror or error}); choose another file") from None
    print(f"wrote the workspace spec to {out}", flush=True)
    if cfg.save:
        try:
            workspace.save()
        except Exception as error:  # no login, no network, unknown entity: the spec stays on disk
            raise UsageError(f"cannot save the workspace to W&B: {one_line(error)[:300]}; run `wandb login`, "
                             "check --entity / --project, or open the spec later") from None
        print(f"saved the workspace: {workspace.url}", flush=True)
    return 0
