"""``python -m lightning_idrs fit|validate|test``: LightningCLI over IDRSClassifier + a datamodule.

Every knob is a YAML key or a flag (``--model.sigma_base 0.5``, ``--trainer.max_epochs 5``). The
default configuration ships inside the package (``lightning_idrs/configs/digits_idrs.yaml``), so
``python -m lightning_idrs fit`` works from any directory with no arguments.
"""
from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.cli import LightningCLI

from lightning_idrs.data import IDRSDataModule
from lightning_idrs.module import IDRSClassifier

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "digits_idrs.yaml"


def _loggers(trainer_config):
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        return logger
    return [logger] if logger is not None and not isinstance(logger, bool) else []


class IDRSCLI(LightningCLI):
    """LightningCLI that feeds data properties to the model and keeps all output in one folder."""

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

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and self.trainer.is_global_zero:
            path = callback.best_model_path or callback.last_model_path
            print(f"best checkpoint: {os.path.abspath(path) if path else None}", flush=True)


def cli_main(args=None) -> IDRSCLI:
    subcommand_defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
    return IDRSCLI(
        IDRSClassifier,
        IDRSDataModule,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={"prog": "python -m lightning_idrs", **{name: subcommand_defaults for name in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True},
    )
