"""Input-dependent noise levels sigma(x) (PAPER.md section 3).

    sigma(x) = sigma_b * exp( r * ( d_k(x) - m ) ),   d_k(x) = (1/k) sum_{i in N_k(phi(x))} ||phi(x) - phi(x_i)||

d_k is the mean distance to the k nearest points of a FIXED set, so it is 1-Lipschitz and log sigma
is r * Lip(phi)-Lipschitz (r-semi-elastic): the certificate uses ``semi_elasticity = r * Lip(phi)``.
``ConstantSigma`` is Cohen's baseline (r = 0) behind the same interface.

Numerics. faiss ranks with float32 ||a||^2 + ||b||^2 - 2ab, which is inexact for close points. So
faiss only proposes k + margin candidates; their distances are recomputed in float64 as the norm of
the difference and the k smallest are kept. A worst-case rounding bound on faiss' distances then
proves that no other training point is closer than the k-th; rows where it cannot (near-ties,
many duplicates) are redone by a float64 brute-force scan. The index stores the float32 points
c_i = fl32(phi(x_i) - mu), centred on the float64 mean mu (better float32 ranking); the fixed set
whose d_k is computed is {mu + c_i}, within 2^-24 |phi(x_i) - mu| of phi(x_i) per coordinate.
"""
import hashlib
import math
import warnings

import faiss
import numpy as np
import torch
from torch import nn

from lightning_idrs.embeddings import embedding_lipschitz

__all__ = ["KnnSigma", "ConstantSigma", "dataset_fingerprint"]

_U32 = 2.0 ** -24  # float32 unit roundoff
_GPU_SLACK = 2.0 ** -9  # covers TF32 GEMMs (10-bit mantissa) should a GPU use them
_GPU_MAX_K = 2048  # faiss GPU k-selection limit
_CHUNK_ELEMENTS = 2 ** 22  # float64 elements per recompute chunk (32 MiB)


def dataset_fingerprint(train):
    """Hex sha256 of ``repr(shape)`` followed by the data as C-ordered float32 bytes."""
    x = train.detach() if torch.is_tensor(train) else torch.as_tensor(np.asarray(train))
    digest = hashlib.sha256(repr(tuple(x.shape)).encode())
    flat = x.reshape(len(x), -1) if x.ndim else x.reshape(1, 1)
    for i in range(0, len(flat), 4096):
        digest.update(np.ascontiguousarray(flat[i:i + 4096].to("cpu", torch.float32).numpy()))
    return digest.hexdigest()


def _check_finite(value, name, minimum=None, strict=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _as_batch(x, name):
    x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if x.ndim < 2 and name == "train":
        raise ValueError(f"train must have shape [n, ...] with at least 2 dimensions, got {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape [B, ...], got a scalar")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _faiss_has_gpu():
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class ConstantSigma(nn.Module):
    """sigma(x) = sigma (Cohen et al.): semi_elasticity 0, no fitting, no fingerprint."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma_base = _check_finite(sigma, "sigma", 0.0, strict=True)
        self.r, self.k, self.m = 0.0, None, None

    semi_elasticity = property(lambda self: 0.0)
    is_fitted = property(lambda self: True)
    fingerprint = property(lambda self: None)

    def fit(self, train=None):
        return self

    def forward(self, x):
        return torch.full((x.shape[0],), self.sigma_base, dtype=torch.float32, device=x.device)

    def training_sigma(self, x, idx):
        device = x.device if x is not None else idx.device
        return torch.full((idx.shape[0],), self.sigma_base, dtype=torch.float32, device=device)

    def get_extra_state(self):
        return {"sigma_base": self.sigma_base}

    def set_extra_state(self, state):
        self.sigma_base = _check_finite(state["sigma_base"], "sigma_base", 0.0, strict=True)

    def extra_repr(self):
        return f"sigma={self.sigma_base:g}"


class _Index:
    """The fitted kNN structure: faiss index over the centred float32 embeddings of the training set."""

    def __init__(self, emb, factory):
        self.n, self.d = emb.shape
        self.mu = emb.mean(0, dtype=np.float64)
        for i in range(0, self.n, 8192):  # centre in place (translation: distances unchanged)
            emb[i:i + 8192] = (emb[i:i + 8192].astype(np.float64) - self.mu).astype(np.float32)
        self.index = faiss.index_factory(self.d, factory, faiss.METRIC_L2)
        self.exact = type(self.index) in (faiss.IndexFlat, faiss.IndexFlatL2) \
            and self.index.metric_type == faiss.METRIC_L2
        if not self.index.is_trained:
            self.index.train(emb)
        self.index.add(emb)
        if self.exact:  # share faiss' storage instead of keeping a second copy
            emb = faiss.rev_swig_ptr(self.index.get_xb(), self.n * self.d).reshape(self.n, self.d)
        self.xb = torch.from_numpy(emb)
        self.max_sq_norm = max(float((self.xb[i:i + 8192].double() ** 2).sum(1).max())
                               for i in range(0, self.n, 8192))
        self.mu = torch.from_numpy(self.mu)
        self.gpu = {}  # cuda device index -> (resources, gpu index, xb on that device)

    def on_gpu(self, device):
        """(gpu index, xb) for ``device``, or None when faiss cannot search there."""
        if device.type != "cuda" or not _faiss_has_gpu():
            return None
        dev = device.index if device.index is not None else torch.cuda.current_device()
        if dev not in self.gpu:
            try:
                resources = faiss.StandardGpuResources()
                self.gpu[dev] = (resources, faiss.index_cpu_to_gpu(resources, dev, self.index),
                                 self.xb.to(torch.device("cuda", dev)))
            except Exception as error:  # e.g. an index type without GPU support
                warnings.warn(f"faiss GPU index unavailable ({error}); searching on the CPU")
                self.gpu[dev] = None
        return self.gpu[dev]

    def bound(self, d, on_gpu):
        """c such that |faiss' squared distance - exact| <= c (||q||^2 + ||x_i||^2) (Higham's gamma_n)."""
        nu = (d + 4) * _U32
        if nu >= 0.5:
            return math.inf
        return 2 * nu / (1 - nu) + 4 * _U32 + (_GPU_SLACK if on_gpu else 0.0)


class KnnSigma(nn.Module):
    """sigma(x) = sigma_b * exp(r * (d_k(x) - m)) with d_k from an exact faiss kNN index (PAPER.md sec. 3).

    Args:
        sigma_base: sigma_b > 0.  semi_elasticity: r >= 0.  k: neighbours, 1 <= k < n.
        m: normalisation; None -> set by ``fit`` to the mean over training points of d_k(x_i),
            each point excluded from its own neighbours, so a typical sigma is about sigma_b.
        embedding: phi (callable [B, ...] -> [B, D']); None = flatten (Lip 1). See
            ``lightning_idrs.embeddings`` for the ``lipschitz_constant`` convention.
        embedding_lipschitz: declared Lip(phi), overrides ``embedding.lipschitz_constant``.
        index_factory: faiss index string; only "Flat" (exact L2) can be certified.
        candidate_margin: extra faiss candidates re-ranked in float64 (default max(16, k)).
        batch_size: queries per search, bounds memory for any B.

    State: ``state_dict()`` carries sigma_b, r, k, m, Lip declaration, the index type, the training
    set fingerprint (extra state) and phi's parameters (submodule); never the training data. After
    loading, call ``fit(train)`` again: m is kept, and a different ``train`` raises ValueError.

    Training noise: ``training_sigma(x, idx)`` returns sigma for training point ``idx`` with the point
    itself excluded (by index, so duplicates still count), cached once per fit. It depends only on the
    clean image: with data augmentation every view of x_i gets sigma(x_i) of the clean image, not of
    the view (a fixed per-example level; the certificate is unaffected, it only uses ``forward``).
    """

    def __init__(self, sigma_base, semi_elasticity, k, m=None, embedding=None, *, embedding_lipschitz=None,
                 index_factory="Flat", candidate_margin=None, batch_size=2048):
        super().__init__()
        self.sigma_base = _check_finite(sigma_base, "sigma_base", 0.0, strict=True)
        self.r = _check_finite(semi_elasticity, "semi_elasticity (r)", 0.0)
        self.k = _check_k(k)
        self.m = None if m is None else _check_finite(m, "m")
        if embedding is not None and not callable(embedding):
            raise ValueError(f"embedding must be callable or None, got {type(embedding).__name__}")
        self.embedding = embedding
        self.embedding_lipschitz = None if embedding_lipschitz is None else _check_finite(
            embedding_lipschitz, "embedding_lipschitz", 0.0, strict=True)
        if not isinstance(index_factory, str):
            raise ValueError(f"index_factory must be a faiss index_factory string, got {index_factory!r}")
        self.index_factory = index_factory
        margin = max(16, self.k) if candidate_margin is None else candidate_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise ValueError(f"candidate_margin must be an integer >= 0, got {candidate_margin!r}")
        self.candidate_margin = int(margin)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.fingerprint = None
        self._index = None
        self._fitted_with = None  # (fingerprint, k, index_factory, phi state hash) of self._index
        self.register_buffer("_train_dist", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_load_state_dict_post_hook(KnnSigma._after_load)

    # ----------------------------------------------------------------------------- interface
    @property
    def is_fitted(self):
        return self._index is not None and self.m is not None

    @property
    def index_is_exact(self):
        return self._index.exact if self._index is not None else self.index_factory.strip() == "Flat"

    @property
    def lipschitz_constant(self):
        """Lip(phi) used for the certificate, or None when phi declares none."""
        return embedding_lipschitz(self.embedding, self.embedding_lipschitz)

    @property
    def semi_elasticity(self):
        """The r the certificate must use: r * Lip(phi). Raises ValueError when it can't be justified."""
        if self.r == 0.0:
            return 0.0  # sigma is the constant sigma_b whatever the index or phi
        if not self.index_is_exact:
            raise ValueError(f"index_factory={self.index_factory!r} is an approximate kNN index: its sigma(x) "
                             "is not provably r-semi-elastic, refusing to certify (use 'Flat')")
        lip = self.lipschitz_constant
        if lip is None:
            raise ValueError(f"embedding {type(self.embedding).__name__} declares no Lipschitz constant: set "
                             "its `lipschitz_constant` attribute or pass KnnSigma(embedding_lipschitz=L) to certify")
        return self.r * lip

    def fit(self, train, cache_training=True):
        """Build the exact index over phi(train) ([n, ...]); set m if None; returns self.

        ``cache_training``: compute the self-excluded training sigmas now (always done when m is
        None), else on the first ``training_sigma`` call; either way on the module's device (move
        the module to a GPU first to search there).
        """
        train = _as_batch(train, "train")
        n = len(train)
        if self.k >= n:
            raise ValueError(f"k must be smaller than the number of training points (each point is excluded "
                             f"from its own neighbours), got k={self.k} with {n} training points")
        fingerprint = dataset_fingerprint(train)
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(f"training set fingerprint {fingerprint[:16]}... does not match the fingerprint "
                             f"{self.fingerprint[:16]}... this sigma was fitted/saved with: refusing to build a "
                             "different sigma(x)")
        emb = None
        for i in range(0, n, self.batch_size):
            block = self._embed(train[i:i + self.batch_size]).to("cpu", torch.float32).numpy()
            if emb is None:
                emb = np.empty((n, block.shape[1]), dtype=np.float32)
            emb[i:i + len(block)] = block
        if not np.isfinite(emb).all():
            raise ValueError("embedding(train) contains NaN or inf values")
        self._index = _Index(emb, self.index_factory)
        self.fingerprint = fingerprint
        self._fitted_with = self._index_key()
        self._train_dist = torch.empty(0, dtype=torch.float64, device=self._train_dist.device)
        if cache_training or self.m is None:
            self._cache_training()
        if self.m is None:
            self.m = float(self._train_dist.mean())
        return self

    def forward(self, x):
        """sigma(x) for a batch [B, ...]: float32 [B] on x's device."""
        return self.sigma_from_distance(self.mean_knn_distance(x)).to(torch.float32)

    @torch.no_grad()
    def mean_knn_distance(self, x):
        """d_k(x) in float64, shape [B], on x's device."""
        self._require_fitted()
        x = _as_batch(x, "x")
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(0, x.shape[0], self.batch_size):
            q = self._embed(x[i:i + self.batch_size])
            if q.shape[1] != self._index.d:
                raise ValueError(f"x has {q.shape[1]} features per point after the embedding, but the index "
                                 f"holds {self._index.d}-dimensional points")
            if not torch.isfinite(q).all():
                raise ValueError("embedding(x) contains NaN or inf values")
            out[i:i + len(q)] = self._knn_mean(q - self._index.mu.to(q.device), None).to(x.device)
        return out

    def sigma_from_distance(self, dist):
        return self.sigma_base * torch.exp(self.r * (dist - self.m))

    def training_sigma(self, x, idx):
        """sigma of training points ``idx`` (positions in ``fit``'s train), themselves excluded."""
        if self._train_dist.numel() == 0:  # not cached at fit (or dropped by a checkpoint load)
            self._require_fitted()
            self._cache_training()
        idx = torch.as_tensor(idx)
        if x is not None and x.shape[0] != idx.shape[0]:
            raise ValueError(f"x has {x.shape[0]} points but idx has {idx.shape[0]}")
        n = len(self._train_dist)
        if idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"idx must lie in [0, {n}), got values in [{idx.min()}, {idx.max()}]")
        dist = self._train_dist[idx.to(self._train_dist.device, torch.long)]
        out = self.sigma_from_distance(dist).to(torch.float32)
        return out.to(x.device) if x is not None else out

    # ----------------------------------------------------------------------------- kNN core
    def _embed(self, x):
        """phi(x) as float64 [B, D'] (flatten when phi is None)."""
        if self.embedding is None:
            return x.reshape(x.shape[0], -1).to(torch.float64)
        device = next(iter(self.embedding.state_dict().values()), x).device \
            if isinstance(self.embedding, nn.Module) else x.device
        was_training = getattr(self.embedding, "training", False)
        with torch.no_grad():
            if was_training:
                self.embedding.eval()  # phi must be a fixed function (no dropout / batch statistics)
            try:
                out = self.embedding(x.to(device))
            finally:
                if was_training:
                    self.embedding.train()
        return out.reshape(x.shape[0], -1).to(torch.float64)

    def _cache_training(self):
        """d_k of every training point, itself excluded; searched on the module's device."""
        index, device = self._index, self._train_dist.device
        dist = torch.empty(index.n, dtype=torch.float64, device=device)
        for i in range(0, index.n, self.batch_size):
            rows = torch.arange(i, min(i + self.batch_size, index.n))
            dist[i:i + len(rows)] = self._knn_mean(index.xb[rows].to(device, torch.float64), rows).to(device)
        self._train_dist = dist

    @torch.no_grad()
    def _knn_mean(self, q, exclude):
        """Mean float64 distance from centred queries q [b, d] to their k nearest training points.

        ``exclude``: LongTensor [b] of training indices to drop from each row's neighbours, or None.
        """
        index, k = self._index, self.k
        gpu = index.on_gpu(q.device)
        device = q.device if gpu is not None else torch.device("cpu")
        q = q.to(device)
        xb = gpu[2] if gpu is not None else index.xb
        exclude = None if exclude is None else exclude.to(device)
        kc = min(index.n, k + (exclude is not None) + self.candidate_margin)
        searcher = gpu[1] if gpu is not None and kc <= _GPU_MAX_K else index.index
        dist2, ids = searcher.search(np.ascontiguousarray(q.to("cpu", torch.float32).numpy()), kc)
        dist2, ids = torch.from_numpy(dist2).to(device), torch.from_numpy(ids).to(device)
        nearest = self._candidate_dist(q, xb, ids, exclude).topk(k, dim=1, largest=False).values
        if kc == index.n or not index.exact:
            ok = torch.ones(len(q), dtype=torch.bool, device=device)
        else:  # no non-candidate can be closer than the k-th: faiss put it after all candidates
            slack = index.bound(index.d, searcher is not index.index) * ((q * q).sum(1) + index.max_sq_norm)
            ok = (dist2.max(1).values.double() - slack >= nearest[:, -1] ** 2) & (ids >= 0).all(1)
        ok &= torch.isfinite(nearest[:, -1])  # fewer than k valid candidates (approximate index)
        out = nearest.mean(1)
        redo = (~ok).nonzero().squeeze(1)
        if len(redo):
            out[redo] = self._brute_force(q[redo], xb, None if exclude is None else exclude[redo])
        return out

    def _candidate_dist(self, q, xb, ids, exclude):
        """Exact float64 distances ||q - x_id|| (norm of the difference) of the candidates; +inf for
        excluded or missing ones."""
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

    def _brute_force(self, q, xb, exclude):
        """Float64 scan over all training points: the fallback when faiss' ranking can't be proven."""
        n, k = len(xb), self.k
        kc = min(n, k + (exclude is not None) + self.candidate_margin)
        best_d = torch.full((len(q), 0), math.inf, dtype=torch.float64, device=q.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        q_sq = (q * q).sum(1, keepdim=True)
        for j in range(0, n, 8192):
            block = xb[j:j + 8192].to(torch.float64)
            d2 = q_sq + (block * block).sum(1) - 2 * q @ block.T
            best_d, pos = torch.cat([best_d, d2], 1).topk(min(kc, best_d.shape[1] + len(block)), 1, largest=False)
            best_i = torch.cat([best_i, torch.arange(j, j + len(block), device=q.device).expand(len(q), -1)], 1)
            best_i = best_i.gather(1, pos)
        return self._candidate_dist(q, xb, best_i, exclude).topk(k, dim=1, largest=False).values.mean(1)

    def _require_fitted(self):
        if not self.is_fitted:
            raise RuntimeError("KnnSigma is not fitted: call fit(train) first (also after loading a checkpoint)")

    # ----------------------------------------------------------------------------- state
    def _index_key(self):
        phi = None
        if isinstance(self.embedding, nn.Module):
            digest = hashlib.sha256()
            for name, value in self.embedding.state_dict().items():
                digest.update(name.encode())
                digest.update(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            phi = digest.hexdigest()
        return (self.fingerprint, self.k, self.index_factory, phi)

    def get_extra_state(self):
        return {"version": 1, "sigma_base": self.sigma_base, "r": self.r, "k": self.k, "m": self.m,
                "fingerprint": self.fingerprint, "embedding_lipschitz": self.embedding_lipschitz,
                "index_factory": self.index_factory}

    def set_extra_state(self, state):
        self.sigma_base = _check_finite(state["sigma_base"], "sigma_base", 0.0, strict=True)
        self.r = _check_finite(state["r"], "semi_elasticity (r)", 0.0)
        self.k = _check_k(state["k"])
        self.m = None if state["m"] is None else _check_finite(state["m"], "m")
        self.fingerprint = state["fingerprint"]
        self.embedding_lipschitz = state["embedding_lipschitz"]
        self.index_factory = state["index_factory"]

    @staticmethod
    def _after_load(module, incompatible_keys):
        """Keep a fitted index only if it still is the loaded sigma's index (same data, k, index, phi)."""
        if module._fitted_with is not None and module._index_key() != module._fitted_with:
            module._index, module._fitted_with = None, None
            module._train_dist = torch.empty(0, dtype=torch.float64, device=module._train_dist.device)

    def __getstate__(self):
        """Pickling / deepcopy drop the faiss index (the cached training sigmas stay): call fit(train) on
        the copy before calling it on new inputs."""
        state = self.__dict__.copy()
        state["_index"] = None
        return state

    def extra_repr(self):
        m = "None" if self.m is None else f"{self.m:.6g}"
        return (f"sigma_base={self.sigma_base:g}, r={self.r:g}, k={self.k}, m={m}, "
                f"index_factory={self.index_factory!r}, fitted={self.is_fitted}")
