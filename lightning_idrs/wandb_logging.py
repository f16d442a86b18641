"""Everything lightning_idrs sends to Weights & Biases, with :mod:`lightning_idrs.wandb_runs` (keys, axes, names,
one certification, the online check); no other module of the package imports ``wandb``.

* :class:`WandbLogger`: Lightning's logger, quiet, with one x-axis per key (:data:`AXES`, no ``*``
  catch-all), no flat hyper-parameters beside the nested config, and checkpoints logged as a model
  artifact also offline, where only the monitored checkpoint is ``best``;
* :class:`WandbConfigCallback`: the config (fit: the full resolved LightningCLI config, nested as in
  ``config.yaml``; validate/test: the training config and digest of the checkpoint evaluated, with its
  model artifact as input) and the run's lineage (id, name, group) written into every checkpoint;
* :func:`log_certification`: one certification (the Callback's or ``certify``'s) at one step: the
  scalars on the report grid, the growing curve table (one line per epoch), the class-wise table and
  chart, the sigma(x) histogram and the PNG;
* :func:`log_certify_run`: the ``certify`` job's own run (same run id on a rerun into the same folder);
* :func:`wandb_offline` / :func:`wandb_online_problem`: online only when it works now (public W&B calls).

Keys: the Callback's monitoring results live under ``monitor/``, the ``certify`` command's reported
results under ``certify/`` (:data:`MONITOR`, :data:`REPORT`); both have the same names below them.
Names hold no ``.`` (W&B reads it as nesting): ``acc_R0p25`` is the certified accuracy at radius 0.25.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from lightning_idrs.reporting import keep_run_files_under, read_summary, run_name, scalars, write_json_atomic
from lightning_idrs.wandb_runs import (AXES, LINEAGE_KEY, MONITOR, REPORT, RUN_FILE, STEP, _has_axis, _model_artifact,
                                       _new_id, _run_line, _use, default_group, default_tags, define_axes,
                                       describe_checkpoint, log_certification, sigma_kind, wandb_offline,
                                       wandb_online_problem)

__all__ = ["AXES", "LINEAGE_KEY", "MONITOR", "REPORT", "STEP", "WandbConfigCallback", "WandbLogger", "default_group",
           "default_tags", "finish_runs", "log_certification", "log_certify_run", "log_to_loggers", "prepare_logger",
           "sigma_kind", "wandb_offline", "wandb_online_problem"]


# ------------------------------------------------------------------------------ fit / validate / test
class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, quiet, with ``log_model`` also offline (the model artifact is staged
    under the run folder and uploaded by ``wandb sync``), without the deprecated ``anonymous`` setting, with
    one x-axis per key (:data:`AXES`; Lightning's ``*`` on the step would overlap them), no flat copy of the
    hyper-parameters (the nested config is :class:`WandbConfigCallback`'s), and the alias ``best`` only on
    the monitored checkpoint (Lightning also gives it to ``last.ckpt``).

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
        self._own_axes: set = set()
        if offline:  # said to wandb.init itself: Lightning's WANDB_MODE is not read once wandb's settings exist
            self._wandb_init["mode"] = "offline"  # (e.g. after the online probe verified a key and fell back)

    @property
    @rank_zero_experiment
    def experiment(self):
        """The run (started on first use), with :data:`AXES` defined and no ``*`` catch-all."""
        if self._experiment is None:
            import wandb

            attach_id = getattr(self, "_attach_id", None)
            if attach_id is not None and hasattr(wandb, "_attach"):  # a spawned process: the run and axes exist
                self._experiment = wandb._attach(attach_id)
            else:
                self._experiment = wandb.run if wandb.run is not None else wandb.init(**self._wandb_init)
                define_axes(self._experiment)
        return self._experiment

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """Nothing: the run's config is the nested one of :class:`WandbConfigCallback`; Lightning's flat
        hyper-parameters (``sigma``, ``batch_size``, ``_instantiator``, ...) would only duplicate it."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        run = self.experiment
        for key in metrics:
            name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
            if not _has_axis(name) and name not in self._own_axes:  # a key of the user's: on the step
                run.define_metric(name.replace(".", "\\."), step_metric=STEP)  # '\.': a dot, not nesting
                self._own_axes.add(name)
        super().log_metrics(metrics, step)

    def _scan_and_log_checkpoints(self, checkpoint_callback) -> None:
        """Lightning's, except that ``best`` goes only to the best file of a checkpoint callback that monitors
        something (a callback without ``monitor``, e.g. the one writing last.ckpt, calls its latest file best)."""
        import wandb
        from pytorch_lightning.loggers.utilities import _scan_checkpoints
        from torch import Tensor

        for time, path, score, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            metadata = {"score": score.item() if isinstance(score, Tensor) else score,
                        "original_filename": Path(path).name, "monitor": checkpoint_callback.monitor,
                        "mode": getattr(checkpoint_callback, "mode", None)}
            name = self._checkpoint_name or f"model-{self.experiment.id}"
            artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
            artifact.add_file(path, name="model.ckpt", policy=getattr(self, "add_file_policy", "mutable"))
            best = checkpoint_callback.monitor is not None and path == checkpoint_callback.best_model_path
            self.experiment.log_artifact(artifact, aliases=["latest", "best"] if best else ["latest"])
            self._logged_model_time[path] = time


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
    """``config.yaml`` as LightningCLI writes it, plus for every W&B logger the run's config and the run's
    lineage in every checkpoint. fit: the full resolved config (nested: trainer, model with the sigma's
    class_path/init_args and the optimizer, data, callbacks, seed_everything). validate/test
    (``evaluated``: the checkpoint's path, sha256 and dict): what was trained (the checkpoint's own config),
    the checkpoint (path, digest, epoch, fit run), this run's settings under ``evaluation``, and the model
    artifact declared as the run's input."""

    def __init__(self, *args, evaluated: Optional[Mapping] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluated = evaluated

    def save_config(self, trainer, pl_module, stage) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_check=True))
        self.resolved = {k: v for k, v in config.items() if k not in ("config", "ckpt_path")}
        for run in _wandb_runs(trainer):
            if self.evaluated is None:
                run.config.update(self.resolved, allow_val_change=True)
                continue
            raw = self.evaluated["checkpoint"]
            facts = {"path": self.evaluated["path"], "sha256": self.evaluated["sha256"], "raw": raw}
            described = describe_checkpoint(facts)
            evaluation = {k: v for k, v in self.resolved.items() if k != "model"}  # the model is the checkpoint's
            run.config.update({**described.pop("config"), "checkpoint": described, "evaluation": evaluation},
                              allow_val_change=True)
            _use(run, _model_artifact(facts, raw.get(LINEAGE_KEY) or {}))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger) and trainer.is_global_zero:
                run = logger.experiment
                checkpoint[LINEAGE_KEY] = {"run_id": run.id, "name": run.name or None, "project": run.project,
                                           "entity": run.entity or None, "group": run.group or None,
                                           "artifact": f"model-{run.id}",
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


def prepare_logger(init_args, *, subcommand: str, dataset: Optional[str], model: Optional[Mapping], seed=None,
                   lineage: Optional[Mapping] = None, checkpoint_path: Optional[str] = None) -> str:
    """Defaults of a W&B logger's arguments for ``subcommand``: our logger class, job type, tags, name
    (:func:`~lightning_idrs.reporting.run_name`; validate/test: ``test-<fit run's name>-<checkpoint>``), group
    (fit: a new one; validate/test: the checkpoint's fit run's), model artifacts in fit. ``model``: the model's
    config (fit) or the checkpoint's hyper-parameters. Returns the class path to use."""
    sigma = (model or {}).get("sigma") or {}
    sigma_class = sigma.get("class_path") if hasattr(sigma, "get") else None
    init_args["job_type"] = init_args.get("job_type") or subcommand
    init_args["tags"] = init_args.get("tags") or default_tags(dataset, sigma_class)
    lineage = lineage or {}
    if subcommand == "fit":
        init_args["name"] = init_args.get("name") or run_name(dataset, model, seed)
        if init_args.get("log_model") in (None, False):
            init_args["log_model"] = True
        run_id = init_args.get("id") or init_args.get("version") or _new_id()
        init_args["id"] = run_id
        init_args["group"] = init_args.get("group") or default_group(dataset, sigma_class, run_id)
    else:
        trained = lineage.get("name") or run_name(dataset, model, (lineage.get("config") or {}).get("seed_everything"))
        init_args["name"] = init_args.get("name") or f"{subcommand}-{trained}-{Path(checkpoint_path or 'model').stem}"
        if not init_args.get("group") and lineage.get("group"):
            init_args["group"] = lineage["group"]
    return f"{__name__}.WandbLogger"


def log_to_loggers(trainer, summary: Mapping, *, prefix: str, split: str, n: int, history: dict, title: str,
                   sigmas=None, png=None) -> None:
    """The Callback's tables, histogram and PNG to each W&B run, into the validation row of this epoch (which
    also holds the Callback's scalars, logged through Lightning like the validation metrics)."""
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            log_certification(logger.experiment, summary, prefix=prefix, epoch=trainer.current_epoch, split=split,
                              n=n, history=history, title=title, sigmas=sigmas, png=png, scalar_keys=False,
                              commit=False)


# ------------------------------------------------------------------------------ the certify job's run
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


def _results_artifact(run, out: Path, summary: Mapping):
    """The results files; their metadata a fixed set of keys whatever the grid (W&B refuses over 100 keys)."""
    import wandb

    report = {key.split("/acc_", 1)[1]: value for key, value in scalars(summary, REPORT).items() if "/acc_" in key}
    metadata = {key: summary.get(key) for key in ("dataset", "split", "n", "alpha", "num_points", "acr",
                                                  "clean_accuracy", "abstain_rate", "mean_sigma", "sigma_label")}
    artifact = wandb.Artifact(name=f"certify-{run.id}", type="certify-results",
                              metadata={**metadata, "certified_accuracy": report})
    from lightning_idrs.reporting import PLOT_NAME, SUMMARY_NAME
    from lightning_idrs.tsv_log import SETTINGS_NAME, TSV_NAME

    for name in (TSV_NAME, SUMMARY_NAME, SETTINGS_NAME, PLOT_NAME):  # this job's files (not a Callback's PNGs there)
        if (out / name).is_file():
            artifact.add_file(str(out / name), name=name)
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
    optional "hparams": the model's hyper-parameters} (the rest is read from the file); options: WandbOptions
    as a mapping (mode, project, entity, name, group, tags, notes); png: the PNG; curves: {label: (radii,
    accuracy)} of the plot, with ``--certify.compare``'s runs (then an overlay chart).
    """
    import wandb

    mode = options.get("mode", "offline")
    if mode == "disabled":
        return None
    out = Path(out)
    keep_run_files_under(out)
    offline = wandb_offline(mode == "offline")
    described, project = describe_checkpoint(checkpoint), options.get("project") or "lightning-idrs"
    lineage, dataset, sigma_class = described.pop("lineage"), summary.get("dataset"), sigma.get("class_path")
    trained = described["fit_name"] or run_name(dataset, {**described["config"].get("model", {}), "sigma": sigma},
                                                (described["config"] or {}).get("seed_everything"))
    run = wandb.init(
        dir=str(Path(out).resolve()), project=project, entity=options.get("entity"), id=_run_id(out, project),
        name=options.get("name") or f"certify-{trained}-{Path(checkpoint['path']).stem}-n{summary.get('n')}",
        resume="allow", mode="offline" if offline else "online", job_type="certify",
        group=options.get("group") or lineage.get("group") or default_group(dataset, sigma_class,
                                                                           str(checkpoint.get("sha256"))[:8]),
        tags=list(options.get("tags") or default_tags(dataset, sigma_class)), notes=options.get("notes"),
        config={"certify": dict(settings), "sigma": {**sigma, "kind": sigma_kind(sigma_class)}, "checkpoint": described},
        reinit="create_new", settings=wandb.Settings(silent=True, init_timeout=30))
    try:
        define_axes(run, (f"{REPORT}/",))
        _use(run, _model_artifact(checkpoint, lineage))
        extra = {f"{REPORT}/points": _points_table(rows)}
        if curves and len(curves) > 1:
            extra[f"{REPORT}/compare"] = _compare_chart(curves, summary)
        title = f"{dataset} {summary.get('split')}: n={summary.get('n')}"
        log_certification(run, summary, prefix=REPORT, epoch=described["epoch"], split=str(summary.get("split")),
                          n=int(summary.get("n", 0)), history={}, title=title, sigmas=rows.get("sigma"), png=png,
                          extra=extra)
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


