"""The kNN backends of KnnSigma side by side: faiss' GPU index, torch (on CUDA when there is one, else
the CPU) and faiss on the CPU, on the same random CIFAR-sized data; one table.

    python benchmarks/bench_knn_gpu.py                      # 50,000 x 3,072 training points, 10,000 queries, k = 20
    python benchmarks/bench_knn_gpu.py --n-train 5000 --dim 256 --n-query 1000   # a small run (CPU machines)

Per backend: ``KnnSigma.fit`` with m = None (the index and the sigma of every training point, itself
excluded: what ``fit`` pays before the first step), the queries, and the agreement with faiss on the
CPU (max |difference| of sigma(x), and whether sigma and the float64 distances are bit-identical).
Backends on a GPU run the full sizes; CPU backends the first ``--cpu-rows`` training points and
queries (their full-size times are extrapolated, marked ``~``; ``--cpu-rows 0`` runs them in full).
The agreement is measured on those rows, with one m for every backend. A backend that cannot run here
(no CUDA, no GPU build of faiss) is a ``skip`` column that says why. The GPU timings are taken warm,
after a small fit has started CUDA, cuBLAS and faiss' GPU resources (that start-up is printed too).
Random uniform data (CIFAR's pixel range) has no near-duplicates: real data sets take the float64
fallback for more rows.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    from lightning_idrs import KnnSigma
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_idrs import KnnSigma
from lightning_idrs.arguments import UsageError
from lightning_idrs.knn import faiss_build, faiss_has_gpu


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, *args, **kwargs):
    sync(device)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - start


def columns(args):
    """(name, knn_backend, device, reason to skip or None) of every backend compared."""
    cuda = torch.cuda.is_available()
    try:
        gpu_faiss = faiss_has_gpu()
        faiss_reason = None if gpu_faiss else f"the installed faiss has no GPU index here ({faiss_build()})"
    except UsageError as error:
        faiss_reason = str(error).split("; fix:")[0]
    return [
        ("faiss GPU", "faiss", "cuda", "no CUDA device" if not cuda else faiss_reason),
        ("torch CUDA" if cuda else "torch CPU", "torch", "cuda" if cuda else "cpu", None),
        ("faiss CPU", "faiss", "cpu", None),
    ]


def run(name, backend, device, train, queries, args):
    """Times and distances of one backend: dict with fit_s, train_s, query_s, rows (training rows timed),
    dist_train [rows] and dist_query [queries timed] (float64, CPU), and the start-up time."""
    full = device != "cpu" or args.cpu_rows == 0
    rows = len(train) if full else min(args.cpu_rows, len(train))
    nq = len(queries) if full else min(args.cpu_rows, len(queries))
    result = {"full": full, "rows": rows, "nq": nq}
    make = lambda m=None: KnnSigma(args.sigma_base, args.r, args.k, m=m, knn_backend=backend).to(device)  # noqa: E731
    if device != "cpu":  # warm-up: CUDA context, cuBLAS, faiss' GPU resources
        _, result["startup_s"] = timed(device, make().fit, train[: min(2000, len(train))])
    if full:
        sigma, result["fit_s"] = timed(device, make().fit, train)  # index + every training sigma (m = None)
        result["dist_train"] = sigma._train_dist.cpu()
    else:
        sigma, result["index_s"] = timed(device, make(0.0).fit, train, cache_training=False)
        index = sigma._index
        dist, seconds = timed(device, index.training_neighbour_distance, torch.arange(rows), args.k,
                              sigma.candidate_margin, torch.device(device), sigma.statistic, backend)
        result["dist_train"], result["train_s"] = dist.cpu(), seconds * len(train) / rows
        result["fit_s"] = result["index_s"] + result["train_s"]
    dist, result["query_s"] = timed(device, sigma.neighbour_distance, queries[:nq].to(device))
    result["dist_query"] = dist.cpu()
    result["qps"] = nq / result["query_s"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--cpu-rows", type=int, default=1000,
                        help="training points and queries a CPU backend searches (times extrapolated); 0: all")
    parser.add_argument("--sigma-base", type=float, default=0.25)
    parser.add_argument("--r", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); faiss: {faiss_build()}")
    print(f"sizes: {args.n_train:,} training points x dim {args.dim:,}, {args.n_query:,} queries, k = {args.k}; CPU "
          f"backends: {'all' if args.cpu_rows == 0 else f'the first {args.cpu_rows:,}'} training points and queries")
    generator = torch.Generator().manual_seed(args.seed)
    train = torch.rand(args.n_train, args.dim, generator=generator)  # on the CPU, as `fit` hands it over
    queries = torch.rand(args.n_query, args.dim, generator=generator)

    results = {}
    for name, backend, device, reason in columns(args):
        if reason is not None:
            print(f"skip {name}: {reason}")
            continue
        try:
            results[name] = run(name, backend, device, train, queries, args)
        except UsageError as error:
            print(f"skip {name}: {error}")
        print(f"done {name}", flush=True)
    reference = results.get("faiss CPU")

    def cell(result, key):
        if key == "fit":
            if result["full"]:
                return f"{result['fit_s']:.2f}"
            return f"~{result['fit_s']:.2f} ({result['index_s']:.2f} + {result['rows']:,} rows)"
        if key == "queries":
            return f"{result['qps']:,.0f}/s ({result['nq']:,})"
        if key == "startup":
            return f"{result['startup_s']:.2f}" if "startup_s" in result else "-"
        if reference is None:
            return "no reference"
        rows, nq = min(result["rows"], reference["rows"]), min(result["nq"], reference["nq"])
        dist = torch.cat([result["dist_train"][:rows], result["dist_query"][:nq]])
        ref = torch.cat([reference["dist_train"][:rows], reference["dist_query"][:nq]])
        m = float(ref.mean())  # one m for every backend: the same sigma function
        sigma = (args.sigma_base * torch.exp(args.r * (dist - m))).float()
        ref_sigma = (args.sigma_base * torch.exp(args.r * (ref - m))).float()
        if key == "delta":
            return f"{float((sigma.double() - ref_sigma.double()).abs().max()):.1e} ({rows + nq:,} points)"
        return ("yes" if torch.equal(sigma, ref_sigma) else "no") + " / " + ("yes" if torch.equal(dist, ref) else "no")

    names = list(results)
    table = [("KnnSigma.fit, m = None: index + training sigmas (s)", "fit"), ("queries", "queries"),
             ("CUDA start-up, first small fit (s)", "startup"), ("max abs(sigma - faiss CPU's sigma)", "delta"),
             ("bit-identical to faiss CPU: sigma / float64 distance", "same")]
    print()
    print("| measure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for label, key in table:
        print(f"| {label} | " + " | ".join(cell(results[name], key) for name in names) + " |")
    print("\n~: extrapolated from the rows searched (the index build itself is measured in full)")


if __name__ == "__main__":
    main()
