"""Time certified_radius per point (issue target: < 1 ms/point, 1,000 points, dim 3072, r = 0.01).

Run by hand:  python benchmarks/bench_radius.py [--points 1000] [--dim 3072] [--r 0.01]
Prints ms per point for IDRS and, for scale, Cohen's closed form, and their ratio.
"""
import argparse
import time

import numpy as np

from lightning_idrs import certified_radius


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--r", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # p_a_lower as Clopper-Pearson bounds of n = 100,000 samples would give, sigma around 0.12-1
    p_a_lower = rng.uniform(0.5, 0.99993, args.points)
    sigma = rng.uniform(0.12, 1.0, args.points)

    def best_time(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    idrs = best_time(lambda: certified_radius(p_a_lower, sigma, args.r, args.dim))
    cohen = best_time(lambda: certified_radius(p_a_lower, sigma))
    radius = certified_radius(p_a_lower, sigma, args.r, args.dim)
    ratio = radius / certified_radius(p_a_lower, sigma)
    print(f"points={args.points} dim={args.dim} r={args.r}")
    print(f"IDRS : {1e3 * idrs / args.points:.3f} ms/point (target < 1 ms/point)")
    print(f"Cohen: {1e3 * cohen / args.points:.5f} ms/point; IDRS/Cohen time ratio {idrs / cohen:.0f}x")
    print(f"IDRS radius / Cohen radius: min {ratio.min():.4f}, median {np.median(ratio):.4f}")


if __name__ == "__main__":
    main()
