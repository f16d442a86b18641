"""``python -m lightning_idrs table FOLDER...``: a results table of certify runs, Markdown or LaTeX.

    python -m lightning_idrs table runs/rs/certify runs/idrs/certify [--radii 0,0.25,0.5,1]
        [--format markdown|latex] [--out table.md]

One row per certify output folder (its label: data set, RS/IDRS, sigma_b, r), columns n, points, ACR and
certified accuracy at the radii, the best value of each column in bold. The table is
:mod:`lightning_idrs.results_table`'s; this command only parses its options.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning_idrs.arguments import RadiusList, UsageError
from lightning_idrs.results_table import FORMATS


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs table", default_env=False, exit_on_error=False,
                            description="A results table (Markdown or LaTeX, best value of each column in bold) of "
                            "the certify output folders given, one row per folder.")
    parser.add_argument("folders", nargs="+", help="certify output folders (each with summary.json and certify.tsv).")
    parser.add_argument("--radii", type=Optional[RadiusList], default=None,
                        help="radii of the certified-accuracy columns, e.g. 0,0.25,0.5,1 (default: the report grid "
                        "the runs share, else 0,0.25,0.5,0.75,1).")
    parser.add_argument("--format", type=str, default="markdown", help=f"one of {', '.join(FORMATS)}.")
    parser.add_argument("--digits", type=int, default=3, help="decimals of the values.")
    parser.add_argument("--out", type=Optional[str], default=None, help="write the table there too (else stdout only).")
    return parser


def run(argv) -> int:
    from lightning_idrs.results_table import results_table

    cfg = build_parser().parse_args(list(argv))
    if not 0 <= cfg.digits <= 10:
        raise UsageError(f"--digits must be an integer from 0 to 10, got {cfg.digits}")
    if cfg.out and Path(cfg.out).is_dir():
        raise UsageError(f"--out {cfg.out} is a folder; name a file, e.g. table.md")
    text = results_table(cfg.folders, cfg.radii, cfg.format, cfg.digits)
    if cfg.out:
        from lightning_idrs.jsonfiles import write_text_atomic

        try:
            write_text_atomic(cfg.out, text)
        except OSError as error:
            raise UsageError(f"--out {cfg.out}: cannot write ({error.strerror or error}); choose another file") from None
    print(text, end="", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs table``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(run, sys.argv[1:] if argv is None else list(argv))
