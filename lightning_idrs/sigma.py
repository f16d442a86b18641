"""Noise levels sigma(x): the :class:`Sigma` interface and its two built-in implementations.

* :class:`ConstantSigma`: sigma(x) = sigma_b, Cohen et al.'s randomized smoothing (RS), r = 0.
* :class:`KnnSigma`: the paper's sigma(x) = sigma_b * exp(r * (d_k(x) - m)), d_k the mean distance to the
  k nearest training points (an exact index, ``lightning_idrs.knn``), r the certificate's semi-elasticity;
  with an embedding phi, d_k is taken between embedded points at the rate r / Lip(phi).

Any subclass of :class:`Sigma` plugs in by ``class_path`` (``--model.sigma my_module.MySigma``);
docs/extending.md says what an implementation must guarantee and shows one.
"""

import math
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from lightning_idrs.configurable import Configurable, config_of
from lightning_idrs.digests import dataset_fingerprint, fingerprint_in_background, state_dict_sha256
from lightning_idrs.embeddings import Embedding, embed, embed_training, embedding_lipschitz, rate_for, semi_elasticity_for
from lightning_idrs.knn import KnnBackend, KnnIndex, check_backend
from lightning_idrs.arguments import FiniteFloat, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check

__all__ = ["Sigma", "ConstantSigma", "KnnSigma", "dataset_fingerprint"]


def _as_batch(x, name):
    x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if x.ndim < 2 and name == "train":
        raise ValueError(f"train must have shape [n, ...] with at least 2 dimensions, got {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape [B, ...], got a scalar")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return x


class Sigma(Configurable, nn.Module):
    """A noise level sigma(x) > 0 per input, and the semi-elasticity r the certificate must use.

    Implement ``forward`` and ``semi_elasticity``; override the rest where needed. Keep any state
    that defines sigma(x) in buffers, parameters or ``get_extra_state`` so it is saved with the model.

    * ``forward(x)``: a batch [B, *input_shape] (pixel space) -> sigma(x) as a float tensor [B] on x's
      device, finite and > 0. It must be a fixed function of x once ``fit`` has run.
    * ``semi_elasticity``: r with |log sigma(x) - log sigma(y)| <= r ||x - y||_2 for all x, y; raise
      ValueError when none can be justified (certification is then refused).
    * ``fit(train)``: called once with all clean training inputs [n, *input_shape] before training and
      before certification (also after loading a checkpoint); returns self.
    * ``training_sigma(x, idx)``: the level for training points ``idx`` (positions in ``train``);
      defaults to ``forward(x)``.
    * ``log_error(sigma, reach)``: a bound on |log forward(y) - log sigma(y)| (floating-point error
      of forward against the exact r-semi-elastic function) for every y within ``reach`` of a point
      where forward returned ``sigma``. The default, one rounding to float32 of a value computed in
      float64, fits a forward that computes in float64; override it otherwise.
    docs/extending.md shows a sigma of your own (run by tests/test_docs.py).
    """

    #: log_error's default: one float32 rounding (2^-24 relative) plus a margin for float64 arithmetic
    DEFAULT_LOG_ERROR = 2.0**-24 * (1 + 2.0**-20) + 2.0**-40

    RUNTIME_OPTIONS: tuple = ()  #: init args choosing how sigma(x) is computed, not which (checkpoint.comparable_sigma)

    def fit(self, train: torch.Tensor) -> "Sigma":
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    @property
    def semi_elasticity(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define the semi_elasticity property")

    def training_sigma(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self(x)

    def log_error(self, sigma: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
        return torch.full_like(sigma, self.DEFAULT_LOG_ERROR, dtype=torch.float64)

    @property
    def label(self) -> str:
        """A short description for plots and logs."""
        try:
            return f"{type(self).__name__} (r={self.semi_elasticity:g})"
        except ValueError:
            return type(self).__name__

    @property
    def config(self) -> Optional[dict]:
        """``{"class_path", "init_args"}`` that rebuilds this sigma before its state dict is loaded."""
        return config_of(self)


class ConstantSigma(Sigma):
    """sigma(x) = sigma (Cohen et al.'s RS): semi-elasticity 0, nothing to fit.

    Args:
        sigma_base: the noise level sigma > 0.
    """

    def __init__(self, sigma_base: PositiveFloat = 0.25):
        super().__init__()
        self.sigma_base = check(PositiveFloat, sigma_base, "sigma_base")

    @property
    def semi_elasticity(self) -> float:
        return 0.0

    def log_error(self, sigma, reach):
        return torch.zeros_like(sigma, dtype=torch.float64)  # the same number everywhere

    @property
    def label(self) -> str:
        return f"RS (sigma={self.sigma_base:g})"

    def forward(self, x):
        return torch.full((x.shape[0],), self.sigma_base, dtype=torch.float32, device=x.device)

    def get_extra_state(self):
        return {"sigma_base": self.sigma_base}

    def set_extra_state(self, state):
        self.sigma_base = check(PositiveFloat, state["sigma_base"], "sigma_base")

    def extra_repr(self):
        return f"sigma={self.sigma_base:g}"


class KnnSigma(Sigma):
    """sigma(x) = sigma_b * exp((r / Lip(phi)) * (d_k(phi(x)) - m)), d_k from an exact kNN index of the training set.

    Args:
        sigma_base: sigma_b > 0.
        semi_elasticity: r >= 0, sigma's semi-elasticity in input space (the certificate's r, the
            ``semi_elasticity`` property). The exponent's rate is r / Lip(phi) (:attr:`rate`; r itself
            for Lip(phi) = 1); an embedding that declares no Lip(phi) is refused by ``fit`` (r > 0).
        k: neighbours averaged, 1 <= k < number of training points.
        m: normalisation; None -> set by ``fit`` to the mean over training points of d_k(x_i), each
            point excluded from its own neighbours, so a typical sigma is about sigma_b.
        embedding: phi ([B, ...] -> [B, D']; in a config an ``Embedding`` such as ``PCAProjection``, in
            Python any callable); None = flatten (Lip 1). See ``lightning_idrs.embeddings`` for the
            ``lipschitz_constant`` convention.
        embedding_lipschitz: declared Lip(phi), overrides ``embedding.lipschitz_constant``.
        index_factory: faiss index string; only "Flat" (exact L2) can be certified.
        candidate_margin: extra faiss candidates re-ranked in float64 (default max(16, k)).
        batch_size: queries per search, bounds memory for any B.
        statistic: ``mean`` (the paper's d_k: the mean distance to the k nearest) or ``kth`` (the
            distance to the k-th nearest); both are 1-Lipschitz, so the certificate is the same.
        knn_backend: the kNN search: ``auto`` (faiss' GPU index if it works, else torch on CUDA), faiss, torch.

    State: ``state_dict()`` carries sigma_b, r, k, m, Lip declaration, the index type, the training
    set fingerprint (extra state) and phi's parameters (submodule); never the training data. After
    loading, call ``fit(train)`` again: m is kept, and a different ``train`` raises ValueError.

    Training noise: ``training_sigma(x, idx)`` returns sigma for training point ``idx`` with the point
    itself excluded (by index, so duplicates still count), cached once per fit. It depends only on the
    clean image: with data augmentation every view of x_i gets sigma(x_i) of the clean image.

    Example (m defaults to the training points' mean d_k, so a typical sigma is about sigma_b):

        >>> sigma = KnnSigma(0.25, semi_elasticity=0.1, k=5).fit(torch.rand(200, 1, 8, 8))
        >>> levels = sigma(torch.rand(50, 1, 8, 8))
        >>> bool((levels > 0.2).all() and (levels < 0.3).all()), sigma.semi_elasticity, sigma.label
        (True, 0.1, 'IDRS (sigma_b=0.25, r=0.1, k=5)')
    """

    RUNTIME_OPTIONS = ("knn_backend",)
    knn_backend = property(lambda self: self._knn_backend, lambda self, value: setattr(
        self, "_knn_backend", check_backend(value, self.index_factory)), doc="the kNN search; may change any time")

    def __init__(self, sigma_base: PositiveFloat = 0.25, semi_elasticity: NonNegativeFloat = 0.1,
                 k: PositiveInt = 20, m: Optional[FiniteFloat] = None, embedding: Optional[Embedding] = None, *,
                 embedding_lipschitz: Optional[PositiveFloat] = None, index_factory: str = "Flat",
                 candidate_margin: Optional[NonNegativeInt] = None, batch_size: PositiveInt = 2048,
                 statistic: Literal["mean", "kth"] = "mean", knn_backend: KnnBackend = "auto"):
        super().__init__()
        self.sigma_base = check(PositiveFloat, sigma_base, "sigma_base")
        self.r = check(NonNegativeFloat, semi_elasticity, "semi_elasticity")
        self._recorded_rate: Optional[float] = None  # the rate a checkpoint of 0.2 recorded (set_extra_state)
        self.k = check(PositiveInt, k, "k")
        self.m = None if m is None else check(FiniteFloat, m, "m")
        if embedding is not None and not callable(embedding):
            raise ValueError(f"embedding must be callable or None, got {type(embedding).__name__}")
        self.embedding = embedding
        self.embedding_lipschitz = None if embedding_lipschitz is None else check(
            PositiveFloat, embedding_lipschitz, "embedding_lipschitz")
        if not isinstance(index_factory, str):
            raise ValueError(f"index_factory must be a faiss index_factory string, got {index_factory!r}")
        self.index_factory = index_factory
        self.candidate_margin = max(16, self.k) if candidate_margin is None else check(
            NonNegativeInt, candidate_margin, "candidate_margin")
        self.batch_size = check(PositiveInt, batch_size, "batch_size")
        if statistic not in ("mean", "kth"):
            raise ValueError(f"statistic must be 'mean' or 'kth', got {statistic!r}")
        self.statistic = statistic
        self.knn_backend = knn_backend
        self.fingerprint = None
        self._input_features = 0  # N of the training inputs (set by fit; enters log_error)
        self._index: Optional[KnnIndex] = None
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
    def rate(self) -> float:
        """The rate in the exponent, per unit of distance between embedded points: r / Lip(phi), rounded
        down so that rate * Lip(phi) <= r exactly. Raises ValueError when phi declares no Lipschitz constant."""
        if self._recorded_rate is not None:
            return self._recorded_rate
        if self.r == 0.0:
            return 0.0
        return rate_for(self.r, self._required_lipschitz())

    @property
    def semi_elasticity(self):
        """r, sigma's semi-elasticity in input space; ValueError where unjustified (approximate index, no Lip(phi))."""
        if self.rate == 0.0:
            return 0.0  # sigma is the constant sigma_b whatever the index or phi
        if not self.index_is_exact:
            raise ValueError(f"index_factory={self.index_factory!r} is an approximate kNN index: its sigma(x) "
                             "is not provably r-semi-elastic, refusing to certify (use 'Flat')")
        if self._recorded_rate is not None:  # a checkpoint of 0.2, whose r was the rate: rate * Lip(phi)
            return semi_elasticity_for(self._recorded_rate, self._required_lipschitz())
        return self.r

    def _required_lipschitz(self) -> float:
        return embedding_lipschitz(self.embedding, self.embedding_lipschitz, required=True)

    @property
    def label(self):
        kth = ", k-th neighbour" if self.statistic == "kth" else ""
        return f"IDRS (sigma_b={self.sigma_base:g}, r={self.r:g}, k={self.k}{kth})"

    def fit(self, train, cache_training=False):
        """Build the exact index over phi(train) ([n, ...]); set m if None; returns self.

        An embedding with a ``fit`` method (e.g. ``PCAProjection``) is fitted on ``train`` first unless it
        already is (``is_fitted``). Index and self-excluded training sigmas (a kNN search per training point) are
        built on the module's device (``KnnSigma(...).to("cuda").fit(train)``), the sigmas now when m is None or
        ``cache_training``, else at the first ``training_sigma`` (certifying a loaded model never pays for them).
        """
        train = _as_batch(train, "train")
        n = len(train)
        if self.k >= n:
            raise ValueError(f"k must be smaller than the number of training points (each point is excluded "
                             f"from its own neighbours), got k={self.k} with {n} training points")
        host = train.detach().to("cpu").float()  # the fingerprint and mu are taken on the CPU, on any device
        with fingerprint_in_background(host) as fingerprint:
            if self.fingerprint is not None and fingerprint() != self.fingerprint:  # before anything changes
                raise ValueError(f"training set fingerprint {fingerprint()[:16]}... does not match the fingerprint "
                                 f"{self.fingerprint[:16]}... this sigma was fitted/saved with: refusing to build a "
                                 "different sigma(x)")
            if hasattr(self.embedding, "fit") and not getattr(self.embedding, "is_fitted", True):
                self.embedding.fit(train)
            self.rate  # refuse now an embedding that declares no Lipschitz constant (r > 0)
            points = embed_training(self.embedding, train, host, self.batch_size)
            index = KnnIndex(points, self.index_factory, self.knn_backend, self._train_dist.device)
        self._index = index
        self._input_features = math.prod(train.shape[1:])
        self.fingerprint = fingerprint()
        self._fitted_with = self._index_key()
        self._train_dist = torch.empty(0, dtype=torch.float64, device=self._train_dist.device)
        if cache_training or self.m is None:
            self._cache_training()
        if self.m is None:
            self.m = float(self._train_dist.mean())
        return self

    def forward(self, x):
        """sigma(x) for a batch [B, ...]: float32 [B] on x's device (computed in float64, then rounded)."""
        return self.sigma_from_distance(self.neighbour_distance(x)).to(torch.float32)

    def log_error(self, sigma, reach):
        """Floating-point error of log forward(y) within ``reach`` of a point with level ``sigma``.

        forward is rate (d_k - m) + log sigma_b in float64, d_k a mean of k norms ||phi(y) - mu - c_i||,
        rounded to float32 at the end (2^-24 relative). Standard forward-error bounds (Higham, ch. 3)
        give |d_k^ - d_k| <= g (d_k + 2 B) with g = (D_in + D + k + 16) 2^-52 and
        B = max ||c_i|| + ||mu||, for phi evaluated in float64; and d_k(y) <= d_k(x) + Lip(phi) reach
        (d_k is Lip(phi)-Lipschitz in y; ``embedding.lipschitz_excess`` allows for a computed phi whose
        constant exceeds the declared one by a hair). See docs/math.md, "Floating point".
        """
        rate = self.rate
        if rate == 0.0:
            return torch.zeros_like(sigma, dtype=torch.float64)
        self._require_fitted()
        index, lip = self._index, self._required_lipschitz()
        d = self.m + torch.log(sigma.double() / self.sigma_base) / rate + lip * reach.double()
        bound = math.sqrt(index.max_sq_norm) + float(index.mu.norm())
        gamma = (self._input_features + index.d + self.k + 16) * 2.0**-52
        float64 = rate * gamma * (d.clamp(min=0) + 2 * bound) + rate * abs(self.m) * 2.0**-52 + 8 * 2.0**-53
        # an embedding whose computed Lipschitz constant may exceed the declared one by a hair
        float64 = float64 + rate * lip * getattr(self.embedding, "lipschitz_excess", 0.0) * reach.double()
        return float64 - math.log1p(-(2.0**-24))  # plus the rounding of the result to float32

    @torch.no_grad()
    def neighbour_distance(self, x):
        """d_k(x) in float64, shape [B], on x's device (the k-th neighbour's distance with statistic="kth")."""
        self._require_fitted()
        x = _as_batch(x, "x")
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(0, x.shape[0], self.batch_size):
            q = embed(self.embedding, x[i:i + self.batch_size])
            if q.shape[1] != self._index.d:
                raise ValueError(f"x has {q.shape[1]} features per point after the embedding, but the index "
                                 f"holds {self._index.d}-dimensional points")
            if not torch.isfinite(q).all():
                raise ValueError("embedding(x) contains NaN or inf values")
            out[i:i + len(q)] = self._index.neighbour_distance(q, self.k, self.candidate_margin, self.statistic,
                                                               self.knn_backend)
        return out

    def sigma_from_distance(self, dist):
        return self.sigma_base * torch.exp(self.rate * (dist - self.m))

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

    def _cache_training(self):
        """d_k of every training point, itself excluded; searched on the module's device."""
        index, device = self._index, self._train_dist.device
        self._train_dist = index.training_neighbour_distance(None, self.k, self.candidate_margin, device,
                                                             self.statistic, self.knn_backend, self.batch_size)

    def _require_fitted(self):
        if not self.is_fitted:
            raise RuntimeError("KnnSigma is not fitted: call fit(train) first (also after loading a checkpoint)")

    # ----------------------------------------------------------------------------- state
    def _index_key(self):
        phi = state_dict_sha256(self.embedding.state_dict()) if isinstance(self.embedding, nn.Module) else None
        return (self.fingerprint, self.k, self.index_factory, self.statistic, phi)

    def get_extra_state(self):
        return {"version": 2, "sigma_base": self.sigma_base, "semi_elasticity": self.r,
                "recorded_rate": self._recorded_rate, "k": self.k, "m": self.m, "fingerprint": self.fingerprint,
                "embedding_lipschitz": self.embedding_lipschitz, "index_factory": self.index_factory,
                "statistic": self.statistic}

    def set_extra_state(self, state):
        self.sigma_base = check(PositiveFloat, state["sigma_base"], "sigma_base")
        self.k = check(PositiveInt, state["k"], "k")
        self.m = None if state["m"] is None else check(FiniteFloat, state["m"], "m")
        self.fingerprint = state["fingerprint"]
        self.embedding_lipschitz = state["embedding_lipschitz"]
        self.index_factory = state["index_factory"]
        self.statistic = state.get("statistic", "mean")  # checkpoints of 0.1 have the mean only
        if state.get("version", 1) >= 2:
            self.r, rate = check(NonNegativeFloat, state["semi_elasticity"], "semi_elasticity"), state["recorded_rate"]
            self._recorded_rate = None if rate is None else check(NonNegativeFloat, rate, "recorded_rate")
        else:  # 0.1/0.2 recorded the exponent's rate as r (and certified rate * Lip(phi)): keep their sigma(x)
            self._recorded_rate = check(NonNegativeFloat, state["r"], "semi_elasticity")
            lip = embedding_lipschitz(self.embedding, self.embedding_lipschitz)
            self.r = self._recorded_rate if lip is None else semi_elasticity_for(self._recorded_rate, lip)

    @staticmethod
    def _after_load(module, incompatible_keys):
        """Keep a fitted index only if it still is the loaded sigma's index (same data, k, index, phi)."""
        if module._fitted_with is not None and module._index_key() != module._fitted_with:
            module._index, module._fitted_with = None, None
            module._train_dist = torch.empty(0, dtype=torch.float64, device=module._train_dist.device)

    def __getstate__(self):
        """Pickling / deepcopy drop the faiss index (not the cached training sigmas): call fit(train) on a copy."""
        state = self.__dict__.copy()
        state["_index"] = None
        return state

    def extra_repr(self):
        m = "None" if self.m is None else f"{self.m:.6g}"
        return (f"sigma_base={self.sigma_base:g}, r={self.r:g}, k={self.k}, statistic={self.statistic}, m={m}, "
                f"index_factory={self.index_factory!r}, knn_backend={self.knn_backend}, fitted={self.is_fitted}")
