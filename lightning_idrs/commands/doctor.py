"""``python -m lightning_idrs doctor [--gpu]``: is this installation sound, and does the GPU path work?

Always (a few seconds on a CPU): the versions of Python and the libraries, who owns the ``faiss``
module (exactly one wheel may) and whether it imports, the devices, the exact kNN of both backends
(faiss, torch) against a float64 brute force on a random set with duplicates (torch bit-identical to
faiss), and two points certified on the CPU with a tiny random model in fp32 and bf16, rows compared.

With ``--gpu``, on a machine with a CUDA GPU: faiss' GPU index (a CPU build of faiss is a ``skip``:
the GPU then searches with the torch backend) and the torch backend on the GPU, each equal to the
CPU kNN within float64 rounding; 10 points certified on the GPU in fp32 and in bf16 with the rows
compared, and the throughput of ResNet-110 (CIFAR-sized inputs) at n = 10,000 in fp32 and bf16.
Without a GPU it says so and stops after the CPU part.

Every check runs whatever the others did: a check that fails, or raises (a faiss that crashes, a
CUDA error), prints one ``FAIL`` line saying what and what to do, and the next check runs. Exit code
0 when no check failed (``skip`` lines are not failures), 1 when one did, 2 on a bad argument.
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
from lightning_idrs.knn import KnnIndex, faiss_owners, import_faiss
from lightning_idrs.models import build_model
from lightning_idrs.sigma import ConstantSigma, KnnSigma
from lightning_idrs.smoothing import ABSTAIN, SmoothedClassifier, use_channels_last
from lightning_idrs.arguments import UsageError, one_line

LIBRARIES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "jsonargparse", "numpy", "scipy",
             "scikit-learn", "matplotlib", "wandb", "filelock", "mlxtend")
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

    def run(self, name: str, check, *args):
        """``check(self, *args)``; an exception it raises becomes this check's ``FAIL`` line (the next check
        still runs). Returns what the check returned, False when it raised."""
        try:
            return check(self, *args)
        except Exception as error:  # a broken faiss or CUDA raises anything; the doctor reports it and goes on
            if isinstance(error, UsageError):  # already names the problem and the fix
                self.line("FAIL", name, one_line(error))
            else:
                self.line("FAIL", name, f"{type(error).__name__}: {one_line(error)[:500]} (raised by the check; "
                          "report it with this output if the fix is not clear)")
            return False


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def check_versions(report: Report) -> bool:
    """The versions of Python, torch and the libraries."""
    cuda = torch.version.cuda or "none (a CPU build)"
    report.line("ok", "versions", f"Python {platform.python_version()}, lightning_idrs {lightning_idrs.__version__}, "
                f"torch {torch.__version__} (CUDA {cuda})")
    report.line("ok", "libraries", ", ".join(f"{name} {_version(name)}" for name in LIBRARIES[1:]))
    return True


def check_faiss(report: Report) -> bool:
    """The faiss module has exactly one owner and imports. Returns whether faiss can be used."""
    owners = faiss_owners()
    if not owners:
        return report.check("faiss", False, "not installed", "pip install 'lightning_idrs[cpu]' (or [gpu] with a GPU)")
    if len(owners) > 1:
        return report.check("faiss", False, f"{len(owners)} packages own the faiss module ({', '.join(owners)})",
                            "keep one: pip uninstall -y " + " ".join(owners) + ", then pip install 'lightning_idrs[cpu]'"
                            " or '[gpu]'")
    faiss = import_faiss()  # a failing import: its UsageError is the FAIL line
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


def knn_data(n: int = 2000, d: int = 32, queries: int = 64):
    """A random set with exact duplicates (3 points 40 times each: ties beyond the candidate margin) and
    queries among them, float32: (points, queries)."""
    rng = np.random.default_rng(0)
    points = rng.standard_normal((n, d)).astype(np.float32)
    points = np.concatenate([points, np.repeat(points[:3], 40, axis=0)])
    return points, np.concatenate([rng.standard_normal((queries - 3, d)), points[:3]]).astype(np.float32)


def brute_force_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean float64 distance to the k nearest of KnnIndex's fixed set {mu + fl32(p_i - mu)}."""
    mu = points.astype(np.float64).mean(0)
    stored = (points.astype(np.float64) - mu).astype(np.float32).astype(np.float64) + mu
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - stored[None]) ** 2).sum(-1))
    return np.sort(dist, axis=1)[:, :k].mean(1)


def float64_tolerance(index: KnnIndex, dist: np.ndarray, k: int) -> np.ndarray:
    """Twice the float64 forward-error bound of a computed d_k (docs/math.md, "Floating point"): two
    devices that sum in other orders may differ by this much, never more."""
    bound = np.sqrt(index.max_sq_norm) + float(index.mu.norm())
    return 2 * (index.d + k + 16) * 2.0 ** -52 * (dist + 2 * bound)


def check_knn(report: Report, device: str, backend: str = "faiss", faiss_ok: bool = True, k: int = 10) -> bool:
    """The exact kNN of ``backend`` on ``device``: on the CPU against a float64 brute force (torch also
    bit-identical to faiss where ``faiss_ok``); on a GPU against the CPU kNN (faiss, else torch) within the
    float64 rounding two devices may differ by."""
    points, queries = knn_data()
    index = KnnIndex(points, "Flat", backend, device)
    q = torch.from_numpy(queries)
    got = index.neighbour_distance(q.to(device), k, margin=16, backend=backend).cpu().numpy()
    name = f"knn {backend} {device}"
    size = f"{len(queries)} queries, {len(points)} points (3 of them 41 times), d={points.shape[1]}, k={k}"
    if device == "cpu":
        reference = brute_force_knn(points, queries, k)
        error = float(np.abs(got - reference).max())
        detail = f"{size}: max |difference| to a float64 brute force {error:.1e}"
        if error > 1e-9 * float(np.abs(reference).max()):
            return report.check(name, False, detail, "the exact kNN is wrong here: report this as a bug")
        if backend == "torch" and faiss_ok:
            same = np.array_equal(got, KnnIndex(points).neighbour_distance(q, k, margin=16, backend="faiss").numpy())
            return report.check(name, same, f"{detail}; " + ("bit-identical to faiss" if same else "differs from faiss"),
                                "report this as a bug")
        return report.check(name, True, detail)
    cpu = "faiss" if faiss_ok else "torch"
    reference = KnnIndex(points, "Flat", cpu).neighbour_distance(q, k, margin=16, backend=cpu).numpy()
    error = np.abs(got - reference)
    if not error.any():
        return report.check(name, True, f"{size}: bit-identical to the CPU ({cpu})")
    within = bool((error <= float64_tolerance(index, reference, k)).all())
    return report.check(name, within, f"{size}: max |difference| to the CPU ({cpu}) {error.max():.1e}, "
                        f"{'within' if within else 'beyond'} float64 rounding", "report this as a bug")


def check_faiss_gpu(report: Report) -> bool:
    """faiss' GPU index (a GPU build of faiss) against the CPU kNN; a CPU build of faiss is a skip."""
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        report.line("skip", "knn faiss cuda", "the installed faiss is a CPU build: on the GPU the kNN searches with the "
                    "torch backend (knn_backend auto); for faiss' GPU index: pip uninstall -y faiss-cpu && pip install "
                    "'lightning_idrs[gpu]'")
        return False
    if faiss.get_num_gpus() == 0:
        return report.check("knn faiss cuda", False, "faiss' GPU build sees no GPU", "check the CUDA driver, or "
                            "pip uninstall -y faiss-cuda && pip install 'lightning_idrs[cpu]' (the torch backend then "
                            "searches on the GPU)")
    return check_knn(report, "cuda", "faiss", True)


def make_smoothed(spec: dict, device: str, knn, seed: int = 0):
    """A random model (weights channels-last) and sigma for ``spec`` (``knn``: the kNN backend of a kNN
    sigma, or None for a constant one); returns (model, sigma, points)."""
    torch.manual_seed(seed)
    shape = spec["shape"]
    model = build_model(spec["arch"], shape, 10, [0.5] * shape[0], [0.25] * shape[0]).to(device).eval()
    use_channels_last(model, shape, device)
    if knn:
        sigma = KnnSigma(sigma_base=0.25, semi_elasticity=0.1, k=10, knn_backend=knn).to(device)
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


def check_certify(report: Report, spec: dict, device: str, knn) -> bool:
    model, sigma, points = make_smoothed(spec, device, knn)
    rows = [certify_rows(model, sigma, points, spec, device, precision) for precision in ("fp32", "bf16")]
    kind = f"kNN sigma ({knn} backend)" if knn else "constant sigma (no working kNN)"
    print(f"     {spec['arch']} with random weights, {kind}, n0={spec['n0']}, n={spec['n']:,}, seed 1 for both:")
    return compare_rows(report, f"certify {device}", *rows)


def check_throughput(report: Report, device: str, knn) -> None:
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
    report.run("versions", check_versions)
    faiss_ok = report.run("faiss", check_faiss)
    has_gpu = report.run("gpu", check_devices)
    knn = None  # the backend the certify checks use: faiss where it works, else torch, else a constant sigma
    faiss_ok = faiss_ok and report.run("knn faiss cpu", check_knn, "cpu", "faiss")
    knn = "auto" if faiss_ok else None
    if report.run("knn torch cpu", check_knn, "cpu", "torch", faiss_ok) and knn is None:
        knn = "torch"
    report.run("certify cpu", check_certify, CPU_CHECK, "cpu", knn)
    if args.gpu and not has_gpu:
        report.line("skip", "gpu checks", "no CUDA GPU is visible to torch; nothing GPU-related was checked")
    elif args.gpu:
        gpu_knn = None
        if faiss_ok and report.run("knn faiss cuda", check_faiss_gpu):
            gpu_knn = "auto"  # faiss' GPU index
        if report.run("knn torch cuda", check_knn, "cuda", "torch", faiss_ok) and gpu_knn is None:
            gpu_knn = "torch"
        report.run("certify cuda", check_certify, GPU_CHECK, "cuda", gpu_knn)
        report.run("throughput", check_throughput, "cuda", gpu_knn)
    print(f"doctor: {len(report.failed)} check(s) failed: {', '.join(report.failed)}" if report.failed
          else "doctor: all checks passed")
    return 1 if report.failed else 0


def main(argv=None) -> int:
    """``python -m lightning_idrs doctor``: 0 when every check passed, 1 when one failed, 2 on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(run, sys.argv[1:] if argv is None else list(argv))
