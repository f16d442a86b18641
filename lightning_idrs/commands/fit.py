"""``python -m lightning_idrs fit|validate|test``: LightningCLI over IDRSClassifier + a datamodule.

Every knob is a YAML key or a flag (``--model.sigma.sigma_base 0.5``, ``--trainer.max_epochs 5``). The
configs ship inside the package (``lightning_idrs/configs``): ``digits.yaml`` is the default, so
``python -m lightning_idrs fit`` works from any directory with no arguments, and a packaged config
can be named without its path: ``--config cifar10 --config rs``.

``validate`` / ``test --ckpt_path CKPT`` evaluate the checkpoint's model (read by the one loader,
:mod:`lightning_idrs.checkpoint`) on the checkpoint's own data module; ``--data.*`` flags and a
``--config`` with a ``data:`` section override it.

Before a logger or W&B run exists, every run checks what it can: the output folder is writable, the
data is there (or downloads), the model fits the data, and (fit) sigma(x) is finite on every training
point. Any problem is one ``error:`` line and exit code 2. W&B keeps its own files under the run's
folder and falls back to offline logging (with one warning) when online logging is not possible.

``validate`` and ``test`` write into ``ROOT/validate`` and ``ROOT/test`` (their own config.yaml, W&B
run, ...), so they never change the files of the fit run in ROOT. W&B runs (:mod:`lightning_idrs.
wandb_logging`) get the full resolved config, job type, tags (data set, RS/IDRS), a group shared with
the checkpoint's certify runs, and (fit) the checkpoints as a model artifact.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lightning_idrs.arguments import UsageError, one_line
from lightning_idrs.checkpoint import datamodule_config, load_model, read_checkpoint
from lightning_idrs.commands import CONFIGS, config_file_action
from lightning_idrs.data import DataNotFoundError, IDRSDataModule
from lightning_idrs.module import IDRSClassifier
from lightning_idrs.reporting import keep_run_files_under
from lightning_idrs.wandb_logging import (LINEAGE_KEY, WandbConfigCallback, finish_runs, prepare_logger,
                                         wandb_offline)

DEFAULT_CONFIG = CONFIGS / "digits.yaml"
EVALUATE = ("validate", "test")


def _loggers(trainer_config):
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        return logger
    return [logger] if logger is not None and not isinstance(logger, bool) else []


class _StartupMessages:
    """Lightning's start-up messages ("Seed set to 0", "GPU available: ...") are held back until the
    checks have passed, so that bad input prints its error line alone; its product tips are dropped."""

    NAMES = ("pytorch_lightning", "lightning_fabric")

    def __init__(self):
        self.loggers = [logging.getLogger(name) for name in self.NAMES]
        self.saved = [logger.handlers[:] for logger in self.loggers]
        self.buffer = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        for logger in self.loggers:
            logger.handlers = [self.buffer]

    def restore(self, replay: bool) -> None:
        if self.buffer is None:
            return
        for logger, handlers in zip(self.loggers, self.saved):
            logger.handlers = handlers
        for record in self.buffer.buffer if replay else ():
            if not record.getMessage().startswith("💡 Tip"):
                logging.getLogger(record.name).handle(record)
        self.buffer = None


@contextmanager
def _held_startup_messages():
    messages = _StartupMessages()
    try:
        yield messages
    finally:
        messages.restore(replay=False)  # a failure before the checks passed: only its error line


def writable_folder(path, option: str) -> Path:
    """``path`` created if needed and proven writable, or UsageError naming ``option``.

    Not a jsonargparse path type on purpose: the options it checks (``trainer.default_root_dir``, a logger's
    ``save_dir``) are typed by Lightning's own signatures; ``Path_dc`` refuses a new folder whose parent does
    not exist yet (``runs/idrs/...`` must work) and creates nothing; ``Path_dw`` needs the folder to exist.
    Writability is proven with a real temporary file, which also catches read-only mounts."""
    import tempfile

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UsageError(f"{option} {path} is not a writable folder ({error.strerror or error}); "
                         "choose another one") from None
    return folder


class IDRSCLI(LightningCLI):
    """LightningCLI that feeds data properties to the model and keeps all output in one folder."""

    def __init__(self, *args, checkpoint_model=None, checkpoint=None, checkpoint_path=None, startup_messages=None,
                 **kwargs):
        self.checkpoint_model = checkpoint_model  # validate/test: the model of --ckpt_path
        self.checkpoint = checkpoint or {}  # ... and its checkpoint dict (W&B lineage)
        self.checkpoint_path = checkpoint_path
        self.startup_messages = startup_messages  # released once the checks have passed
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs):
        """LightningCLI's parser, whose ``--config`` also takes a packaged config's name (digits, rs, ...)."""
        kwargs.setdefault("dump_header", [f"pytorch_lightning=={pl.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=config_file_action(),
                            help="a YAML config: a packaged name (digits, mnist, mnist5k, cifar10, rs) or a path; "
                            "several stack key by key, later ones win.")
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        """The subcommand, then its W&B runs finished, whether it succeeded or not (the command owns them)."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            finish_runs(self.trainer, failed=True)
            raise
        finish_runs(self.trainer)

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("input_shape", "num_classes", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """The output folder is writable; loggers write under it; W&B online only if it can."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("weights_only") is False:
            raise UsageError("--weights_only false is not supported: checkpoints are read with the safe unpickler")
        root = writable_folder(config.trainer.get("default_root_dir") or ".", "--trainer.default_root_dir")
        if self.subcommand in EVALUATE:  # its own folder: the fit run's config.yaml and W&B run stay as they are
            root = writable_folder(root / self.subcommand, "--trainer.default_root_dir")
            config.trainer.default_root_dir = str(root)
        keep_run_files_under(root, wandb=False)  # e.g. the Callback's plots: matplotlib's cache
        for logger in _loggers(config.trainer):
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is None:
                continue
            if init_args.get("save_dir") in (None, ".", "./"):
                init_args["save_dir"] = str(root)
            if str(logger.get("class_path", "")).endswith("WandbLogger"):
                self._prepare_wandb(logger, config)

    def _prepare_wandb(self, logger, config) -> None:
        init_args = logger["init_args"]
        folder = writable_folder(init_args["save_dir"], "--trainer.logger.save_dir")
        init_args["save_dir"] = str(folder.resolve())  # W&B's service writes files too, from its own folder
        keep_run_files_under(folder)
        init_args["offline"] = wandb_offline(bool(init_args.get("offline")))
        model = (dict(self.checkpoint_model.hparams) if self.checkpoint_model is not None
                 else config.model.as_dict() if hasattr(config.model, "as_dict") else dict(config.model or {}))
        data_class = str(config.data.get("class_path", "") if config.get("data") else "")
        dataset = data_class.rsplit(".", 1)[-1].lower().replace("datamodule", "") or None
        logger["class_path"] = prepare_logger(
            init_args, subcommand=self.subcommand, dataset=dataset, model=model, seed=config.get("seed_everything"),
            lineage=self.checkpoint.get(LINEAGE_KEY), checkpoint_path=self.checkpoint_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:  # a constructor refused its arguments
            raise UsageError(one_line(error)) from None
        if self.checkpoint_model is not None:
            self.model = self.checkpoint_model

    def after_instantiate_classes(self) -> None:
        """Data present, model and data agree, sigma(x) usable: checked before any logger starts."""
        if self.subcommand not in ("fit", "validate", "test"):
            return
        datamodule, model = self.datamodule, self.model
        try:
            if getattr(datamodule, "download", False):
                datamodule.prepare_data()
        except Exception as error:  # torchvision raises anything from URLError to RuntimeError
            raise UsageError(f"cannot download the {datamodule.name} data into {datamodule.root!r}: "
                             f"{one_line(error)[:400]}; check the network, or put the files there yourself") from None
        model.to(self.trainer.strategy.root_device)
        try:
            model.attach_data(datamodule)
        except DataNotFoundError as error:
            raise UsageError(one_line(error)) from None
        except UsageError:  # already says what is wrong (e.g. no faiss installed)
            raise
        except ValueError as error:
            raise UsageError(f"the model and the data do not fit together: {one_line(error)}") from None
        if self.subcommand == "fit":
            model.check_training_sigma(datamodule)
            model.check_compile()
        if self.startup_messages is not None:
            self.startup_messages.restore(replay=True)

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and self.trainer.is_global_zero:
            path = callback.best_model_path or callback.last_model_path
            print(f"best checkpoint: {os.path.abspath(path) if path else None}", flush=True)


def _pop_option(argv: list, name: str):
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv``; returns VALUE (the last one) or None.

    Kept (not a parser option) on purpose: validate/test take their data module from the checkpoint,
    which must be read, with the safe unpickler, before LightningCLI builds its parser and its defaults."""
    value, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    argv[:] = rest
    return value


def cli_main(args=None) -> IDRSCLI:
    """Run LightningCLI on ``args`` (``[subcommand, options...]``) and return it."""
    args = list(args) if args is not None else sys.argv[1:]
    checkpoint_model, checkpoint, ckpt_path, evaluated = None, None, None, None
    if args and args[0] in EVALUATE:
        options = args[1:]
        ckpt_path = _pop_option(options, "--ckpt_path")
        if ckpt_path:
            checkpoint_model, checkpoint, sha256 = load_model(ckpt_path)
            evaluated = {"path": os.path.abspath(ckpt_path), "sha256": sha256, "checkpoint": checkpoint}  # W&B
            args = [args[0], "--data=" + json.dumps(datamodule_config(checkpoint)), *options]
    elif args and args[0] == "fit":
        resume = _pop_option(list(args), "--ckpt_path")
        if resume and resume not in ("last", "hpc", "registry"):  # Lightning resolves those itself, safely
            read_checkpoint(resume)  # the safe unpickler; one clear line if the file is refused
    # we always pass the (resolved) command line as args: Lightning's warning about it does not apply
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    subcommand_defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
    with _held_startup_messages() as messages:
        return IDRSCLI(
            IDRSClassifier,
            IDRSDataModule,
            subclass_mode_data=True,
            args=args,
            checkpoint_model=checkpoint_model,
            checkpoint=checkpoint,
            checkpoint_path=ckpt_path,
            startup_messages=messages,
            save_config_callback=WandbConfigCallback,
            parser_kwargs={"prog": "python -m lightning_idrs", "exit_on_error": False,
                           **{name: {**subcommand_defaults, "exit_on_error": False}
                              for name in ("fit", "validate", "test", "predict")}},
            save_config_kwargs={"overwrite": True, "evaluated": evaluated},
        )


def main(argv=None) -> int:
    """``python -m lightning_idrs fit|validate|test ...``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(cli_main, sys.argv[1:] if argv is None else list(argv))
