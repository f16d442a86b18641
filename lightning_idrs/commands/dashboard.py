"""``python -m lightning_idrs dashboard --project P``: a W&B saved workspace for a project of our runs.

    python -m lightning_idrs dashboard --project lightning-idrs [--entity E] [--name N]
        [--radii 0.25,0.5,0.75,1.0] [--out dashboard.json] [--save true]

Built with W&B's maintained package for workspaces and reports (``wandb-workspaces``, the ``[wandb]``
extra). Offline (the default) it writes the workspace's spec as JSON and needs no account or network;
``--save true`` saves it to the W&B server (needs ``wandb login`` and ``--entity``). Sections:

* **Certified accuracy (certify)**: certified accuracy vs radius, one line per run (RS and IDRS runs on
  one data set overlay), ACR / smoothed accuracy / abstain rate per run grouped by the sigma's class,
  the ``--certify.compare`` overlays, the PNGs;
* **Class-wise (certify)**: certified accuracy vs radius per class, worst-class accuracy and the
  best-worst gap at the grid radii;
* **During training (monitor)**: the Callback's curve for every epoch, ACR and accuracy over epochs,
  the fairness scalars over epochs, the sigma(x) histogram, training loss vs step, validation vs epoch.

A W&B *report* of the same panels would need the server already to build (the package looks the
project up when it converts a report), so the offline spec is a workspace.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from lightning_idrs.statistics import radius_key
from lightning_idrs.arguments import NonNegativeFloat, UsageError, one_line
from lightning_idrs.wandb_logging import MONITOR, REPORT

RADII = (0.25, 0.5, 0.75, 1.0)
SCALARS = ("acr", "clean_accuracy", "abstain_rate", "mean_sigma")


def _line(ws_reports, table: str, stroke: str, title: str):
    """A custom line chart of a logged table (radius vs certified accuracy), one line per ``stroke``."""
    return ws_reports.CustomChart(query={"summaryTable": {"tableKey": table}}, chart_name="wandb/line/v0",
                                  chart_fields={"x": "radius", "y": "certified_accuracy", "stroke": stroke},
                                  chart_strings={"title": title})


def build_workspace(project: str, entity: str = "", name: str = "lightning_idrs: certified robustness",
                    radii=RADII):
    """The workspace (``wandb_workspaces.workspaces.Workspace``): every panel names a key our runs log."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    keys = [radius_key(r) for r in radii]
    sigma_class = wr.Config("sigma.class_path")  # certify runs: RS and IDRS side by side
    certify = ws.Section(name="Certified accuracy (certify)", is_open=True, panels=[
        _line(wr, f"{REPORT}/curve_table", "name", "certified accuracy vs radius, one line per run"),
        wr.BarPlot(title="ACR, smoothed accuracy, abstain rate, mean sigma by sigma",
                   metrics=[f"{REPORT}/{k}" for k in SCALARS], groupby=sigma_class),
        wr.BarPlot(title="certified accuracy at the grid radii", metrics=[f"{REPORT}/acc@{k}" for k in keys],
                   groupby=sigma_class),
        _line(wr, f"{REPORT}/compare_table", "run", "--certify.compare overlays"),
        wr.MediaBrowser(title="certified accuracy (PNG)", media_keys=[f"{REPORT}/plot"]),
    ])
    classes = ws.Section(name="Class-wise (certify)", is_open=True, panels=[
        _line(wr, f"{REPORT}/class_table", "class", "certified accuracy by class"),
        wr.BarPlot(title="worst-class certified accuracy", metrics=[f"{REPORT}/worst_class_acc@{k}" for k in keys],
                   groupby=sigma_class),
        wr.BarPlot(title="best-worst class gap", metrics=[f"{REPORT}/class_gap@{k}" for k in keys],
                   groupby=sigma_class),
    ])
    training = ws.Section(name="During training (monitor)", is_open=True, panels=[
        _line(wr, f"{MONITOR}/curve_table", "epoch", "certified accuracy vs radius, one line per epoch"),
        wr.LinePlot(title="ACR and smoothed accuracy over epochs", x="epoch",
                    y=[f"{MONITOR}/acr", f"{MONITOR}/clean_accuracy"]),
        wr.LinePlot(title="certified accuracy over epochs", x="epoch", y=[f"{MONITOR}/acc@{k}" for k in keys]),
        wr.LinePlot(title="worst-class accuracy over epochs", x="epoch",
                    y=[f"{MONITOR}/worst_class_acc@{k}" for k in keys]),
        wr.LinePlot(title="sigma(x) on the certified points", x="epoch", y=[f"{MONITOR}/sigma"]),
        wr.LinePlot(title="training", x="trainer/global_step", y=["train/loss", "train/noisy_acc"]),
        wr.LinePlot(title="validation", x="epoch", y=["val/clean_acc", "val/noisy_acc"]),
        _line(wr, f"{MONITOR}/class_table", "class", "certified accuracy by class (last epoch)"),
    ])
    return ws.Workspace(entity=entity, project=project, name=name, sections=[certify, classes, training],
                        settings=ws.WorkspaceSettings(x_axis="epoch"),
                        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group")]))


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs dashboard", default_env=False, exit_on_error=False,
                            description="Build a W&B workspace of certified-robustness panels for a project.")
    parser.add_argument("--project", type=str, default="lightning-idrs", help="W&B project of the runs.")
    parser.add_argument("--entity", type=Optional[str], default=None, help="W&B entity (needed with --save).")
    parser.add_argument("--name", type=str, default="lightning_idrs: certified robustness", help="workspace name.")
    parser.add_argument("--radii", type=list[NonNegativeFloat], default=list(RADII),
                        help="radii of the acc@R / worst-class / gap panels, e.g. [0.25,0.5].")
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
        workspace = build_workspace(cfg.project, cfg.entity or "", cfg.name, cfg.radii)
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
