"""Exact distances to the k nearest points of a fixed set (their mean, or the k-th): faiss proposes, float64 decides.

faiss ranks with float32 ||a||^2 + ||b||^2 - 2ab, which is inexact for close points. So faiss only
proposes k + margin candidates; their distances are recomputed in float64 as the norm of the
difference and the k smallest are kept. A worst-case rounding bound on faiss' distances then proves
that no other point is closer than the k-th; rows where it cannot (near-ties, many duplicates) are
redone by a float64 brute-force scan. The index stores the float32 points c_i = fl32(p_i - mu),
centred on their float64 mean mu (better float32 ranking); the fixed set whose distances are
computed is {mu + c_i}. See docs/math.md ("the kNN sigma") for why exactness matters.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Optional

import numpy as np
import torch

from lightning_idrs.arguments import UsageError

__all__ = ["KnnIndex", "faiss_has_gpu", "import_faiss"]

log = logging.getLogger(__name__)

_U32 = 2.0 ** -24  # float32 unit roundoff
_GPU_SLACK = 2.0 ** -9  # covers TF32 GEMMs (10-bit mantissa) should a GPU use them
_GPU_MAX_K = 2048  # faiss GPU k-selection limit
_CHUNK_ELEMENTS = 2 ** 22  # float64 elements per recompute chunk (32 MiB)
_ROWS = 8192


_said_cpu_only = False  # the "CPU build of faiss" line is logged once per process


def import_faiss():
    """The faiss module; it comes from an extra (one of two wheels), so its absence is a set-up error."""
    try:
        import faiss
    except ImportError as error:
        raise UsageError(f"faiss is not installed ({error}); install the kNN backend: pip install "
                         "'lightning_idrs[cpu]', or 'lightning_idrs[gpu]' on a CUDA 13 GPU machine") from None
    return faiss


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build that sees at least one GPU."""
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _say_cpu_only_once() -> None:
    global _said_cpu_only
    if not _said_cpu_only:
        _said_cpu_only = True
        if hasattr(import_faiss(), "StandardGpuResources"):
            log.warning("kNN search runs on the CPU: the GPU build of faiss sees no GPU")
        else:
            log.warning("kNN search runs on the CPU: the installed faiss is a CPU build (for the GPU index: "
                        "pip uninstall -y faiss-cpu && pip install 'lightning_idrs[gpu]')")


class KnnIndex:
    """faiss index over ``points`` ([n, d] float32 NumPy, centred in place and kept) with exact re-ranking.

    ``factory`` is a faiss ``index_factory`` string; only ``"Flat"`` is exact (``exact``), and only an
    exact index gives a provably 1-Lipschitz mean distance.
    """

    def __init__(self, points: np.ndarray, factory: str = "Flat"):
        faiss = import_faiss()
        self.n, self.d = points.shape
        mu = points.mean(0, dtype=np.float64)
        for i in range(0, self.n, _ROWS):  # centre in place (translation: distances unchanged)
            points[i:i + _ROWS] = (points[i:i + _ROWS].astype(np.float64) - mu).astype(np.float32)
        self.index = faiss.index_factory(self.d, factory, faiss.METRIC_L2)
        self.exact = type(self.index) in (faiss.IndexFlat, faiss.IndexFlatL2) \
            and self.index.metric_type == faiss.METRIC_L2
        if not self.index.is_trained:
            self.index.train(points)
        self.index.add(points)
        if self.exact:  # share faiss' storage instead of keeping a second copy
            points = faiss.rev_swig_ptr(self.index.get_xb(), self.n * self.d).reshape(self.n, self.d)
        self.xb = torch.from_numpy(points)
        self.max_sq_norm = max(float((self.xb[i:i + _ROWS].double() ** 2).sum(1).max())
                               for i in range(0, self.n, _ROWS))
        self.mu = torch.from_numpy(mu)
        self._gpu = {}  # cuda device index -> (resources, gpu index, xb on that device) or None

    # ------------------------------------------------------------------------------ queries
    def neighbour_distance(self, queries: torch.Tensor, k: int, margin: int, statistic: str = "mean") -> torch.Tensor:
        """float64 d_k of each query ([b, d], any float dtype): ``statistic="mean"``, the mean distance to
        its k nearest points (the paper's); ``"kth"``, the distance to the k-th nearest. Both are
        1-Lipschitz in the query."""
        q = queries.to(torch.float64) - self.mu.to(queries.device)
        return self._neighbour_distance(q, None, k, margin, statistic).to(queries.device)

    def training_neighbour_distance(self, rows: torch.Tensor, k: int, margin: int, device,
                                    statistic: str = "mean") -> torch.Tensor:
        """As :meth:`neighbour_distance` for stored points ``rows``, each excluded from its own neighbours (by index)."""
        q = self.xb[rows].to(device, torch.float64)
        return self._neighbour_distance(q, rows, k, margin, statistic).to(device)

    # ------------------------------------------------------------------------------ core
    @torch.no_grad()
    def _neighbour_distance(self, q, exclude: Optional[torch.Tensor], k: int, margin: int, statistic: str = "mean"):
        """Exact mean (or k-th) distance from centred queries q [b, d] to their k nearest points (``exclude``: row ids)."""
        gpu = self._on_gpu(q.device)
        device = q.device if gpu is not None else torch.device("cpu")
        q = q.to(device)
        xb = gpu[2] if gpu is not None else self.xb
        exclude = None if exclude is None else exclude.to(device)
        kc = min(self.n, k + (exclude is not None) + margin)
        searcher = gpu[1] if gpu is not None and kc <= _GPU_MAX_K else self.index
        dist2, ids = searcher.search(np.ascontiguousarray(q.to("cpu", torch.float32).numpy()), kc)
        dist2, ids = torch.from_numpy(dist2).to(device), torch.from_numpy(ids).to(device)
        nearest = self._candidate_dist(q, xb, ids, exclude).topk(k, dim=1, largest=False).values
        if kc == self.n or not self.exact:
            ok = torch.ones(len(q), dtype=torch.bool, device=device)
        else:  # no non-candidate can be closer than the k-th: faiss put it after all candidates
            slack = self._bound(searcher is not self.index) * ((q * q).sum(1) + self.max_sq_norm)
            ok = (dist2.max(1).values.double() - slack >= nearest[:, -1] ** 2) & (ids >= 0).all(1)
        ok &= torch.isfinite(nearest[:, -1])  # fewer than k valid candidates (approximate index)
        out = nearest.mean(1) if statistic == "mean" else nearest[:, -1].clone()
        redo = (~ok).nonzero().squeeze(1)
        if len(redo):
            nearest = self._brute_force(q[redo], xb, None if exclude is None else exclude[redo], k, margin)
            out[redo] = nearest.mean(1) if statistic == "mean" else nearest[:, -1]
        return out

    def _candidate_dist(self, q, xb, ids, exclude):
        """Exact float64 distances ||q - x_id|| (norm of the difference); +inf for excluded or missing ids."""
        rows = max(1, _CHUNK_ELEMENTS // max(1, ids.shape[1] * q.shape[1]))
        out = torch.empty(ids.shape, dtype=torch.float64, device=q.device)
        for i in range(0, len(q), rows):
            chunk = ids[i:i + rows]
            cand = xb.index_select(0, chunk.clamp(min=0).reshape(-1)).view(*chunk.shape, -1)
            out[i:i + rows] = torch.linalg.vector_norm(cand.to(torch.float64).sub_(q[i:i + rows, None]), dim=-1)
        out[ids < 0] = math.inf
        if exclude is not None:
            out[ids == exclude[:, None]] = math.inf
        return out

    def _brute_force(self, q, xb, exclude, k, margin):
        """The k nearest exact distances [b, k] (ascending) by a float64 scan over all points: the fallback
        when faiss' ranking can't be proven."""
        kc = min(self.n, k + (exclude is not None) + margin)
        best_d = torch.full((len(q), 0), math.inf, dtype=torch.float64, device=q.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        q_sq = (q * q).sum(1, keepdim=True)
        for j in range(0, self.n, _ROWS):
            block = xb[j:j + _ROWS].to(torch.float64)
            d2 = q_sq + (block * block).sum(1) - 2 * q @ block.T
            best_d, pos = torch.cat([best_d, d2], 1).topk(min(kc, best_d.shape[1] + len(block)), 1, largest=False)
            best_i = torch.cat([best_i, torch.arange(j, j + len(block), device=q.device).expand(len(q), -1)], 1)
            best_i = best_i.gather(1, pos)
        return self._candidate_dist(q, xb, best_i, exclude).topk(k, dim=1, largest=False).values

    def _bound(self, on_gpu: bool) -> float:
        """c with |faiss' squared distance - exact| <= c (||q||^2 + ||x_i||^2) (Higham's gamma_n)."""
        nu = (self.d + 4) * _U32
        if nu >= 0.5:
            return math.inf
        return 2 * nu / (1 - nu) + 4 * _U32 + (_GPU_SLACK if on_gpu else 0.0)

    def _on_gpu(self, device):
        """(resources, gpu index, xb) for ``device``, or None when faiss cannot search there."""
        if device.type != "cuda":
            return None
        if not faiss_has_gpu():
            _say_cpu_only_once()
            return None
        faiss = import_faiss()
        dev = device.index if device.index is not None else torch.cuda.current_device()
        if dev not in self._gpu:
            try:
                resources = faiss.StandardGpuResources()
                self._gpu[dev] = (resources, faiss.index_cpu_to_gpu(resources, dev, self.index),
                                  self.xb.to(torch.device("cuda", dev)))
            except Exception as error:  # e.g. an index type without GPU support
                warnings.warn(f"faiss GPU index unavailable ({error}); searching on the CPU")
                self._gpu[dev] = None
        return self._gpu[dev]
