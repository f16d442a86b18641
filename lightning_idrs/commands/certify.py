"""``python -m lightning_idrs certify``: parse the options and launch :func:`lightning_idrs.certify`.

    python -m lightning_idrs certify --ckpt_path CKPT [--config CFG ...] [--data.root DIR]
        [--certify.n0 100] [--certify.n 100000] [--certify.alpha 0.001] [--certify.seed 0] ...
        [--certify.devices 1] [--certify.num_nodes 1] [--wandb.mode offline|online|disabled]

One jsonargparse parser in LightningCLI's style: every option is typed (``--help`` shows them in
the groups checkpoint, certify, distributed and wandb), ``--config`` files (a packaged name such as
``digits``, a path, or a YAML string) are applied in order and stack key by key, flags given after
them win, and ``--print_config`` prints the result. A fit config can be passed as it is: its ``data:``
section replaces the checkpoint's data module, its ``certify:`` / ``wandb:`` sections set those
options, and fit's own sections (trainer, model, ...) are ignored. The job itself (load, certify,
write, report) is :mod:`lightning_idrs.certification`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional

from lightning_idrs.arguments import RadiusList, UsageError
from lightning_idrs.certification import CertifyOptions, WandbOptions
from lightning_idrs.commands import config_file_action

#: The options of CertifyOptions shown in the "distributed" group (still --certify.NAME).
DISTRIBUTED = ("accelerator", "devices", "num_nodes", "strategy", "precision", "device")
#: Sections of a fit config that certify accepts and ignores, so the same file serves both commands.
FIT_SECTIONS = ("seed_everything", "trainer", "model", "optimizer", "lr_scheduler")


def _check_config(values: str) -> None:
    """A --config value is an existing file holding a mapping, or a YAML string."""
    from lightning_idrs.commands import CONFIGS

    if not Path(values).is_file() and not any(c in values for c in ":{\n"):  # not a YAML mapping
        raise UsageError(f"--config: no such file: {values} (a path, a YAML string, or one of the "
                         f"packaged configs {', '.join(sorted(p.stem for p in CONFIGS.glob('*.yaml')))})")
    if Path(values).is_file():
        _check_mapping(values)


def _check_mapping(path: str) -> None:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise UsageError(f"--config {path} is not a readable YAML file: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(config, (dict, type(None))):
        raise UsageError(f"--config {path} must hold a YAML mapping (ckpt_path:, data:, certify:, wandb:), "
                         f"got a {type(config).__name__}")


def _field_help(cls) -> dict:
    import docstring_parser

    return {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__ or "").params}


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs certify", default_env=False, exit_on_error=False,
                            description="Certify a trained lightning_idrs checkpoint (Cohen et al.'s CERTIFY), "
                            "writing certify.tsv, summary.json, certified_accuracy.png and a W&B run.")
    parser.add_argument("--config", action=config_file_action(_check_config), help="a YAML config: a packaged name (digits, mnist, "
                        "cifar10, rs), a path or a YAML string; several stack key by key, later ones win.")
    checkpoint = parser.add_argument_group("checkpoint", "the model to certify and its data")
    checkpoint.add_argument("--ckpt_path", type=Optional[str], default=None, help="checkpoint written by `fit`.")
    checkpoint.add_argument("--data.class_path", type=Optional[str], default=None,
                            help="another data module class than the checkpoint's.")
    checkpoint.add_argument("--data.init_args", type=Optional[dict], default=None,
                            help="arguments of the data module (replace the checkpoint's).")
    checkpoint.add_argument("--data.root", type=Optional[str], default=None, help="override only the data root.")
    parser.add_class_arguments(CertifyOptions, "certify", skip={*DISTRIBUTED, "radii"}, fail_untyped=True)
    parser.groups["certify"].add_argument(  # typed so that 0.25,0.5 parses as it always did
        "--certify.radii", type=Optional[RadiusList], default=None, help="the report grid, e.g. 0,0.25,0.5,0.75,1.0 or "
        "[0.25, 0.5]: the scalars (acc_R0p25, ...), the radii printed and sequential's decision grid (default: the "
        "data set's report_radii); the curve adds radii_step's grid.")
    distributed = parser.add_argument_group("distributed", "where the points are certified (Lightning Fabric); "
                                            "rows do not depend on it")
    hints, helps = _typed_fields(CertifyOptions), _field_help(CertifyOptions)
    for name in DISTRIBUTED:
        distributed.add_argument(f"--certify.{name}", type=hints[name][0], default=hints[name][1], help=helps.get(name))
    parser.add_class_arguments(WandbOptions, "wandb")
    for section in FIT_SECTIONS:  # a fit config's other sections: accepted, ignored
        parser.add_argument(f"--{section}", type=Optional[Any], default=None, help=argparse.SUPPRESS)
    return parser


def _typed_fields(cls) -> dict:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default if f.default is not MISSING else None) for f in fields(cls)}


def parse_args(argv):
    """The parsed namespace (jsonargparse), checked for a checkpoint."""
    cfg = build_parser().parse_args(list(argv))
    if not cfg.ckpt_path:
        raise UsageError("--ckpt_path is required (a checkpoint written by `python -m lightning_idrs fit`)")
    return cfg


def run(cfg) -> int:
    """Launch the job of ``cfg`` (SIGTERM stops it like Ctrl-C: resumable)."""
    import signal

    from lightning_idrs.certification import certify
    from lightning_idrs.launching import terminate_as_interrupt

    data = None
    if cfg.data.class_path or cfg.data.init_args:
        data = {"class_path": cfg.data.class_path, "init_args": dict(cfg.data.init_args or {})}
    previous = terminate_as_interrupt()
    try:
        certify(cfg.ckpt_path, data=data, data_root=cfg.data.root, wandb=WandbOptions(**vars(cfg.wandb)),
                **vars(cfg.certify))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs certify``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(lambda args: run(parse_args(args)), sys.argv[1:] if argv is None else list(argv))


__all__ = ["CertifyOptions", "WandbOptions", "build_parser", "main", "parse_args"]
