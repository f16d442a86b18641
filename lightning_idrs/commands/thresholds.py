"""``python -m lightning_idrs thresholds``: the curse-of-dimensionality table (Thm. 2.4, docs/math.md).

``--plot DIR`` also writes the paper's figures to DIR: ``thresholds.md`` (the table, lower and upper
thresholds), ``thresholds.png`` (the lower threshold against N) and ``worst_case.md`` /
``worst_case.png`` (the worst-case runner-up probability xi against the distance R for several
sigma1/sigma0 on both sides of 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lightning_idrs.arguments import UsageError
from lightning_idrs.radius import sigma_ratio_bounds, worst_case_probability
from lightning_idrs.reporting import figure

PAPER_DIMS = {"MNIST": 784, "CIFAR10": 3072, "ImageNet": 196608}
PAPER_P_B = (0.1, 0.01, 0.001, 0.00007)
#: The worst-case curves: N = 3072 (CIFAR-10), sigma0 = 1, pB = 0.1, sigma1/sigma0 on both sides of 1.
CURVE_DIM, CURVE_P_B = 3072, 0.1
CURVE_RATIOS = (0.96, 0.98, 0.99, 1.0, 1.01, 1.02, 1.04)
CURVE_RADII = np.linspace(0.0, 1.5, 61)


def bounds(p_b, dim):
    """:func:`sigma_ratio_bounds`, finite for any pB in (0, 1): where 2 log(pB) / N < -30 the lower root u
    of log u + 1 - u = 2 log(pB) / N lies below e^-31, so 1 + t rounds to 0 in float64 and the solver
    returns NaN; the threshold sqrt(u) < 2e-7 is then shown as 0."""
    p_b, dim = np.broadcast_arrays(np.asarray(p_b, dtype=np.float64), np.asarray(dim, dtype=np.float64))
    with np.errstate(all="ignore"):
        lower, upper = sigma_ratio_bounds(p_b, dim)
        tiny = 2.0 * np.log(p_b) / dim < -30.0
    if np.isnan(lower[~tiny]).any() or np.isnan(upper).any():
        raise UsageError(f"the thresholds for pB {p_b.min():g} and N {dim.min():g} cannot be computed in float64")
    return np.where(np.isnan(lower) & tiny, 0.0, lower), upper


def format_table(dims: dict, p_b) -> str:
    """Lower (and upper) thresholds on sigma1/sigma0 beyond which no point can be certified."""
    lines = ["Thresholds on sigma1/sigma0, lower / upper (Thm. 2.4): outside them x1 is never certified.",
             f"{'data (N)':<20}" + "".join(f"{f'pB={p:g}':>18}" for p in p_b)]
    for name, dim in dims.items():
        lower, upper = bounds(list(p_b), dim)
        cells = "".join(f"{lo:>10.3f} / {up:<5.3f}" for lo, up in zip(lower, upper))
        lines.append(f"{f'{name} ({dim})':<20}{cells}")
    return "\n".join(lines)


def write_figures(folder: Path, dims: dict, p_b) -> list:
    """The paper's threshold table and worst-case curves as markdown and PNG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["| data (N) | " + " | ".join(f"pB = {p:g}" for p in p_b) + " |", "|---" * (len(p_b) + 1) + "|"]
    for name, dim in dims.items():
        lower, upper = bounds(list(p_b), dim)
        rows.append(f"| {name} ({dim}) | " + " | ".join(f"{lo:.3f} / {up:.3f}" for lo, up in zip(lower, upper)) + " |")
    (folder / "thresholds.md").write_text(
        "# Curse of dimensionality: thresholds on sigma1/sigma0 (Thm. 2.4)\n\n"
        "Lower / upper threshold: when sigma(x1)/sigma(x0) lies outside them, x1 is never certified,\n"
        "however close it is to x0. Written by `python -m lightning_idrs thresholds --plot DIR`.\n\n"
        + "\n".join(rows) + "\n")
    fig, ax = figure("lower threshold on sigma1/sigma0 (Thm. 2.4)", "input dimension N", "sigma1 / sigma0")
    grid = np.unique(np.round(np.logspace(1, 6, 200)))
    for p in p_b:
        ax.semilogx(grid, bounds(np.full(len(grid), p), grid)[0], label=f"pB = {p:g}")
    for name, dim in dims.items():
        ax.axvline(dim, color="grey", linewidth=0.8, linestyle=":")
        ax.text(dim, 0.05, name, rotation=90, fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower right")
    fig.savefig(str(folder / "thresholds.png"))

    fig, ax = figure(f"worst case, N = {CURVE_DIM}, pB = {CURVE_P_B:g}, sigma0 = 1", "distance R",
                      "largest runner-up probability xi(R)")
    lines = ["| R | " + " | ".join(f"s = {s:g}" for s in CURVE_RATIOS) + " |", "|---" * (len(CURVE_RATIOS) + 1) + "|"]
    table = {s: worst_case_probability(CURVE_P_B, 1.0, s, CURVE_RADII, CURVE_DIM) for s in CURVE_RATIOS}
    for s, xi in table.items():
        ax.plot(CURVE_RADII, xi, label=f"sigma1/sigma0 = {s:g}", linestyle="-" if s >= 1 else "--")
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(str(folder / "worst_case.png"))
    for i in range(0, len(CURVE_RADII), 10):
        lines.append(f"| {CURVE_RADII[i]:.3f} | " + " | ".join(f"{table[s][i]:.4f}" for s in CURVE_RATIOS) + " |")
    (folder / "worst_case.md").write_text(
        f"# Worst-case runner-up probability xi(R), N = {CURVE_DIM}, pB = {CURVE_P_B:g}, sigma0 = 1\n\n"
        "x1 at distance R keeps x0's prediction while xi(R) < 1/2. With sigma1 = sigma0 this is Cohen's\n"
        "Phi(Phi^{-1}(pB) + R); with a ratio a few percent away from 1 it jumps above 1/2 as soon as R > 0\n"
        "(the curse of dimensionality). Written by `python -m lightning_idrs thresholds --plot DIR`.\n\n"
        + "\n".join(lines) + "\n")
    return [folder / name for name in ("thresholds.md", "thresholds.png", "worst_case.md", "worst_case.png")]


def _table(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_idrs thresholds", description=__doc__,
                                     exit_on_error=False)
    parser.add_argument("--dim", type=int, nargs="+", help="input dimensions (default: the paper's)")
    parser.add_argument("--p_b", "--p-b", dest="p_b", type=float, nargs="+", default=list(PAPER_P_B),
                        help="runner-up probabilities pB in (0, 1) (--p-b is the older spelling)")
    parser.add_argument("--plot", metavar="DIR", help="also write the paper's figures (markdown + PNG) to DIR")
    args = parser.parse_args(argv)
    dims = {f"N={d}": d for d in args.dim} if args.dim else PAPER_DIMS
    try:
        print(format_table(dims, args.p_b))
        if args.plot:
            for path in write_figures(Path(args.plot), dims, args.p_b):
                print(f"wrote {path}")
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"--plot {args.plot}: {error.strerror or error}") from None
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs thresholds``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(_table, sys.argv[1:] if argv is None else list(argv))
