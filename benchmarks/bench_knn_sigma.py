"""Speed of KnnSigma (exact faiss kNN + float64 re-ranking) against a blocked torch.cdist + topk baseline.

Default sizes are CIFAR-10's: 10,000 queries against 50,000 training points of dimension 3072.
Run small with e.g. ``python benchmarks/bench_knn_sigma.py --n-train 5000 --n-query 1000``.
"""
import argparse
import os
import platform
import time

import sys
from pathlib import Path

import faiss
import torch

try:
    from lightning_idrs import KnnSigma
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_idrs import KnnSigma


def baseline_sigma(queries, train, k, sigma_base, r, m, block):
    """(sigma, mean kNN distance) via torch.cdist (float32, matmul-based) on blocks of queries, then topk."""
    mean_dist = torch.empty(len(queries))
    for i in range(0, len(queries), block):
        dist = torch.cdist(queries[i:i + block], train)
        mean_dist[i:i + block] = dist.topk(k, dim=1, largest=False).values.mean(1)
    return sigma_base * torch.exp(r * (mean_dist - m)), mean_dist


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--sigma-base", type=float, default=0.25)
    parser.add_argument("--r", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=2048, help="KnnSigma queries per search")
    parser.add_argument("--block", type=int, default=1024, help="baseline queries per cdist block")
    parser.add_argument("--train-cache", action="store_true",
                        help="also time the self-excluded sigmas of all training points (the m=None fit)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (KnnSigma queries only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} OpenMP threads), GPUs for faiss: {faiss.get_num_gpus()}")
    print(f"sizes: {args.n_query} queries x {args.n_train} training points x dim {args.dim}, k={args.k}")
    generator = torch.Generator().manual_seed(args.seed)
    train = torch.rand(args.n_train, args.dim, generator=generator)  # CIFAR-like pixel range [0, 1]
    queries = torch.rand(args.n_query, args.dim, generator=generator)

    m = 0.0  # a given m: the timed fit only builds the index (no kNN over the training set)
    sigma = KnnSigma(args.sigma_base, args.r, args.k, m=m, batch_size=args.batch_size)
    start = time.perf_counter()
    sigma.fit(train, cache_training=False)
    fit_s = time.perf_counter() - start
    print(f"KnnSigma.fit (fingerprint + exact index, m given): {fit_s:.2f} s")

    sigma.to(args.device)
    start = time.perf_counter()
    ours_dist = sigma.neighbour_distance(queries.to(args.device)).cpu()  # forward() = this + the formula
    ours = sigma.sigma_from_distance(ours_dist).float()
    ours_s = time.perf_counter() - start
    print(f"KnnSigma queries: {ours_s:.2f} s ({args.n_query / ours_s:.0f} queries/s)")

    start = time.perf_counter()
    base, base_dist = baseline_sigma(queries, train, args.k, args.sigma_base, args.r, m, args.block)
    base_s = time.perf_counter() - start
    print(f"torch.cdist + topk baseline (float32, block {args.block}): {base_s:.2f} s "
          f"({args.n_query / base_s:.0f} queries/s)")
    print(f"ratio baseline / KnnSigma time: {base_s / ours_s:.2f}x (> 1: KnnSigma is faster)")
    dist_rel = ((ours_dist - base_dist.double()).abs() / ours_dist).max().item()
    sigma_rel = ((ours.double() - base.double()).abs() / ours.double()).max().item()
    print(f"agreement: max relative difference {dist_rel:.2e} in mean kNN distance, {sigma_rel:.2e} in sigma")

    if args.train_cache:
        start = time.perf_counter()
        sigma.cpu()._cache_training()
        print(f"self-excluded training sigmas ({args.n_train} points): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
