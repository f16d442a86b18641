"""Sequential vs fixed-n certification on the default digits checkpoint (n = 100,000, alpha = 0.001).

    python benchmarks/bench_sequential.py                 # 100 test points, trains the checkpoint first
    python benchmarks/bench_sequential.py --points 360    # the whole digits test split

Prints the forward passes (noise samples, selection included) and wall time of both modes on the
same points, and certified accuracy at each grid radius for both. Targets: >= 5x fewer forward
passes; every grid accuracy within 0.02 of fixed n. Results go to benchmarks/README.md.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_idrs.reporting import SUMMARY_NAME, read_summary
from lightning_idrs.statistics import certified_accuracy
from lightning_idrs.tsv_log import TSV_NAME, read_tsv

GRID = [0.25, 0.5, 0.75, 1.0]


def command(*args, cwd):
    env = dict(os.environ, WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "lightning_idrs", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100, help="test points (every one from the start)")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--checkpoint", help="a digits checkpoint (default: train the default config now)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = args.checkpoint
        if checkpoint is None:
            printed = command("fit", "--trainer.logger", "false", "--trainer.default_root_dir", "fit",
                              "--trainer.enable_progress_bar", "false", cwd=folder)
            checkpoint = printed.split("best checkpoint: ")[-1].strip()
        results = {}
        for mode, extra in (("fixed", []), ("sequential", ["--certify.sequential", "true"])):
            start = time.perf_counter()
            command("certify", "--ckpt_path", checkpoint, "--certify.n", str(args.n), "--certify.max",
                    str(args.points), "--certify.out", mode, "--certify.radii", ",".join(map(str, GRID)),
                    "--wandb.mode", "disabled", *extra, cwd=folder)
            tsv, summary = read_tsv(folder / mode / TSV_NAME), read_summary(folder / mode / SUMMARY_NAME)
            passes = int(tsv["samples"].sum()) + summary["n0"] * len(tsv["idx"])
            results[mode] = (tsv, passes, time.perf_counter() - start)
        (fixed, f_passes, f_time), (seq, s_passes, s_time) = results["fixed"], results["sequential"]
        assert np.array_equal(fixed["idx"], seq["idx"])
        print(f"{len(fixed['idx'])} digits test points, n = {args.n:,}, alpha = 0.001, grid {GRID}")
        print(f"forward passes: fixed {f_passes:,}, sequential {s_passes:,}: {f_passes / s_passes:.1f}x fewer "
              f"(target >= 5x); wall time {f_time:.0f} s vs {s_time:.0f} s ({f_time / s_time:.1f}x)")
        stops = dict(zip(*np.unique(seq["samples"], return_counts=True)))
        print("sequential stops (samples: points): " + ", ".join(f"{k:,}: {v}" for k, v in sorted(stops.items())))
        grid = [0.0, *GRID]
        acc_f = certified_accuracy(fixed["radius"], fixed["correct"], grid)
        acc_s = certified_accuracy(seq["radius"], seq["correct"], grid)
        for radius, a, b in zip(grid, acc_f, acc_s):
            print(f"  certified accuracy at R = {radius:<4}: fixed {a:.3f}, sequential {b:.3f}, difference {b - a:+.3f}")
        worst = np.abs(acc_s - acc_f).max()
        print(f"largest difference {worst:.3f} (target <= 0.02); ACR fixed "
              f"{np.mean(fixed['radius'] * fixed['correct']):.4f}, sequential {np.mean(seq['radius'] * seq['correct']):.4f}")


if __name__ == "__main__":
    main()
