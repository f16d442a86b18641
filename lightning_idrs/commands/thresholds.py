"""``python -m lightning_idrs thresholds``: the curse-of-dimensionality table (Thm. 2.4, docs/math.md)."""
from __future__ import annotations

import argparse
import sys

from lightning_idrs.radius import sigma_ratio_bounds
from lightning_idrs.validation import UsageError

PAPER_DIMS = {"MNIST": 784, "CIFAR10": 3072, "ImageNet": 196608}
PAPER_P_B = (0.1, 0.01, 0.001, 0.00007)


def format_table(dims: dict, p_b) -> str:
    """Lower (and upper) thresholds on sigma1/sigma0 beyond which no point can be certified."""
    lines = ["Thresholds on sigma1/sigma0, lower / upper (Thm. 2.4): outside them x1 is never certified.",
             f"{'data (N)':<20}" + "".join(f"{f'pB={p:g}':>18}" for p in p_b)]
    for name, dim in dims.items():
        lower, upper = sigma_ratio_bounds(list(p_b), dim)
        cells = "".join(f"{lo:>10.3f} / {up:<5.3f}" for lo, up in zip(lower, upper))
        lines.append(f"{f'{name} ({dim})':<20}{cells}")
    return "\n".join(lines)


def _table(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_idrs thresholds", description=__doc__,
                                     exit_on_error=False)
    parser.add_argument("--dim", type=int, nargs="+", help="input dimensions (default: the paper's)")
    parser.add_argument("--p-b", type=float, nargs="+", default=list(PAPER_P_B), help="runner-up probabilities")
    args = parser.parse_args(argv)
    dims = {f"N={d}": d for d in args.dim} if args.dim else PAPER_DIMS
    try:
        print(format_table(dims, args.p_b))
    except ValueError as error:
        raise UsageError(str(error)) from None
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs thresholds``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(_table, sys.argv[1:] if argv is None else list(argv))
