"""Everything lightning_idrs sends to Weights & Biases; no other module of the package imports ``wandb``.

* :class:`WandbLogger`: Lightning's logger, quiet, with checkpoints logged as a model artifact also
  offline (staged under the run folder, uploaded by ``wandb sync``);
* :class:`WandbConfigCallback`: the full resolved LightningCLI config (nested as in ``config.yaml``),
  the metric axes, and the run's lineage (id, group) written into every checkpoint;
* :func:`log_certification`: one certification (the Callback's or ``certify``'s) at one step: the
  headline scalars, the growing curve table (one line per epoch), the class-wise table and chart, the
  sigma(x) histogram and the PNG;
* :func:`log_certify_run`: the ``certify`` job's own run (same run id on a rerun into the same folder);
* :func:`wandb_offline` / :func:`wandb_online_problem`: online only when it works now.

Keys: the Callback's monitoring results live under ``monitor/``, the ``certify`` command's reported
results under ``certify/`` (:data:`MONITOR`, :data:`REPORT`); both have the same names below them.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger

from lightning_idrs.reporting import curve, keep_run_files_under, read_summary, scalars, write_json_atomic

__all__ = ["MONITOR", "REPORT", "WandbConfigCallback", "WandbLogger", "default_group", "default_tags",
           "log_certification", "log_certify_run", "sigma_kind", "wandb_offline", "wandb_online_problem"]

MONITOR, REPORT = "monitor", "certify"
CURVE_COLUMNS = ["epoch", "radius", "certified_accuracy", "split", "n", "num_points"]
CLASS_COLUMNS = ["epoch", "class", "radius", "certified_accuracy", "points"]
LINEAGE_KEY = "wandb"  # the checkpoint entry naming the fit run (id, project, entity, group)
RUN_FILE = "wandb_run.json"  # certify's run id, kept in its output folder


# ------------------------------------------------------------------------------ names, tags, groups
def sigma_kind(class_path: Optional[str]) -> str:
    """RS for a constant sigma, IDRS for the package's input-dependent ones, else the user's class name."""
    name = str(class_path or "").rsplit(".", 1)[-1]
    if name == "ConstantSigma":
        return "RS"
    return "IDRS" if str(class_path).startswith("lightning_idrs.") else (name or "sigma")


def default_tags(dataset: Optional[str], sigma_class: Optional[str]) -> list:
    return [tag for tag in (dataset, sigma_kind(sigma_class)) if tag]


def default_group(dataset: Optional[str], sigma_class: Optional[str], run_id: str) -> str:
    """The group of a fit run; the certify, test and validate runs of its checkpoints join it."""
    return "-".join(default_tags(dataset, sigma_class) + [run_id])


def _new_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def _run_line(run) -> str:
    """Where a run's files are (relative to the current folder when inside it), and how to upload them."""
    folder = Path(run.dir).parent
    with contextlib.suppress(ValueError):
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    if run.settings._offline:
        return f"W&B: offline run {run.id} in {folder}; upload it with: wandb sync {folder}"
    return f"W&B: run {run.id} at {run.url} (files in {folder})"


# ------------------------------------------------------------------------------ fit / validate / test
class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, quiet, with ``log_model`` also offline (the model artifact is staged
    under the run folder and uploaded by ``wandb sync``), without the deprecated ``anonymous`` setting.

    Args:
        job_type, group, tags, notes: the W&B run's; see ``wandb.init``.
    """

    def __init__(self, *args, offline: bool = False, log_model: Any = False, job_type: Optional[str] = None,
                 group: Optional[str] = None, tags: Optional[list[str]] = None, notes: Optional[str] = None,
                 **kwargs):
        import wandb

        if kwargs.get("settings") is None:  # LightningCLI passes every wandb.init argument, None when not set
            kwargs["settings"] = wandb.Settings(silent=True, init_timeout=30)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        extra = {k: v for k, v in dict(job_type=job_type, group=group, tags=tags, notes=notes).items() if v is not None}
        super().__init__(*args, offline=False, log_model=log_model, **extra, **kwargs)
        self._offline = offline  # Lightning refuses log_model offline; W&B stages the artifact for `wandb sync`
        self._wandb_init.pop("anonymous", None)
        if offline:  # said to wandb.init itself: Lightning's WANDB_MODE is not read once wandb's settings exist
            self._wandb_init["mode"] = "offline"  # (e.g. after the online probe verified a key and fell back)


def _wandb_runs(trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, _LightningWandbLogger)]


def finish_runs(trainer, failed: bool = False) -> None:
    """Finish the W&B runs that ``trainer``'s loggers started (exit code 1 if ``failed``). Lightning leaves
    them open for the rest of the process, and its WandbLogger reuses an open run: a second ``fit`` in the
    same process (a notebook, a sweep calling ``main``) would log into the first one's run and folder."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, _LightningWandbLogger) else None
        if run is not None and hasattr(run, "finish"):  # rank 0 only; other ranks hold no run
            run.finish(exit_code=1 if failed else 0)


class WandbConfigCallback(SaveConfigCallback):
    """``config.yaml`` as LightningCLI writes it, plus for every W&B logger: the full resolved config
    (nested: trainer, model with the sigma's class_path/init_args and the optimizer, data, callbacks,
    seed_everything), the metric axes, and the run's lineage in every checkpoint."""

    def save_config(self, trainer, pl_module, stage) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_check=True))
        self.resolved = {k: v for k, v in config.items() if k not in ("config", "ckpt_path")}
        for run in _wandb_runs(trainer):
            run.config.update(self.resolved, allow_val_change=True)
            define_axes(run)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger) and trainer.is_global_zero:
                run = logger.experiment
                checkpoint[LINEAGE_KEY] = {"run_id": run.id, "project": run.project, "entity": run.entity or None,
                                           "group": run.group or None, "artifact": f"model-{run.id}",
                                           "config": getattr(self, "resolved", None)}  # certify logs it

    def on_fit_end(self, trainer, pl_module) -> None:
        self._announce(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._announce(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._announce(trainer)

    @staticmethod
    def _announce(trainer) -> None:
        if trainer.is_global_zero:
            for run in _wandb_runs(trainer):
                print(_run_line(run), flush=True)


def define_axes(run) -> None:
    """Monitoring and reported certifications against ``epoch``, training metrics against the step."""
    run.define_metric("epoch")
    for prefix in (MONITOR, REPORT, "val"):
        run.define_metric(f"{prefix}/*", step_metric="epoch")
    run.define_metric("train/*", step_metric="trainer/global_step")


def prepare_logger(init_args, *, subcommand: str, dataset: Optional[str], sigma_class: Optional[str],
                   lineage: Optional[Mapping] = None) -> str:
    """Defaults of a W&B logger's arguments for ``subcommand``: our logger class, job type, tags,
    group (fit: a new one; validate/test: the checkpoint's fit run's), model artifacts in fit.
    Returns the class path to use."""
    init_args["job_type"] = init_args.get("job_type") or subcommand
    init_args["tags"] = init_args.get("tags") or default_tags(dataset, sigma_class)
    if subcommand == "fit":
        if init_args.get("log_model") in (None, False):
            init_args["log_model"] = True
        run_id = init_args.get("id") or init_args.get("version") or _new_id()
        init_args["id"] = run_id
        init_args["group"] = init_args.get("group") or default_group(dataset, sigma_class, run_id)
    elif not init_args.get("group") and lineage and lineage.get("group"):
        init_args["group"] = lineage["group"]
    return f"{__name__}.WandbLogger"


# ------------------------------------------------------------------------------ one certification
def _curve_rows(summary: Mapping, epoch: int, split: str, n: int) -> list:
    radii, accuracy = curve(summary)
    return [[epoch, float(r), float(a), split, int(n), int(summary["num_points"])] for r, a in zip(radii, accuracy)]


def _class_rows(summary: Mapping, epoch: int) -> list:
    counts = summary.get("class_num_points", {})
    return [[epoch, int(label), float(key), float(acc), int(counts.get(label, 0))]
            for label, class_curve in summary["class_certified_accuracy"].items()
            for key, acc in class_curve.items()]


def log_certification(run, summary: Mapping, *, prefix: str, epoch: int, split: str, n: int, history: dict,
                      title: str, sigmas=None, png=None, extra: Optional[Mapping] = None) -> dict:
    """One certification at one step: scalars, the chart ``PREFIX/curve`` (one line per epoch) of the table
    ``PREFIX/curve_table`` of every certification so far (``history`` keeps its rows), the class-wise chart
    ``PREFIX/class`` of ``PREFIX/class_table``, the sigma(x) histogram and the PNG. Returns what was logged."""
    import wandb

    history.setdefault("curve", []).extend(_curve_rows(summary, epoch, split, n))
    history.setdefault("class", []).extend(_class_rows(summary, epoch))
    curves = wandb.Table(columns=CURVE_COLUMNS, data=history["curve"])
    classes = wandb.Table(columns=CLASS_COLUMNS, data=[row for row in history["class"] if row[0] == epoch])
    logged = {**scalars(summary, prefix), "epoch": epoch, **(extra or {}),  # a chart's table: KEY_table
              f"{prefix}/curve": wandb.plot.line(curves, "radius", "certified_accuracy", stroke="epoch", title=title),
              f"{prefix}/class": wandb.plot.line(classes, "radius", "certified_accuracy", stroke="class",
                                                 title=f"{title}: by class")}
    if sigmas is not None:
        logged[f"{prefix}/sigma"] = wandb.Histogram(np.asarray(sigmas, dtype=np.float64))
    if png is not None:
        logged[f"{prefix}/plot"] = wandb.Image(str(png))
    run.log(logged)
    return logged


def log_to_loggers(trainer, summary: Mapping, *, prefix: str, split: str, n: int, history: dict, title: str,
                   sigmas=None, png=None) -> None:
    """The Callback's certification: everything at one step to each W&B run, the scalars to the others."""
    epoch = trainer.current_epoch
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            log_certification(logger.experiment, summary, prefix=prefix, epoch=epoch, split=split, n=n,
                              history=history, title=title, sigmas=sigmas, png=png,
                              extra={"trainer/global_step": trainer.global_step})
        else:
            logger.log_metrics({**scalars(summary, prefix), "epoch": epoch}, step=trainer.global_step)


# ------------------------------------------------------------------------------ the certify job's run
def _checkpoint_facts(checkpoint: Mapping) -> tuple[dict, int]:
    """(the fit run a checkpoint came from: its W&B entry or {}, its epoch); read without the weights."""
    try:
        import torch

        raw = torch.load(checkpoint["path"], map_location="cpu", weights_only=True, mmap=True)
        lineage, epoch = dict(raw.get(LINEAGE_KEY) or {}), int(raw.get("epoch") or 0)
    except Exception:  # an older or non-zip checkpoint: no lineage to declare
        lineage, epoch = {}, 0
    return dict(checkpoint.get("lineage") or lineage), int(checkpoint.get("epoch") or epoch)


def _run_id(out: Path, project: str) -> str:
    """The W&B run id of the certify job in ``out``: kept in the folder, so a rerun continues its run."""
    path = out / RUN_FILE
    try:
        kept = read_summary(path)
        if kept.get("project") == project and kept.get("id"):
            return kept["id"]
    except (OSError, ValueError, AttributeError):
        pass
    run_id = _new_id()
    write_json_atomic(path, {"id": run_id, "project": project})
    return run_id


def _model_artifact(checkpoint: Mapping, lineage: Mapping):
    """The checkpoint as the fit run logged it (same name, same file name): W&B matches it by digest."""
    import wandb

    name = lineage.get("artifact") or f"model-{str(checkpoint.get('sha256') or 'unknown')[:12]}"
    artifact = wandb.Artifact(name=name, type="model", metadata={"sha256": checkpoint.get("sha256")})
    artifact.add_file(str(checkpoint["path"]), name="model.ckpt", policy="immutable")
    return artifact


def _use(run, artifact) -> None:
    if run.settings._offline:  # W&B's use_artifact refuses offline runs: log it, used once committed by sync
        run._log_artifact(artifact, aliases=["certified"], is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact, aliases=["certified"])


def _results_artifact(run, out: Path, summary: Mapping):
    import wandb

    artifact = wandb.Artifact(name=f"certify-{run.id}", type="certify-results",
                              metadata={k: v for k, v in scalars(summary, REPORT).items()})
    for path in sorted(out.iterdir()):
        if path.is_file() and path.suffix in (".tsv", ".json", ".png") and not path.name.startswith("."):
            artifact.add_file(str(path), name=path.name)
    return artifact


def _points_table(rows: Mapping):
    """The TSV's rows as a W&B Table, each column keeping its type (idx and label integers, radius float)."""
    import wandb

    columns = list(rows)
    return wandb.Table(columns=columns, data=[list(row) for row in zip(*(np.asarray(rows[c]).tolist()
                                                                           for c in columns))])


def log_certify_run(out, summary: Mapping, rows: Mapping, settings: Mapping, sigma: Mapping, checkpoint: Mapping,
                    options: Mapping, *, png=None, curves: Optional[Mapping[str, Sequence]] = None) -> Optional[str]:
    """The certify job's W&B run in ``out`` (called once at the end, and again on a rerun/resume: the run
    id is kept in ``out/wandb_run.json``, so the same run continues). Returns the run id (None if disabled).

    out: the output folder; summary: summary.json's dict; rows: the TSV's columns {name: values};
    settings: settings.json's dict; sigma: {"class_path", "init_args"}; checkpoint: {"path", "sha256",
    "config": its training config, optional "epoch", optional "lineage": the checkpoint's W&B entry (else
    read from the file)}; options: WandbOptions as a mapping (mode, project, entity, name, group, tags,
    notes); png: the PNG; curves: {label: (radii, accuracy)} of ``--certify.compare`` (overlay chart).
    """
    import wandb

    mode = options.get("mode", "offline")
    if mode == "disabled":
        return None
    out = Path(out)
    keep_run_files_under(out)
    offline = wandb_offline(mode == "offline")
    (lineage, epoch), project = _checkpoint_facts(checkpoint), options.get("project") or "lightning-idrs"
    dataset, sigma_class = summary.get("dataset"), sigma.get("class_path")
    run = wandb.init(
        dir=str(Path(out).resolve()), project=project, entity=options.get("entity"), name=options.get("name"),
        id=_run_id(out, project), resume="allow", mode="offline" if offline else "online", job_type="certify",
        group=options.get("group") or lineage.get("group") or default_group(dataset, sigma_class,
                                                                           str(checkpoint.get("sha256"))[:8]),
        tags=list(options.get("tags") or default_tags(dataset, sigma_class)), notes=options.get("notes"),
        config={"certify": dict(settings), "sigma": dict(sigma),
                "checkpoint": {"path": str(checkpoint["path"]), "sha256": checkpoint.get("sha256"), "epoch": epoch,
                               "config": checkpoint.get("config"), "fit_config": lineage.get("config"),
                               "fit_run": lineage.get("run_id")}},
        reinit="create_new", settings=wandb.Settings(silent=True, init_timeout=30))
    try:
        define_axes(run)
        _use(run, _model_artifact(checkpoint, lineage))
        extra = {f"{REPORT}/points": _points_table(rows)}
        if curves and len(curves) > 1:
            extra[f"{REPORT}/compare"] = _compare_chart(curves, summary)
        title = f"{dataset} {summary.get('split')}: n={summary.get('n')}"
        log_certification(run, summary, prefix=REPORT, epoch=epoch,
                          split=str(summary.get("split")), n=int(summary.get("n", 0)), history={}, title=title,
                          sigmas=rows.get("sigma"), png=png, extra=extra)
        run.summary.update(scalars(summary, REPORT))  # results: summary, not config
        run.log_artifact(_results_artifact(run, out, summary))
        line = _run_line(run)
    finally:
        run.finish()
    print(line, flush=True)
    return run.id


def _compare_chart(curves: Mapping[str, Sequence], summary: Mapping):
    import wandb

    data = [[str(label), float(r), float(a)] for label, (radii, acc) in curves.items() for r, a in zip(radii, acc)]
    table = wandb.Table(columns=["run", "radius", "certified_accuracy"], data=data)
    return wandb.plot.line(table, "radius", "certified_accuracy", stroke="run",
                           title=f"{summary.get('dataset')}: certified accuracy, compared")


# ------------------------------------------------------------------------------ online or offline
def wandb_offline(offline: bool) -> bool:
    """Whether a W&B run must log offline: when asked to, or when online is not possible now (then one
    warning on stderr, and offline: the results must not wait on, or be lost to, the network)."""
    problem = None if offline else wandb_online_problem()
    if problem is not None:
        print(f"warning: W&B cannot log online: {problem}; logging offline instead (`wandb sync` uploads the "
              "run later)", file=sys.stderr, flush=True)
    return offline or problem is not None


def wandb_online_problem(timeout: float = 10.0) -> Optional[str]:
    """Why W&B cannot log online now (no API key, server unreachable, key refused), or None.

    The key is found and verified by wandb's own login code (``WANDB_API_KEY``, then ``.netrc``; the check
    is W&B's, with its HTTP timeout ``WANDB_HTTP_TIMEOUT``, 10 s by default). A TCP connect within
    ``timeout`` comes first: W&B's check cannot tell an unreachable server from a refused key, and waits
    out its whole timeout for one that does not answer.
    """
    import socket
    import urllib.parse

    from wandb.errors import AuthenticationError
    from wandb.sdk.lib.wbauth import HostUrl, read_netrc_auth, validation

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    try:
        host = HostUrl(base)
        key = os.environ.get("WANDB_API_KEY") or read_netrc_auth(host=host)
    except (AuthenticationError, ValueError) as error:  # a malformed key or URL
        return f"the W&B API key or server URL is not valid ({error})"
    if not key:
        return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    problem = validation.check_api_key(key)
    if problem:
        return f"the W&B API key is not valid ({problem.rstrip('.')})"
    url = urllib.parse.urlparse(base)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {url.hostname}:{port} ({error})"
    problem = validation.check_api_key_validity(host=host, api_key=key)
    return None if problem is None else f"the W&B server refused the API key ({problem})"
