"""Exact distances to the k nearest points of a fixed set (their mean, or the k-th): a float32 search
proposes, float64 decides.

A search ranks with float32 ||a||^2 + ||b||^2 - 2ab, which is inexact for close points. So it only
proposes k + margin candidates; their distances are recomputed in float64 as the norm of the
difference and the k smallest are kept. A worst-case rounding bound on the search's distances then
proves that no other point's float64 distance is below the k-th; rows where it cannot (near-ties,
many duplicates) are redone by a float64 scan over all points, whose own ranking is proven the same
way (else every distance of that row is computed). So the answer is always the k smallest float64
distances over all points: which search proposed the candidates changes the speed, never the result.

The searches (``backend``, ``KnnSigma(knn_backend=...)``; ``lightning_idrs.knn_search``):

* ``faiss``: an exact ``IndexFlatL2`` (never ``index_factory``, which some faiss wheels cannot run);
  on a CUDA device faiss' ``GpuIndexFlatL2`` when a GPU build of faiss is installed, else the CPU index;
* ``torch``: blocked float32 matrix products and top-k on the queries' device (CPU or CUDA), in IEEE
  float32 (TF32 / bf16 matrix products are switched off while it runs); needs no faiss at all;
* ``auto`` (the default): faiss' GPU index when it works, else torch on a CUDA device; faiss on the CPU.

On the CPU both give bit-identical results. The index stores the float32 points c_i = fl32(p_i - mu),
centred on their float64 mean mu (better float32 ranking), mu computed on the CPU so that the fixed set
{mu + c_i} whose distances are computed does not depend on the device. Every exception faiss raises
(import, construction, add, search, GPU resources) becomes a :class:`~lightning_idrs.arguments.UsageError`
(:func:`faiss_failure`) naming the faiss build and the fix. See docs/math.md ("the kNN sigma").
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from lightning_idrs.arguments import UsageError
from lightning_idrs.knn_search import (BACKENDS, BLOCK, GPU_SLACK, U32, U64, FaissSearch, KnnBackend, TorchSearch,
                                       blocked_topk, bound, check_backend, choose, faiss_build, faiss_errors,
                                       faiss_failure, faiss_has_gpu, faiss_owners, ieee_float32_matmul, import_faiss)

__all__ = ["BACKENDS", "KnnBackend", "KnnIndex", "check_backend", "choose", "faiss_build", "faiss_failure",
           "faiss_has_gpu", "faiss_owners", "ieee_float32_matmul", "import_faiss"]

log = logging.getLogger(__name__)

_GPU_MAX_K = 2048  # faiss GPU k-selection limit
_ROWS = 8192  # rows normed per block
_CHUNK = {"cpu": 2 ** 22, "cuda": 2 ** 26}  # float64 elements per re-ranking chunk
_said = set()  # log lines said once per process


def _say_once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


# ---------------------------------------------------------------------------------- the index
class KnnIndex:
    """The fixed set {mu + c_i} of ``points`` ([n, d] float32 on the CPU, NumPy or torch; not modified) with
    exact k-nearest distances, searched by faiss or torch (module docstring).

    ``factory`` ``"Flat"`` is the exact index (``exact``), the only one whose mean distance is provably
    1-Lipschitz; any other faiss ``index_factory`` string builds that (approximate) faiss index. ``backend``
    (auto, faiss, torch) and ``device`` (where the first queries come from): the search for that device is
    built and tried on one point now, so that a broken faiss shows at once.
    """

    def __init__(self, points, factory: str = "Flat", backend: str = "auto", device=None):
        points = points.detach().to("cpu").numpy() if torch.is_tensor(points) else np.asarray(points)
        points = np.ascontiguousarray(points, dtype=np.float32)
        self.n, self.d = points.shape
        self.factory = factory
        self.exact = factory.strip() == "Flat"
        check_backend(backend, factory)
        device = torch.device("cpu" if device is None else device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # mu on the CPU (NumPy, in row order): the fixed set {mu + c_i} is the same whichever device searches
        self.mu = torch.from_numpy(points.mean(0, dtype=np.float64))
        self._xb, self._sq = {}, {}  # device -> centred float32 points, their float64 squared norms
        self._searches = {}  # (device, kind) -> search
        self._faiss = None  # the CPU faiss index
        self._faiss_gpu = {}  # cuda device -> FaissSearch, or the reason it cannot be built
        home = device if device.type == "cuda" else torch.device("cpu")
        self._xb[home], self._sq[home] = self._centre(points, home)
        self.max_sq_norm = float(self._sq[home].max())
        if not self.exact:
            self._build_faiss()
        self.prepare(device, backend)

    # ------------------------------------------------------------------------------ storage
    def _centre(self, points: np.ndarray, device):
        """(fl32(p_i - mu) for every row, their float64 squared norms) on ``device``: the same numbers on any
        device (one float64 subtraction and one rounding per element; each norm summed within its row)."""
        out = torch.empty((self.n, self.d), dtype=torch.float32, device=device)
        sq = torch.empty(self.n, dtype=torch.float64, device=device)
        mu, rows = self.mu.to(device), max(1, 2 ** 22 // max(1, self.d))
        for i in range(0, self.n, rows):
            block = (torch.from_numpy(points[i:i + rows]).to(device).double() - mu).float()
            out[i:i + rows], sq[i:i + rows] = block, (block.double() ** 2).sum(1)
        return out, sq

    def _points(self, device) -> torch.Tensor:
        """The centred float32 points on ``device`` (copied from another device once)."""
        device = torch.device(device)
        if device not in self._xb:
            source = self._xb.get(torch.device("cpu"), next(iter(self._xb.values())))
            self._xb[device] = source.to(device)
        return self._xb[device]

    @property
    def xb(self) -> torch.Tensor:
        """The centred float32 points c_i on the CPU."""
        return self._points("cpu")

    def _squared_norms(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._sq:
            xb = self._points(device)
            self._sq[device] = torch.cat([(xb[i:i + _ROWS].double() ** 2).sum(1) for i in range(0, self.n, _ROWS)])
        return self._sq[device]

    def _build_faiss(self):
        """The CPU faiss index (IndexFlatL2, or the factory string's), sharing its storage with the CPU points."""
        if self._faiss is not None:
            return self._faiss
        faiss = import_faiss()
        xb = np.ascontiguousarray(self.xb.numpy())
        with faiss_errors(f"building the CPU index {self.factory!r}"):
            if self.exact:
                index = faiss.IndexFlatL2(self.d)  # not index_factory: pip's faiss-cuda 1.14.1 raises std::bad_cast there
            else:
                index = faiss.index_factory(self.d, self.factory, faiss.METRIC_L2)
                if not index.is_trained:
                    index.train(xb)
            index.add(xb)
            if self.exact:  # share faiss' storage instead of keeping a second copy
                self._xb[torch.device("cpu")] = torch.from_numpy(
                    faiss.rev_swig_ptr(index.get_xb(), self.n * self.d).reshape(self.n, self.d))
        self._faiss = index
        return index

    def _gpu_search(self, device, required: bool):
        """faiss' GPU index on ``device`` as a search, or None where it cannot be used (``required``: that is an
        error, except for a CPU build of faiss, which searches on the CPU and says so once)."""
        if device not in self._faiss_gpu:
            try:
                self._faiss_gpu[device] = self._build_gpu(device)
            except UsageError as error:
                if required:
                    raise
                self._faiss_gpu[device] = f"{error}"
        found = self._faiss_gpu[device]
        if isinstance(found, FaissSearch):
            return found
        if found is None and required:  # a CPU build, or a GPU build that sees no GPU
            build = "the installed faiss is a CPU build" if faiss_build().endswith("CPU build") \
                else "faiss' GPU build sees no GPU"
            _say_once(logging.WARNING, f"kNN search runs on the CPU: {build} (for the GPU index: pip uninstall -y "
                      "faiss-cpu && pip install 'lightning_idrs[gpu]'; or search on the GPU with knn_backend torch)")
        elif found is None or found.startswith("faiss is not installed"):
            _say_once(logging.INFO, f"kNN search on {device} uses the torch backend: faiss has no GPU index here "
                      f"({faiss_build()})")
        else:
            _say_once(logging.WARNING, f"kNN search on {device} uses the torch backend: faiss' GPU index failed "
                      f"({found.split('; fix:')[0]})")
        return None

    def _build_gpu(self, device):
        faiss = import_faiss()
        with faiss_errors("to count the GPUs"):
            if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
                return None
        dev = device.index if device.index is not None else torch.cuda.current_device()
        where = f"faiss' GPU index on cuda:{dev}"
        with faiss_errors(f"building {where}"):
            resources = faiss.StandardGpuResources()
            if self.exact:
                config = faiss.GpuIndexFlatConfig()
                config.device = dev
                index = faiss.GpuIndexFlatL2(resources, self.d, config)
                index.add(np.ascontiguousarray(self.xb.numpy()))
            else:
                index = faiss.index_cpu_to_gpu(resources, dev, self._build_faiss())
        search = FaissSearch(index, torch.device("cuda", dev), bound(self.d, U32) + GPU_SLACK, where, resources)
        search(self._points(search.device)[:1].double(), min(self.n, 2))  # a faiss that cannot search fails now
        return search

    # ------------------------------------------------------------------------------ which search
    def prepare(self, device, backend: str = "auto") -> None:
        """Build (and try) the search that queries on ``device`` will use."""
        self._search(torch.device(device), backend, min(self.n, 2))

    def _search(self, device, backend: str, kc: int):
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):  # e.g. mps (no float64): searched and re-ranked on the CPU
            device = torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        faiss_gpu = None
        if device.type == "cuda" and backend != "torch" and (kc <= _GPU_MAX_K or not self.exact):
            faiss_gpu = self._gpu_search(device, required=backend == "faiss" or not self.exact)
        kind = choose(backend, device.type, faiss_gpu is not None, self.exact)
        if kind == "faiss-gpu":
            return faiss_gpu
        where = torch.device("cpu") if kind == "faiss" else device
        key = (where, kind)
        if key not in self._searches:
            if kind == "faiss":
                self._build_faiss()
                search = FaissSearch(self._faiss, where, bound(self.d, U32), "the CPU index")
                search(self._points(where)[:1].double(), min(self.n, 2))  # a faiss that cannot search fails now
            else:
                search = TorchSearch(self._points(where), self._squared_norms(where), where, bound(self.d, U32))
            self._searches[key] = search
        return self._searches[key]

    # ------------------------------------------------------------------------------ queries
    def neighbour_distance(self, queries: torch.Tensor, k: int, margin: int, statistic: str = "mean",
                           backend: str = "auto") -> torch.Tensor:
        """float64 d_k of each query ([b, d], any float dtype): ``statistic="mean"``, the mean distance to
        its k nearest points (the paper's); ``"kth"``, the distance to the k-th nearest. Both are
        1-Lipschitz in the query."""
        q = queries.to(torch.float64) - self.mu.to(queries.device)
        return self._neighbour_distance(q, None, k, margin, statistic, backend).to(queries.device)

    def training_neighbour_distance(self, rows: torch.Tensor, k: int, margin: int, device, statistic: str = "mean",
                                    backend: str = "auto", batch: int = 2048) -> torch.Tensor:
        """As :meth:`neighbour_distance` for stored points ``rows`` (None: all), each excluded from its own
        neighbours (by index), ``batch`` rows per search, on ``device``."""
        search = self._search(device, backend, min(self.n, k + 1 + margin))
        rows = torch.arange(self.n, device=search.device) if rows is None else rows.to(search.device)
        xb = self._points(search.device)
        out = torch.empty(len(rows), dtype=torch.float64, device=search.device)
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            out[i:i + batch] = self._neighbour_distance(xb.index_select(0, part).double(), part, k, margin, statistic,
                                                        backend, search)
        return out.to(device)

    # ------------------------------------------------------------------------------ core
    @torch.no_grad()
    def _neighbour_distance(self, q, exclude: Optional[torch.Tensor], k: int, margin: int, statistic: str = "mean",
                            backend: str = "auto", search=None):
        """Exact mean (or k-th) distance from centred queries q [b, d] to their k nearest points (``exclude``: row ids)."""
        kc = min(self.n, k + (exclude is not None) + margin)
        search = search or self._search(q.device, backend, kc)
        device = search.device
        q = q.to(device)
        xb = self._points(device)
        exclude = None if exclude is None else exclude.to(device)
        dist2, ids = search(q, kc)
        nearest = self._candidate_dist(q, xb, ids, exclude).topk(k, dim=1, largest=False).values
        if kc == self.n or not self.exact:
            ok = torch.ones(len(q), dtype=torch.bool, device=device)
        else:
            ok = self._proven(q, dist2, ids, nearest, search.slack)
        ok &= torch.isfinite(nearest[:, -1])  # fewer than k valid candidates (approximate index)
        out = nearest.mean(1) if statistic == "mean" else nearest[:, -1].clone()
        redo = (~ok).nonzero().squeeze(1)
        if len(redo):
            nearest = self._scan(q[redo], xb, None if exclude is None else exclude[redo], k, margin)
            out[redo] = nearest.mean(1) if statistic == "mean" else nearest[:, -1]
        return out

    def _proven(self, q, dist2, ids, nearest, slack: float) -> torch.Tensor:
        """Rows where no point outside ``ids`` can have a float64 distance below the k-th (``nearest[:, -1]``).

        Every point outside has a search distance >= the largest candidate's, so its exact squared distance is
        >= that minus the rounding bound ``slack`` (q's and the points' squared norms). The factor 1 + eps keeps
        the float64 re-computation of that exact distance (the norm of the difference: relative error below
        (d + 4) 2^-53) from falling below the k-th computed one: the result is the k smallest float64 distances
        over all points, whichever search proposed the candidates."""
        eps = 4 * (self.d + 4) * U64
        floor = dist2.max(1).values.double() - slack * ((q * q).sum(1) + self.max_sq_norm)
        return (floor >= nearest[:, -1] ** 2 * (1 + eps)) & (ids >= 0).all(1)

    def _candidate_dist(self, q, xb, ids, exclude):
        """Exact float64 distances ||q - x_id|| (norm of the difference); +inf for excluded or missing ids."""
        b, kc = ids.shape
        out = torch.empty(ids.shape, dtype=torch.float64, device=q.device)
        chunk = _CHUNK[q.device.type]
        if kc * self.d <= chunk:
            rows = max(1, chunk // max(1, kc * self.d))
            for i in range(0, b, rows):
                part = ids[i:i + rows]
                cand = xb.index_select(0, part.clamp(min=0).reshape(-1)).view(*part.shape, -1)
                out[i:i + rows] = torch.linalg.vector_norm(cand.to(torch.float64).sub_(q[i:i + rows, None]), dim=-1)
        else:  # every point of a row (the exhaustive scan): the row's candidates in pieces
            cols = max(1, chunk // max(1, self.d))
            for i in range(b):  # rare rows: a Python loop is fine
                for j in range(0, kc, cols):
                    cand = xb.index_select(0, ids[i, j:j + cols].clamp(min=0))
                    out[i, j:j + cols] = torch.linalg.vector_norm(cand.to(torch.float64).sub_(q[i]), dim=-1)
        out[ids < 0] = math.inf
        if exclude is not None:
            out[ids == exclude[:, None]] = math.inf
        return out

    def _scan(self, q, xb, exclude, k, margin):
        """The k nearest float64 distances [b, k] (ascending) by a float64 scan over all points: the fallback
        where the search's ranking can't be proven. Its own float64 ranking is proven like the search's;
        rows where even that fails (many points at one distance) get every distance computed."""
        kc = min(self.n, k + (exclude is not None) + margin)
        dist2, ids = blocked_topk(q, xb, self._squared_norms(q.device), (q * q).sum(1), kc, BLOCK[q.device.type])
        nearest = self._candidate_dist(q, xb, ids, exclude).topk(k, dim=1, largest=False).values
        if kc == self.n:
            return nearest
        redo = (~self._proven(q, dist2, ids, nearest, bound(self.d, U64))).nonzero().squeeze(1)
        if len(redo):
            every = torch.arange(self.n, device=q.device).expand(len(redo), -1)
            nearest[redo] = self._candidate_dist(q[redo], xb, every, None if exclude is None else exclude[redo]) \
                .topk(k, dim=1, largest=False).values
        return nearest
