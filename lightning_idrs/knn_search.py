"""The searches that propose kNN candidates, and the faiss they may need.

* :class:`FaissSearch`: a faiss index (``IndexFlatL2`` on the CPU, ``GpuIndexFlatL2`` on a GPU, or an
  approximate index from a factory string);
* :class:`TorchSearch`: blocked float32 matrix products and top-k on any torch device, in IEEE float32
  (:func:`ieee_float32_matmul` switches TF32 and bf16 products off while it runs); no faiss needed;
* :func:`choose`: which of them answers queries on a device for ``knn_backend`` auto, faiss or torch;
* faiss' installation: :func:`import_faiss`, :func:`faiss_build` (the installed build in words) and
  :func:`faiss_failure`, the one ``UsageError`` line for any exception faiss raises.

A search returns approximate squared distances and ids; :func:`bound` says how far the distances may be
from the exact ones. ``lightning_idrs.knn`` turns the candidates into exact distances.
"""
from __future__ import annotations

import functools
import math
import sys
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from lightning_idrs.arguments import UsageError, one_line

__all__ = ["BACKENDS", "FaissSearch", "KnnBackend", "TorchSearch", "blocked_topk", "bound", "check_backend", "choose",
           "faiss_build", "faiss_errors", "faiss_failure", "faiss_has_gpu", "faiss_owners", "ieee_float32_matmul",
           "import_faiss"]

KnnBackend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")
FAISS_WHEELS = ("faiss-cpu", "faiss-cuda", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cuvs", "faiss")
U32, U64 = 2.0 ** -24, 2.0 ** -53  # float32 / float64 unit roundoff
GPU_SLACK = 2.0 ** -9  # faiss' GPU index may run TF32 GEMMs (10-bit mantissa)
#: float32 (or float64) distances per block of a search or scan, by device type
BLOCK = {"cpu": 2 ** 22, "cuda": 2 ** 27}
#: what to do when faiss fails: the same line for every command
FAISS_FIX = ("reinstall the kNN backend for this machine (pip install 'lightning_idrs[cpu]', or "
             "'lightning_idrs[gpu]' on a CUDA 13 GPU machine; one of them, never both), or search without faiss: "
             "knn_backend torch (fit: --model.sigma.knn_backend torch; certify: --certify.knn_backend torch)")


# ---------------------------------------------------------------------------------- faiss, its build, its errors
@functools.lru_cache(maxsize=1)
def _installed_owners() -> tuple:
    from importlib import metadata

    def installed(name):
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            return False

    owners = metadata.packages_distributions().get("faiss", [])  # reads every distribution: once per process
    return tuple(sorted(set(owners) | {name for name in FAISS_WHEELS if installed(name)}))


def faiss_owners() -> list:
    """The installed distributions that provide the top-level ``faiss`` module."""
    return list(_installed_owners())


def faiss_build() -> str:
    """The installed faiss in words, e.g. ``faiss-cpu 1.15.1, faiss 1.15.1, CPU build``; never raises
    (and never imports faiss: it describes a faiss that may have just failed)."""
    from importlib import metadata

    parts = []
    try:
        owners = faiss_owners()
        parts.append(", ".join(f"{name} {metadata.version(name)}" for name in owners) or "no faiss package installed")
    except Exception:  # a broken metadata entry must not hide the real error
        owners = []
    module = sys.modules.get("faiss")
    if module is not None and hasattr(module, "__version__"):
        parts.append(f"faiss {module.__version__}")
        gpu = hasattr(module, "StandardGpuResources")
    else:
        gpu = any(name != "faiss-cpu" and name != "faiss" for name in owners) if owners else None
    if gpu is not None:
        parts.append("GPU build" if gpu else "CPU build")
    return ", ".join(parts)


def faiss_failure(error: BaseException, doing: str) -> UsageError:
    """The one line for an exception raised by faiss while ``doing`` (e.g. "searching the CPU index")."""
    return UsageError(f"faiss failed {doing}: {type(error).__name__}: {one_line(error)[:300]} ({faiss_build()}); "
                      f"fix: {FAISS_FIX}")


@contextmanager
def faiss_errors(doing: str):
    """Any exception of faiss inside becomes :func:`faiss_failure`'s UsageError."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # SWIG turns C++ exceptions into RuntimeError; wheels raise anything at load
        raise faiss_failure(error, doing) from None


def import_faiss():
    """The faiss module; it comes from an extra (one of two wheels), so its absence or a failing import is a
    set-up error (UsageError naming the fix)."""
    try:
        import faiss
    except ModuleNotFoundError as error:
        if error.name not in (None, "faiss"):  # faiss is there, a library it needs is not
            raise faiss_failure(error, "to import") from None
        raise UsageError(f"faiss is not installed ({error}); install the kNN backend: pip install "
                         "'lightning_idrs[cpu]', or 'lightning_idrs[gpu]' on a CUDA 13 GPU machine; or search "
                         "without faiss: knn_backend torch (fit: --model.sigma.knn_backend torch; certify: "
                         "--certify.knn_backend torch)") from None
    except Exception as error:  # a broken wheel: missing CUDA libraries, a symbol mismatch, ...
        raise faiss_failure(error, "to import") from None
    return faiss


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build that sees at least one GPU."""
    faiss = import_faiss()
    with faiss_errors("to count the GPUs"):
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ---------------------------------------------------------------------------------- float32 matrix products
def _precision_flags() -> list:
    """The per-backend float32 matmul settings of torch 2.9+ (none before)."""
    owners = [torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    return [(owner, "fp32_precision") for owner in owners if hasattr(owner, "fp32_precision")]


@contextmanager
def ieee_float32_matmul():
    """float32 matrix products in IEEE float32 inside (no TF32 or bf16 shortcuts on CUDA or oneDNN), every
    setting restored after: the torch search's rounding bound assumes float32 arithmetic. Set through the
    legacy switch, which sets the per-backend ones too: torch refuses a matmul whose legacy and per-backend
    settings disagree."""
    flags = _precision_flags()
    saved = [getattr(owner, name) for owner, name in flags]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the settings already disagree: keep the per-backend ones
        legacy = None
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def bound(d: int, unit: float) -> float:
    """c with |computed squared distance - exact| <= c (||q||^2 + ||x_i||^2) for ||q||^2 + ||x||^2 - 2 q.x
    (or sum (q - x)^2) evaluated in arithmetic of unit roundoff ``unit``, the query rounded to it too
    (Higham's gamma_n; any summation order)."""
    nu = (d + 4) * unit
    if nu >= 0.5:
        return math.inf
    return 2 * nu / (1 - nu) + 4 * unit


def blocked_topk(q, xb, x_sq, q_sq, kc: int, budget: int):
    """The ``kc`` smallest of ``q_sq + x_sq - 2 q xb^T`` (in q's dtype; xb converted block by block) and their
    row ids, over blocks of at most ``budget`` distances: (dist2 [b, kc], ids [b, kc] int64)."""
    b, n = q.shape[0], xb.shape[0]
    cols = max(kc, budget // max(1, b))
    if xb.dtype != q.dtype:  # each block of points is converted: bound that copy too
        cols = max(kc, min(cols, budget // max(1, xb.shape[1])))
    best_d = best_i = None
    for j in range(0, n, cols):
        block = xb[j:j + cols].to(q.dtype)
        d2 = torch.addmm(x_sq[j:j + cols].to(q.dtype), q, block.T, alpha=-2).add_(q_sq[:, None])
        kept = 0 if best_d is None else best_d.shape[1]
        if kept:
            d2 = torch.cat([best_d, d2], 1)
        best_d, pos = d2.topk(min(kc, d2.shape[1]), dim=1, largest=False)
        fresh = pos - kept + j
        best_i = fresh if not kept else torch.where(pos < kept, best_i.gather(1, pos.clamp(max=kept - 1)), fresh)
    return best_d, best_i


# ---------------------------------------------------------------------------------- the searches
class FaissSearch:
    """A faiss index (CPU, or GPU with ``resources``); candidates are re-ranked on ``device``."""

    def __init__(self, index, device, slack: float, where: str, resources=None):
        self.index, self.device, self.slack, self.where, self.resources = index, device, slack, where, resources

    def __call__(self, q, kc):
        queries = np.ascontiguousarray(q.to("cpu", torch.float32).numpy())
        with faiss_errors(f"searching {self.where}"):
            dist2, ids = self.index.search(queries, kc)
        return torch.from_numpy(dist2).to(self.device), torch.from_numpy(ids).to(self.device)


class TorchSearch:
    """Blocked IEEE float32 matrix products and top-k on ``device`` (no faiss)."""

    def __init__(self, xb, x_sq, device, slack: float):
        self.xb, self.x_sq, self.device, self.slack = xb, x_sq.to(torch.float32), device, slack

    def __call__(self, q, kc):
        with ieee_float32_matmul():
            return blocked_topk(q.to(torch.float32), self.xb, self.x_sq, (q * q).sum(1).to(torch.float32), kc,
                                BLOCK[self.device.type])


def check_backend(backend: str, factory: str = "Flat") -> str:
    """``backend`` if it is a knn_backend that can search the index ``factory`` builds, else ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"knn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" and factory.strip() != "Flat":
        raise ValueError(f"knn_backend 'torch' searches exactly; index_factory {factory!r} is a faiss index: use "
                         "index_factory 'Flat', or knn_backend 'faiss'")
    return backend


def choose(backend: str, device_type: str, faiss_gpu: bool, exact: bool = True) -> str:
    """Which search runs for queries on ``device_type``: ``"faiss"`` (the CPU index), ``"faiss-gpu"`` or
    ``"torch"``; ``faiss_gpu``: whether faiss' GPU index works there; ``exact``: the index is "Flat"."""
    check_backend(backend, "Flat" if exact else "an approximate index")
    if not exact:  # an approximate factory string: only faiss has it
        return "faiss-gpu" if device_type == "cuda" and faiss_gpu else "faiss"
    if backend == "torch":
        return "torch"
    if device_type != "cuda":
        return "faiss"
    if faiss_gpu:
        return "faiss-gpu"
    return "faiss" if backend == "faiss" else "torch"
