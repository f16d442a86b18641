"""The one checkpoint loader: model + sigma + datamodule + metadata, for every command and the API.

A checkpoint written by ``fit`` holds the weights, the model's hyper-parameters (the sigma function
as ``class_path`` + ``init_args``), the datamodule's class and arguments, and the ``lightning_idrs``
entry (written by ``IDRSClassifier.on_save_checkpoint``, read here and nowhere else). Loading

1. reads the file with PyTorch's safe unpickler (``weights_only=True``): no code from the file runs;
   refuses NaN / inf weights and weights that differ from the digest recorded at save time;
2. rebuilds the model with jsonargparse from its hyper-parameters (a user's sigma class only has to
   be importable) and loads the state dict;
3. rebuilds the datamodule (its arguments may be overridden), checks that it is the data the model
   was trained on, and fits sigma on its training inputs.

Every failure is a :class:`~lightning_idrs.arguments.UsageError` naming the file and the fix.
Checkpoints of lightning_idrs 0.1 (``sigma: knn|constant``) load too.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lightning_idrs.data import DataNotFoundError, IDRSDataModule
from lightning_idrs.digests import state_dict_sha256
from lightning_idrs.module import CHECKPOINT_KEY, IDRSClassifier, non_finite_weights
from lightning_idrs.arguments import UsageError, one_line

__all__ = ["LoadedCheckpoint", "build_datamodule", "datamodule_config", "load_checkpoint", "load_model",
           "read_checkpoint"]

_LEGACY_SIGMA = {"knn": "lightning_idrs.sigma.KnnSigma", "constant": "lightning_idrs.sigma.ConstantSigma"}


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to certify or evaluate: ``model`` (eval mode, sigma fitted) and its data."""

    path: str
    sha256: str
    model: IDRSClassifier
    datamodule: IDRSDataModule
    metadata: dict  # the checkpoint's lightning_idrs entry


def read_checkpoint(path) -> tuple[dict, str]:
    """(checkpoint dict, sha256 of the file), read with the safe unpickler; UsageError if unusable."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    data = file.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # random bytes or a pickle with code raise anything from UnpicklingError on
        raise UsageError(f"cannot read checkpoint {path} (corrupt, not a PyTorch file, or it holds objects "
                         f"that are not plain data): {one_line(error)[:200]}") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UsageError(f"{path} is not a lightning_idrs checkpoint (no {CHECKPOINT_KEY!r} entry); train with `fit`")
    return checkpoint, hashlib.sha256(data).hexdigest()


def _upgrade_legacy(checkpoint: dict) -> None:
    """lightning_idrs 0.1 checkpoints: sigma chosen by name, data identity only in the metadata entry."""
    hparams = checkpoint.setdefault("hyper_parameters", {})
    kind = hparams.get("sigma")
    if isinstance(kind, str):
        names = ("sigma_base",) if kind == "constant" else ("sigma_base", "semi_elasticity", "k", "m")
        init_args = {name: hparams[name] for name in names if name in hparams}
        hparams["sigma"] = {"class_path": _LEGACY_SIGMA.get(kind, kind), "init_args": init_args}
        for name in ("sigma_base", "semi_elasticity", "k", "m"):
            hparams.pop(name, None)
    info = checkpoint[CHECKPOINT_KEY]
    checkpoint["state_dict"].setdefault(
        "_extra_state", {"dataset": info.get("dataset"), "data_fingerprint": info.get("data_fingerprint")})


def _check_weights(checkpoint: dict, path) -> None:
    """Every weight finite, and all of them as they were saved (the digest ``fit`` recorded)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise UsageError(f"{path} holds no weights (no state_dict); use a checkpoint written by `fit`")
    broken = non_finite_weights(state)
    if broken:
        raise UsageError(f"{path} has NaN or inf weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}):"
                         " the run diverged; use a checkpoint saved before it did")
    expected = checkpoint[CHECKPOINT_KEY].get("weights_sha256")
    if expected is None:  # without it a damaged or edited file would be certified as if intact
        raise UsageError(f"{path} records no digest of its weights (not written by `fit` of lightning_idrs 0.2+, or "
                         "edited), so its weights cannot be checked; certify a checkpoint that `fit` wrote")
    if state_dict_sha256(state) != expected:
        raise UsageError(f"checkpoint is corrupt: the weights in {path} differ from the digest recorded when it was "
                         "saved (a damaged or edited file); use an intact copy")


def load_model(path) -> tuple[IDRSClassifier, dict, str]:
    """(model on the CPU with its weights, sigma not yet fitted; checkpoint dict; sha256 of the file)."""
    checkpoint, sha256 = read_checkpoint(path)
    _check_weights(checkpoint, path)
    _upgrade_legacy(checkpoint)
    return _build_model(checkpoint, path), checkpoint, sha256


def _build_model(checkpoint: dict, path) -> IDRSClassifier:
    from pytorch_lightning.cli import instantiate_module

    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    if hparams.get("sigma") is None:
        raise UsageError(f"{path} does not record how to build its sigma function (it was built in Python from "
                         "arguments a config cannot name); build IDRSClassifier(sigma=...) yourself and load_state_dict")
    _sigma_class(hparams["sigma"], path)
    try:
        model = instantiate_module(IDRSClassifier, hparams)
    except (Exception, SystemExit) as error:  # jsonargparse reports bad arguments by exiting
        raise UsageError(f"cannot build the model of {path} from its hyper-parameters: {one_line(error)[:300]}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise UsageError(f"the weights of {path} do not fit its model: {one_line(error)[:300]}") from None
    return model


def _sigma_class(config, path) -> type:
    """The sigma class a checkpoint names, importable and a Sigma, or a line saying which it is not."""
    from lightning_idrs.sigma import Sigma

    class_path = config.get("class_path", "") if isinstance(config, dict) else str(config)
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ModuleNotFoundError as error:
        raise UsageError(f"the sigma class {class_path} of {path} cannot be imported: there is no module "
                         f"{error.name!r} (make the module of your sigma class importable, e.g. on PYTHONPATH)") from None
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"the sigma class {class_path} of {path} cannot be imported: {one_line(error)}") from None
    if not (isinstance(cls, type) and issubclass(cls, Sigma)):
        raise UsageError(f"{class_path} (the sigma of {path}) is not a sigma function: it must subclass "
                         "lightning_idrs.sigma.Sigma")
    return cls


def _canonical(config):
    """``config`` with every ``class_path`` spelled as its class's own module path, so that the names
    jsonargparse resolved (``lightning_idrs.PCAProjection``) equal the defining module's
    (``lightning_idrs.embeddings.PCAProjection``); a path that does not import stays as it is."""
    if isinstance(config, dict):
        config = {key: _canonical(value) for key, value in config.items()}
        path = config.get("class_path")
        if isinstance(path, str) and "." in path:
            try:
                cls = getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2])
                config["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            except (ImportError, AttributeError, ValueError):
                pass
        return config
    if isinstance(config, (list, tuple)):
        return [_canonical(value) for value in config]
    return config


def comparable_sigma(config, sigma):
    """``config`` (``sigma``'s ``{"class_path", "init_args"}``) without the init args that only choose how its
    class computes sigma(x) (``Sigma.RUNTIME_OPTIONS``, e.g. knn_backend): what a checkpoint's record of its
    sigma and a certify folder's settings compare, so that another backend is the same sigma."""
    names = getattr(type(sigma), "RUNTIME_OPTIONS", ())
    args = config.get("init_args") if isinstance(config, dict) else None
    if not names or not isinstance(args, dict):
        return config
    return {**config, "init_args": {k: v for k, v in args.items() if k not in names}}


def check_sigma_record(model: IDRSClassifier, metadata: dict, path) -> None:
    """Refuse a sigma that is not the one the checkpoint was trained and recorded with: another class,
    other parameters or another semi-elasticity make another smoothed classifier (and other radii)."""
    recorded, now = metadata.get("sigma"), model.hparams.sigma
    if recorded is not None and \
            _canonical(comparable_sigma(recorded, model.sigma)) != _canonical(comparable_sigma(now, model.sigma)):
        raise UsageError(f"{path}: its sigma hyper-parameters ({now}) differ from the sigma it recorded at save time "
                         f"({recorded}); the file was edited: use the checkpoint `fit` wrote")
    cls = f"{type(model.sigma).__module__}.{type(model.sigma).__qualname__}"
    if isinstance(recorded, dict) and recorded.get("class_path") not in (cls, None) and \
            _sigma_class(recorded, path) is not type(model.sigma):
        raise UsageError(f"{path} was trained with the sigma class {recorded.get('class_path')}, now built as {cls}")
    if "semi_elasticity" not in metadata:
        return
    try:
        r = float(model.sigma.semi_elasticity)
    except ValueError:
        r = None
    if r is not None and not (r >= 0 and r < float("inf")):
        raise UsageError(f"the sigma class {cls} reports semi_elasticity {r}: it must be a finite number >= 0; "
                         "fix the sigma class")
    recorded_r = metadata["semi_elasticity"]
    # a checkpoint of 0.2 with an embedding recorded rate * Lip(phi) rounded to nearest; it is now rounded up
    same = r == recorded_r or (r is not None and recorded_r is not None and math.isclose(r, recorded_r, rel_tol=2**-50))
    if not same:
        raise UsageError(f"the sigma class {cls} now reports semi_elasticity {r}, but {path} recorded "
                         f"{metadata['semi_elasticity']} when it was trained: the class changed since `fit`, so this "
                         "would be another smoothed classifier; restore the class, or train again")


def _datamodule_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_idrs.data"), name)
    except (ImportError, AttributeError, ValueError):
        raise UsageError(f"unknown data module class {class_path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, IDRSDataModule)):
        raise UsageError(f"{class_path!r} is not a lightning_idrs data module (IDRSDataModule subclass)")
    return cls


def datamodule_config(checkpoint: dict) -> dict:
    """``{"class_path", "init_args"}`` of the datamodule the checkpoint was trained with (class None if unknown)."""
    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    class_path = checkpoint[CHECKPOINT_KEY].get("datamodule_class") or saved.get("_class_path")
    return {"class_path": class_path, "init_args": {k: v for k, v in saved.items() if not k.startswith("_")}}


def build_datamodule(checkpoint: dict, data: Optional[dict] = None, overrides: Optional[dict] = None):
    """The checkpoint's datamodule; ``data`` (a config's ``data:`` section) may replace it and
    ``overrides`` (e.g. ``{"root": DIR}``) set single arguments."""
    saved = datamodule_config(checkpoint)
    class_path, init_args = saved["class_path"], saved["init_args"]
    if data:
        new_path = data.get("class_path")
        new_args = data.get("init_args", {} if new_path else data) or {}
        if new_path and (class_path is None or _datamodule_class(new_path) is not _datamodule_class(class_path)):
            init_args = {}  # another data module: the checkpoint's arguments do not apply
        init_args.update(new_args)
        class_path = new_path or class_path
    if class_path is None:
        raise UsageError("the checkpoint does not record its data module; pass --config with a data: section")
    cls = _datamodule_class(class_path)
    parameters = inspect.signature(cls.__init__).parameters
    for key, value in (overrides or {}).items():
        if key not in parameters:
            raise UsageError(f"--data.{key}: the data module {cls.__name__} takes no {key}")
        init_args[key] = value
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as error:
        raise UsageError(f"cannot build the data module {cls.__name__}({init_args}): {one_line(error)}") from None


def load_checkpoint(path, device="cpu", data: Optional[dict] = None,
                    overrides: Optional[dict] = None, sigma_options: Optional[dict] = None) -> LoadedCheckpoint:
    """Load ``path`` (see the module docstring) onto ``device``; UsageError on any problem. ``sigma_options``:
    values (None: the checkpoint's) for the sigma's ``RUNTIME_OPTIONS`` (e.g. ``knn_backend``), which change
    how sigma(x) is computed, never which function it is; a sigma without such an option ignores it."""
    model, checkpoint, sha256 = load_model(path)
    datamodule = build_datamodule(checkpoint, data, overrides)
    for name, value in (sigma_options or {}).items():
        if value is not None and name in type(model.sigma).RUNTIME_OPTIONS:
            try:
                setattr(model.sigma, name, value)
            except ValueError as error:
                raise UsageError(f"cannot use {name}={value!r} with the sigma of {path}: {one_line(error)}") from None
    model.to(device)
    try:
        model.attach_data(datamodule)  # checks shape, classes, data fingerprint; fits sigma
    except DataNotFoundError as error:
        raise UsageError(one_line(error)) from None
    except UsageError:  # already says what is wrong (e.g. a faiss that fails)
        raise
    except ValueError as error:
        raise UsageError(f"checkpoint and data do not match: {one_line(error)}") from None
    check_sigma_record(model, checkpoint[CHECKPOINT_KEY], path)
    return LoadedCheckpoint(str(path), sha256, model.eval(), datamodule, dict(checkpoint[CHECKPOINT_KEY]))
