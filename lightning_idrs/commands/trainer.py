"""``python -m lightning_idrs fit|validate|test``: LightningCLI over IDRSClassifier + a datamodule.

Every knob is a YAML key or a flag (``--model.sigma.sigma_base 0.5``, ``--trainer.max_epochs 5``). The
configs ship inside the package (``lightning_idrs/configs``): ``digits.yaml`` is the default, so
``python -m lightning_idrs fit`` works from any directory with no arguments, and a packaged config
can be named without its path: ``--config cifar10 --config rs``.

``validate`` / ``test --ckpt_path CKPT`` evaluate the checkpoint's model (read by the one loader,
:mod:`lightning_idrs.checkpoint`) on the checkpoint's own data module; ``--data.*`` flags and a
``--config`` with a ``data:`` section override it.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from pytorch_lightning.cli import LightningCLI

from lightning_idrs.checkpoint import datamodule_config, load_model
from lightning_idrs.data import IDRSDataModule
from lightning_idrs.module import IDRSClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "digits.yaml"
EVALUATE = ("validate", "test")


def _loggers(trainer_config):
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        return logger
    return [logger] if logger is not None and not isinstance(logger, bool) else []


class IDRSCLI(LightningCLI):
    """LightningCLI that feeds data properties to the model and keeps all output in one folder."""

    def __init__(self, *args, checkpoint_model=None, **kwargs):
        self.checkpoint_model = checkpoint_model  # validate/test: the model of --ckpt_path
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("input_shape", "num_classes", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Loggers write under ``--trainer.default_root_dir`` unless given a save_dir of their own."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or "."
        for logger in _loggers(config.trainer):
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is not None and init_args.get("save_dir") in (None, ".", "./"):
                init_args["save_dir"] = str(root)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.checkpoint_model is not None:
            self.model = self.checkpoint_model

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and self.trainer.is_global_zero:
            path = callback.best_model_path or callback.last_model_path
            print(f"best checkpoint: {os.path.abspath(path) if path else None}", flush=True)


def packaged_config(value: str) -> str:
    """``value`` itself, or the packaged config it names (``rs`` -> .../configs/rs.yaml)."""
    candidate = CONFIGS / f"{value}.yaml"
    if not Path(value).exists() and os.sep not in value and candidate.is_file():
        return str(candidate)
    return value


def _pop_option(argv: list, name: str):
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv``; returns VALUE (the last one) or None."""
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


def _resolve_configs(argv: list) -> list:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = packaged_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + packaged_config(arg.split("=", 1)[1])
    return out


def cli_main(args=None) -> IDRSCLI:
    """Run LightningCLI on ``args`` (``[subcommand, options...]``) and return it."""
    args = _resolve_configs(list(args) if args is not None else sys.argv[1:])
    checkpoint_model = None
    if args and args[0] in EVALUATE:
        options = args[1:]
        ckpt_path = _pop_option(options, "--ckpt_path")
        if ckpt_path:
            checkpoint_model, checkpoint, _ = load_model(ckpt_path)
            args = [args[0], "--data=" + json.dumps(datamodule_config(checkpoint)), *options]
    # we always pass the (resolved) command line as args: Lightning's warning about it does not apply
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    subcommand_defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
    return IDRSCLI(
        IDRSClassifier,
        IDRSDataModule,
        subclass_mode_data=True,
        args=args,
        checkpoint_model=checkpoint_model,
        parser_kwargs={"prog": "python -m lightning_idrs", "exit_on_error": False,
                       **{name: {**subcommand_defaults, "exit_on_error": False}
                          for name in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True},
    )


def main(argv=None) -> int:
    """``python -m lightning_idrs fit|validate|test ...``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(cli_main, sys.argv[1:] if argv is None else list(argv))
