"""``python -m lightning_idrs predict``: Cohen et al.'s PREDICT with abstention, on a split or on files.

    python -m lightning_idrs predict --ckpt_path CKPT [--predict.split test] [--predict.max 100]
    python -m lightning_idrs predict --ckpt_path CKPT digit.png batch.npy [--predict.n 100000] [--predict.alpha 0.001]

Writes one TSV (``--predict.out``): ``idx, label, predict, correct, sigma`` for a split, ``file, index, predict,
sigma`` for files; ``predict`` is -1 where PREDICT abstains. The job is :mod:`lightning_idrs.prediction`'s.
"""
from __future__ import annotations

import sys
from typing import Optional

from lightning_idrs.prediction import IMAGE_SUFFIXES, PredictOptions

DESCRIPTION = ("Cohen et al.'s PREDICT with abstention: the smoothed classifier's class of each input (n noisy "
               "copies at its sigma(x); -1, abstain, unless a binomial test at level alpha says which class wins), "
               "for the points of a data split or for image files (" + ", ".join(IMAGE_SUFFIXES) + ", pixels "
               "0-255) and NumPy .npy arrays ([C, H, W] or a batch [B, C, H, W], floats in [0, 1]). Writes a TSV: "
               "idx, label, predict, correct, sigma (a split) or file, index, predict, sigma (files). Bad input: "
               "one 'error:' line, exit code 2, nothing written.")


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs predict", default_env=False, exit_on_error=False,
                            description=DESCRIPTION)
    parser.add_argument("inputs", nargs="*", default=[], help="image or .npy files to predict (none: the split's points).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="checkpoint written by `fit`.")
    parser.add_argument("--data.root", type=Optional[str], default=None, help="the data root, if not the checkpoint's.")
    parser.add_class_arguments(PredictOptions, "predict", fail_untyped=True)
    return parser


def run(argv) -> int:
    from lightning_idrs.arguments import UsageError
    from lightning_idrs.prediction import predict

    cfg = build_parser().parse_args(list(argv))
    if not cfg.ckpt_path:
        raise UsageError("--ckpt_path is required (a checkpoint written by `python -m lightning_idrs fit`)")
    rows = predict(cfg.ckpt_path, cfg.inputs, data_root=cfg.data.root, **vars(cfg.predict))
    decided = rows["predict"] >= 0
    line = f"predicted {len(decided)} input(s): abstained on {int((~decided).sum())}"
    if "correct" in rows:
        line += f", smoothed accuracy {rows['correct'].mean():.3f}"
    print(f"{line}; wrote {rows['out']}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs predict``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(run, sys.argv[1:] if argv is None else list(argv))
