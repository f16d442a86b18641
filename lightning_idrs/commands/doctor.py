"""``python -m lightning_idrs doctor [--gpu]``: is this installation sound, and does the GPU path work?

Always (a few seconds on a CPU): the versions of Python and the libraries, who owns the ``faiss``
module (exactly one wheel may), the devices, the exact kNN against a float64 brute force on a random
set, and two points certified on the CPU with a tiny random model in fp32 and bf16, rows compared.

With ``--gpu``, on a machine with a CUDA GPU: faiss' GPU build present, the kNN on the GPU equal to
the CPU one on a random set, 10 points certified on the GPU in fp32 and in bf16 with the rows
compared, and the throughput of ResNet-110 (CIFAR-sized inputs) at n = 10,000 in fp32 and bf16.
Without a GPU it says so and stops after the CPU part. Exit code 0 when no check failed, 1 when one
did (each ``FAIL`` line says which and what to do), 2 on a bad argument.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from importlib import metadata

import numpy as np
import torch

import lightning_idrs
from lightning_idrs.knn import KnnIndex, faiss_has_gpu, import_faiss
from lightning_idrs.models import build_model
from lightning_idrs.sigma import ConstantSigma, KnnSigma
from lightning_idrs.smoothing import ABSTAIN, SmoothedClassifier, use_channels_last
from lightning_idrs.arguments import UsageError

LIBRARIES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "jsonargparse", "numpy", "scipy",
             "scikit-learn", "matplotlib", "wandb", "filelock", "mlxtend")
FAISS_WHEELS = ("faiss-cpu", "faiss-cuda", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cuvs", "faiss")
CPU_CHECK = dict(points=2, n0=32, n=512, batch_size=256, train=400, shape=(1, 8, 8), arch="small_cnn")
GPU_CHECK = dict(points=10, n0=100, n=10_000, batch_size=1000, train=5000, shape=(3, 32, 32), arch="resnet20")
THROUGHPUT = dict(arch="resnet110", points=2, n0=100, n=10_000, batch_size=1000)


class Report:
    """Prints one line per check: ``ok``, ``FAIL`` (with what to do) or ``skip``; remembers failures."""

    def __init__(self):
        self.failed = []

    def line(self, status: str, name: str, detail: str) -> None:
        if status == "FAIL":
            self.failed.append(name)
        print(f"{status:<5}{name}: {detail}", flush=True)

    def check(self, name: str, passed: bool, detail: str, fix: str = "") -> bool:
        self.line("ok" if passed else "FAIL", name, detail if passed or not fix else f"{detail}; {fix}")
        return passed


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def faiss_owners() -> list:
    """The installed distributions that provide the top-level ``faiss`` module."""
    owners = metadata.packages_distributions().get("faiss", [])
    return sorted(set(owners) | {name for name in FAISS_WHEELS if _version(name) != "not installed"})


def check_versions(report: Report) -> bool:
    """Versions; the faiss module has exactly one owner. Returns whether faiss can be used."""
    cuda = torch.version.cuda or "none (a CPU build)"
    report.line("ok", "versions", f"Python {platform.python_version()}, lightning_idrs {lightning_idrs.__version__}, "
                f"torch {torch.__version__} (CUDA {cuda})")
    report.line("ok", "libraries", ", ".join(f"{name} {_version(name)}" for name in LIBRARIES[1:]))
    owners = faiss_owners()
    if not owners:
        return report.check("faiss", False, "not installed", "pip install 'lightning_idrs[cpu]' (or [gpu] with a GPU)")
    if len(owners) > 1:
        return report.check("faiss", False, f"{len(owners)} packages own the faiss module ({', '.join(owners)})",
                            "keep one: pip uninstall -y " + " ".join(owners) + ", then pip install 'lightning_idrs[cpu]'"
                            " or '[gpu]'")
    try:
        faiss = import_faiss()
    except UsageError as error:
        return report.check("faiss", False, str(error))
    build = "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU build"
    return report.check("faiss", True, f"{owners[0]} {_version(owners[0])} ({build}, faiss {faiss.__version__})")


def check_devices(report: Report) -> bool:
    """The CPU and the CUDA devices torch sees. Returns whether there is a GPU."""
    report.line("ok", "cpu", f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    if not torch.cuda.is_available():
        report.line("ok", "gpu", "none: torch.cuda.is_available() is False")
        return False
    names = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
             f"({torch.cuda.get_device_properties(i).total_memory / 2 ** 30:.0f} GiB)"
             for i in range(torch.cuda.device_count())]
    report.line("ok", "gpu", ", ".join(names))
    return True


def brute_force_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean float64 distance to the k nearest of KnnIndex's fixed set {mu + fl32(p_i - mu)}."""
    mu = points.astype(np.float64).mean(0)
    stored = (points.astype(np.float64) - mu).astype(np.float32).astype(np.float64) + mu
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - stored[None]) ** 2).sum(-1))
    return np.sort(dist, axis=1)[:, :k].mean(1)


def check_knn(report: Report, device: str, n: int = 2000, d: int = 32, k: int = 10) -> bool:
    """The exact kNN on ``device`` against a float64 brute force (CPU) or the CPU index (GPU)."""
    rng = np.random.default_rng(0)
    points, queries = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((64, d)).astype(np.float32)
    index = KnnIndex(points.copy(), "Flat")
    q = torch.from_numpy(queries)
    got = index.neighbour_distance(q.to(device), k, margin=16).cpu().numpy()
    if device == "cpu":
        reference, against = brute_force_knn(points, queries, k), "a float64 brute force"
    else:
        reference, against = index.neighbour_distance(q, k, margin=16).numpy(), "the CPU index"
    error = float(np.abs(got - reference).max())
    return report.check(f"knn {device}", error <= 1e-9 * float(np.abs(reference).max()),
                        f"{len(queries)} queries, {n} points, d={d}, k={k}: max |difference| to {against} {error:.1e}")


def make_smoothed(spec: dict, device: str, knn: bool, seed: int = 0):
    """A random model (weights channels-last) and sigma for ``spec``; returns (model, sigma, points)."""
    torch.manual_seed(seed)
    shape = spec["shape"]
    model = build_model(spec["arch"], shape, 10, [0.5] * shape[0], [0.25] * shape[0]).to(device).eval()
    use_channels_last(model, shape, device)
    if knn:
        sigma = KnnSigma(sigma_base=0.25, semi_elasticity=0.1, k=10).to(device)
        sigma.fit(torch.rand(spec["train"], *shape, device=device))
    else:
        sigma = ConstantSigma(0.25).to(device)
    return model, sigma, torch.rand(spec["points"], *shape, device=device)


def certify_rows(model, sigma, points, spec: dict, device: str, precision: str, seed: int = 1):
    """Certificates of ``points`` in fp32 or bf16 (autocast of the base model only), fixed noise seed."""
    context = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if precision == "bf16" else nullcontext
    smoothed = SmoothedClassifier(model, sigma, num_classes=10, forward_context=context)
    generator = torch.Generator(device).manual_seed(seed)
    return smoothed.certify(points, spec["n0"], spec["n"], 0.001, spec["batch_size"], generator=generator)


def compare_rows(report: Report, name: str, fp32, bf16) -> bool:
    """Prints both precisions' rows; fails on an invalid row, reports (does not fail on) bf16 flips."""
    print(f"     {'point':>5} {'predict':>8} {'p_a_lower':>10} {'radius':>8}   | bf16: {'predict':>7} {'p_a_lower':>10} "
          f"{'radius':>8}")
    for i in range(len(fp32.prediction)):
        print(f"     {i:>5} {fp32.prediction[i]:>8} {fp32.p_a_lower[i]:>10.5f} {fp32.radius[i]:>8.4f}   | "
              f"      {bf16.prediction[i]:>7} {bf16.p_a_lower[i]:>10.5f} {bf16.radius[i]:>8.4f}")
    valid = all(np.isfinite(c.radius).all() and (c.radius >= 0).all() and (c.radius[c.prediction == ABSTAIN] == 0).all()
                for c in (fp32, bf16))
    same = int((fp32.prediction == bf16.prediction).sum())
    gap = float(np.abs(fp32.radius - bf16.radius).max())
    return report.check(name, valid, f"{len(fp32.prediction)} points, fp32 and bf16 agree on {same} predictions, "
                        f"max |radius difference| {gap:.4f} (bf16 certifies the bf16 base classifier)",
                        "a row has a negative or non-finite radius: report this as a bug")


def check_certify(report: Report, spec: dict, device: str, knn: bool) -> bool:
    model, sigma, points = make_smoothed(spec, device, knn)
    rows = [certify_rows(model, sigma, points, spec, device, precision) for precision in ("fp32", "bf16")]
    kind = "kNN sigma" if knn else "constant sigma (no faiss)"
    print(f"     {spec['arch']} with random weights, {kind}, n0={spec['n0']}, n={spec['n']:,}, seed 1 for both:")
    return compare_rows(report, f"certify {device}", *rows)


def check_throughput(report: Report, device: str, knn: bool) -> None:
    """Samples per second of ResNet-110 certification at n = 10,000 (CIFAR-sized inputs) in fp32 and bf16."""
    spec = dict(GPU_CHECK, **THROUGHPUT)
    model, sigma, points = make_smoothed(spec, device, knn)
    for precision in ("fp32", "bf16"):
        certify_rows(model, sigma, points[:1], dict(spec, n0=10, n=spec["batch_size"]), device, precision)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        certify_rows(model, sigma, points, spec, device, precision)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        samples = spec["points"] * (spec["n0"] + spec["n"])
        report.line("ok", f"throughput {precision}", f"ResNet-110, {spec['points']} points at n={spec['n']:,}, batch "
                    f"{spec['batch_size']}: {samples / seconds:,.0f} samples/s, {seconds / spec['points']:.2f} s per "
                    f"point ({100_000 * seconds / samples:.1f} s per point at n=100,000)")


def run(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_idrs doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU checks (needs a CUDA GPU)")
    args = parser.parse_args(argv)
    report = Report()
    knn = check_versions(report)
    has_gpu = check_devices(report)
    if knn:
        check_knn(report, "cpu")
    check_certify(report, CPU_CHECK, "cpu", knn)
    if args.gpu and not has_gpu:
        report.line("skip", "gpu checks", "no CUDA GPU is visible to torch; nothing GPU-related was checked")
    elif args.gpu:
        if knn and report.check("faiss gpu", faiss_has_gpu(), "faiss' GPU build sees the GPU",
                                "pip uninstall -y faiss-cpu && pip install 'lightning_idrs[gpu]'"):
            check_knn(report, "cuda")
        check_certify(report, GPU_CHECK, "cuda", knn)  # without faiss' GPU build the kNN search runs on the CPU
        check_throughput(report, "cuda", knn)
    print(f"doctor: {len(report.failed)} check(s) failed: {', '.join(report.failed)}" if report.failed
          else "doctor: all checks passed")
    return 1 if report.failed else 0


def main(argv=None) -> int:
    """``python -m lightning_idrs doctor``: 0 when every check passed, 1 when one failed, 2 on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(run, sys.argv[1:] if argv is None else list(argv))
