"""The W&B runs of lightning_idrs, below the Lightning side (:mod:`lightning_idrs.wandb_logging`): the keys
and their x-axes, names, tags and groups, what a run says of its checkpoint, one certification at one
step, and whether a run can log online now (found with W&B's public calls only).

With :mod:`lightning_idrs.wandb_logging`, the only module of the package that imports ``wandb``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from lightning_idrs.reporting import curve, scalars, sigma_kind

__all__ = ["AXES", "LINEAGE_KEY", "MONITOR", "REPORT", "STEP", "default_group", "default_tags", "define_axes",
           "describe_checkpoint", "log_certification", "sigma_kind", "wandb_offline", "wandb_online_problem"]

MONITOR, REPORT, STEP = "monitor", "certify", "trainer/global_step"
#: The x-axis of every key the package logs, by prefix. No prefix is a prefix of another and there is no
#: ``*``: each key matches exactly one definition (W&B matches globs by prefix, in no fixed order). Keys
#: outside them (a user's metrics) are defined one by one, on the step, when first logged.
AXES = {"train/": STEP, "val/": "epoch", "test/": "epoch", f"{MONITOR}/": "epoch", f"{REPORT}/": "epoch"}
CURVE_COLUMNS = ["epoch", "radius", "certified_accuracy", "split", "n", "num_points", "line"]
CLASS_COLUMNS = ["epoch", "class", "radius", "certified_accuracy", "points", "line"]
LINEAGE_KEY = "wandb"  # the checkpoint entry naming the fit run (id, name, project, entity, group, config)
RUN_FILE = "wandb_run.json"  # certify's run id, kept in its output folder


# ------------------------------------------------------------------------------ names, tags, groups, axes
def default_tags(dataset: Optional[str], sigma_class: Optional[str]) -> list:
    return [tag for tag in (dataset, sigma_kind(sigma_class)) if tag]


def default_group(dataset: Optional[str], sigma_class: Optional[str], run_id: str) -> str:
    """The group of a fit run; the certify, test and validate runs of its checkpoints join it."""
    return "-".join(default_tags(dataset, sigma_class) + [run_id])


def _new_id() -> str:
    """A new run id: 8 characters of [a-z0-9], as W&B makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _run_line(run) -> str:
    """Where a run's files are (relative to the current folder when inside it), and how to upload them."""
    folder = Path(run.dir).parent
    with contextlib.suppress(ValueError):
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    if run.offline:
        return f"W&B: offline run {run.id} in {folder}; upload it with: wandb sync {folder}"
    return f"W&B: run {run.id} at {run.url} (files in {folder})"


def define_axes(run, prefixes=tuple(AXES)) -> None:
    """The x-axes of the keys under ``prefixes`` (:data:`AXES`); ``epoch`` and the step are axes themselves."""
    run.define_metric("epoch")
    run.define_metric(STEP)
    for prefix in prefixes:
        run.define_metric(f"{prefix}*", step_metric=AXES[prefix])


def _has_axis(key: str) -> bool:
    return key in ("epoch", STEP) or any(key.startswith(prefix) for prefix in AXES)


# ------------------------------------------------------------------------------ the checkpoint of a run
def describe_checkpoint(facts: Mapping) -> dict:
    """What a certify/test/validate run's config says of its checkpoint ``facts`` ({"path", "sha256", "raw": the
    checkpoint's dict, or "hparams" when it is not at hand}): path, digest, epoch, fit run and model artifact,
    and ``config``: the training config (the fit run's, recorded in the checkpoint; else the model's
    hyper-parameters and the data module, from the checkpoint)."""
    raw = facts.get("raw")
    if raw is None:
        with contextlib.suppress(Exception):  # an older or non-zip checkpoint: nothing more to describe
            import torch

            raw = torch.load(facts["path"], map_location="cpu", weights_only=True, mmap=True)
    raw = raw if isinstance(raw, Mapping) else {}
    lineage = dict(raw.get(LINEAGE_KEY) or {})
    config = lineage.get("config")
    if not config:
        hparams = dict(facts.get("hparams") or raw.get("hyper_parameters") or {})
        model = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        config = {"model": {**model, **({"objective": hparams["_objective"]} if "_objective" in hparams else {})}}
        with contextlib.suppress(Exception):
            from lightning_idrs.checkpoint import datamodule_config

            config["data"] = datamodule_config(raw)
    return {"path": str(Path(facts["path"]).resolve()), "sha256": facts.get("sha256"), "epoch": int(raw.get("epoch") or 0),
            "fit_run": lineage.get("run_id"), "fit_name": lineage.get("name"), "artifact": lineage.get("artifact"),
            "config": config, "lineage": lineage}


def _model_artifact(checkpoint: Mapping, lineage: Mapping):
    """The checkpoint as the fit run logged it (same name, same file name): W&B matches it by digest."""
    import wandb

    name = lineage.get("artifact") or f"model-{str(checkpoint.get('sha256') or 'unknown')[:12]}"
    artifact = wandb.Artifact(name=name, type="model", metadata={"sha256": checkpoint.get("sha256")})
    artifact.add_file(str(checkpoint["path"]), name="model.ckpt", policy="immutable")
    return artifact


def _use(run, artifact) -> None:
    if run.offline:  # W&B's use_artifact refuses offline runs: log it, used once committed by sync
        run._log_artifact(artifact, aliases=["certified"], is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact, aliases=["certified"])


# ------------------------------------------------------------------------------ one certification
def _curve_rows(summary: Mapping, epoch: int, split: str, n: int, line: str) -> list:
    radii, accuracy = curve(summary)
    return [[epoch, float(r), float(a), split, int(n), int(summary["num_points"]), line] for r, a in zip(radii, accuracy)]


def _class_rows(summary: Mapping, epoch: int, run: str) -> list:
    counts = summary.get("class_num_points", {})
    return [[epoch, int(label), float(key), float(acc), int(counts.get(label, 0)), f"{run} class {label}"]
            for label, class_curve in summary["class_certified_accuracy"].items()
            for key, acc in class_curve.items()]


def log_certification(run, summary: Mapping, *, prefix: str, epoch: int, split: str, n: int, history: dict,
                      title: str, sigmas=None, png=None, extra: Optional[Mapping] = None, scalar_keys: bool = True,
                      commit: bool = True) -> dict:
    """One certification at one step: scalars (unless ``scalar_keys`` is False: the caller logs them), the chart
    ``PREFIX/curve`` (one line per epoch) of the table ``PREFIX/curve_table`` of every certification so far
    (``history`` keeps its rows), the class-wise chart ``PREFIX/class`` of ``PREFIX/class_table``, the sigma(x)
    histogram and the PNG. The tables' ``line`` column (run name and epoch or class) draws one line per run and
    epoch/class where runs are overlaid. ``commit=False``: the row is completed by the next log call."""
    import wandb

    name = run.name or run.id
    line = name if prefix == REPORT else f"{name} epoch {epoch}"  # a certify run: one line; the Callback: per epoch
    history.setdefault("curve", []).extend(_curve_rows(summary, epoch, split, n, line))
    history.setdefault("class", []).extend(_class_rows(summary, epoch, name))
    curves = wandb.Table(columns=CURVE_COLUMNS, data=history["curve"])
    classes = wandb.Table(columns=CLASS_COLUMNS, data=[row for row in history["class"] if row[0] == epoch])
    logged = {**(scalars(summary, prefix) if scalar_keys else {}), "epoch": epoch, **(extra or {}),
              f"{prefix}/curve": wandb.plot.line(curves, "radius", "certified_accuracy", stroke="epoch", title=title),
              f"{prefix}/class": wandb.plot.line(classes, "radius", "certified_accuracy", stroke="class",
                                                 title=f"{title}: by class")}  # a chart's table: KEY_table
    if sigmas is not None:
        logged[f"{prefix}/sigma"] = wandb.Histogram(np.asarray(sigmas, dtype=np.float64))
    if png is not None:
        logged[f"{prefix}/plot"] = wandb.Image(str(png))
    run.log(logged, commit=commit)
    return logged


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

    Public calls only, so that it works with every wandb the package accepts: the key is ``WANDB_API_KEY``,
    else the ``.netrc`` entry of the server (``NETRC``, else ``~/.netrc``, where ``wandb login`` writes it);
    its form is W&B's (40+ characters after an on-prem prefix); the server (``WANDB_BASE_URL``) must accept a
    TCP connection within ``timeout`` (W&B's own check cannot tell an unreachable server from a refused key,
    and waits out its whole timeout for one that does not answer), then ``wandb.Api(api_key=...).viewer``.
    """
    import socket
    import urllib.parse

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    url = urllib.parse.urlparse(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"the W&B server URL is not valid ({base!r}; set WANDB_BASE_URL to e.g. https://api.wandb.ai)"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = _netrc_key(url)
        except (OSError, ValueError) as error:  # netrc.NetrcParseError is an OSError/ValueError subclass
            return f"the W&B API key cannot be read from the .netrc file ({' '.join(str(error).split())[:200]})"
    if not key:
        return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    secret = key.split("-", 1)[-1]
    if key.count(".") != 2 and len(secret) < 40:  # W&B keys (a JWT has two dots and is W&B's too)
        return f"the W&B API key is not valid (API key must have 40+ characters, has {len(secret)})"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {url.hostname}:{port} ({error})"
    try:
        import wandb

        wandb.Api(overrides={"base_url": base}, timeout=max(1, int(timeout)), api_key=key).viewer
    except Exception as error:  # wandb's own errors differ between versions: any failure means no
        return f"the W&B server refused the API key ({' '.join(str(error).split())[:300]})"
    return None


def _netrc_key(url) -> Optional[str]:
    """The password of the server's entry in the .netrc file (``NETRC``, else ``~/.netrc``), or None."""
    import netrc

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    entries = netrc.netrc(path)
    for host in (url.netloc.rsplit("@", 1)[-1], url.hostname):
        found = entries.authenticators(host)
        if found and found[2]:
            return found[2]
    return None
