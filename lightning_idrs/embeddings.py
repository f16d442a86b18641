"""Embeddings phi for the kNN noise level sigma(x) (docs/math.md, "the kNN sigma").

With an embedding, sigma(x) = sigma_b * exp(rate * (mean_{i in N_k(phi(x))} ||phi(x) - phi(x_i)|| - m)),
so log sigma is rate * Lip(phi)-Lipschitz. ``KnnSigma(semi_elasticity=r)`` sets rate = r / Lip(phi), so
that sigma is r-semi-elastic in input space and the certificate uses r.

Convention: an embedding is any callable mapping a batch [B, ...] to [B, D']. It declares its
Lipschitz constant (w.r.t. the Euclidean norm on both sides) as an attribute ``lipschitz_constant``;
otherwise ``KnnSigma(embedding_lipschitz=L)`` must declare it, or ``KnnSigma.fit`` refuses it (r > 0).
``embedding=None`` is the identity (flatten), Lip = 1. An embedding with a ``fit(train)`` method
and an ``is_fitted`` property (:class:`PCAProjection`) is fitted on the training inputs by
``KnnSigma.fit``; from YAML: ``model.sigma.init_args.embedding: {class_path:
lightning_idrs.embeddings.PCAProjection, init_args: {dim: 20}}``.
"""
import math
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from lightning_idrs.configurable import Configurable
from lightning_idrs.arguments import PositiveFloat, PositiveInt, check

__all__ = ["Embedding", "OrthonormalProjection", "PCAProjection", "embed", "embed_training", "embedding_lipschitz",
           "rate_for", "semi_elasticity_for"]


def embedding_lipschitz(embedding, declared=None, required=False):
    """Lip(phi): ``declared`` if given, 1 for the identity (None), else ``embedding.lipschitz_constant``.

    Returns None when nothing is declared (a learned phi without a bound); ``required`` raises ValueError then.
    """
    if declared is not None:
        return check(PositiveFloat, declared, "embedding_lipschitz")
    if embedding is None:
        return 1.0
    value = getattr(embedding, "lipschitz_constant", None)
    if value is None and required:
        raise ValueError(f"embedding {type(embedding).__name__} declares no Lipschitz constant, so sigma(x) cannot "
                         "be made r-semi-elastic in input space: set its `lipschitz_constant` attribute or pass "
                         "KnnSigma(embedding_lipschitz=L)")
    return None if value is None else check(PositiveFloat, value, "embedding.lipschitz_constant")


def embed(embedding, x: torch.Tensor) -> torch.Tensor:
    """phi(x) as float64 [B, D'] (flatten when phi is None), phi in eval mode (a fixed function: no
    dropout or batch statistics), on phi's device."""
    if embedding is None:
        return x.reshape(x.shape[0], -1).to(torch.float64)
    device = next(iter(embedding.state_dict().values()), x).device if isinstance(embedding, nn.Module) else x.device
    was_training = getattr(embedding, "training", False)
    with torch.no_grad():
        if was_training:
            embedding.eval()
        try:
            out = embedding(x.to(device))
        finally:
            if was_training:
                embedding.train()
    return out.reshape(x.shape[0], -1).to(torch.float64)


def embed_training(embedding, train: torch.Tensor, host: torch.Tensor, batch_size: int) -> torch.Tensor:
    """phi(train) as float32 [n, D'] on the CPU, ``batch_size`` inputs at a time (``host``: train as float32
    on the CPU; phi None, the flatten, is then a view of it: fl32(float64(x)) is x); ValueError if not finite."""
    n = len(train)
    if embedding is None:
        if train.dtype == torch.float64 and not torch.isfinite(host).all():
            raise ValueError("embedding(train) contains NaN or inf values (beyond float32's range)")
        return host.reshape(n, -1)
    emb = None
    for i in range(0, n, batch_size):
        block = embed(embedding, train[i:i + batch_size]).to("cpu", torch.float32)
        if emb is None:
            emb = torch.empty((n, block.shape[1]), dtype=torch.float32)
        emb[i:i + len(block)] = block
    if not torch.isfinite(emb).all():
        raise ValueError("embedding(train) contains NaN or inf values")
    return emb


def rate_for(r: float, lip: float) -> float:
    """The rate per unit of embedded distance that keeps sigma r-semi-elastic in input space: the
    largest float q <= r / lip with q * lip <= r exactly.

        >>> rate_for(0.4, 2.5), rate_for(0.3, 1.0)
        (0.16, 0.3)
    """
    q = r / lip
    while Fraction(q) * Fraction(lip) > Fraction(r):
        q = math.nextafter(q, 0.0)
    return q


def semi_elasticity_for(rate: float, lip: float) -> float:
    """The semi-elasticity in input space of a rate on phi's distances: the smallest float >= rate * lip."""
    p = rate * lip
    while Fraction(p) < Fraction(rate) * Fraction(lip):
        p = math.nextafter(p, math.inf)
    return p


class Embedding(Configurable, nn.Module):
    """Base class of embeddings that a config can name (``model.sigma.init_args.embedding``).

    ``forward`` maps [B, ...] to [B, D']; set ``lipschitz_constant`` (l2 to l2) so that ``KnnSigma``
    can scale its rate to r / Lip(phi). In Python any callable works (``KnnSigma(embedding=...)``).
    """

    lipschitz_constant = None


class OrthonormalProjection(Embedding):
    """phi(x) = P flatten(x) with orthonormal rows (P P^T = I), hence ||phi(x) - phi(y)|| <= ||x - y||.

    Lip(phi) = 1. The rows are checked to be orthonormal to ``atol`` and then made orthonormal to
    float64 precision (polar factor), and phi is evaluated in float64, so the bound holds as
    computed and not only on paper. There is no mean-centering: a translation does not change any
    distance between projected points, so the kNN distances are the same with or without it.

    ``OrthonormalProjection()`` (no components) is a placeholder to ``load_state_dict`` into; the
    loaded matrix may have any shape.
    """

    lipschitz_constant = 1.0

    def __init__(self, components=None, atol=1e-5):
        super().__init__()
        self.atol = float(atol)
        if components is None:
            matrix = torch.empty(0, 0, dtype=torch.float64)
        else:
            matrix = self._orthonormal(components, self.atol)
        self.register_buffer("components", matrix)

    @staticmethod
    def _orthonormal(components, atol, polish=True):
        matrix = torch.as_tensor(np.asarray(components) if not torch.is_tensor(components) else components)
        matrix = matrix.detach().to("cpu", torch.float64)
        if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[0] > matrix.shape[1]:
            raise ValueError(
                f"components must be a [dim, D] matrix with 1 <= dim <= D, got shape {tuple(matrix.shape)}"
            )
        if not torch.isfinite(matrix).all():
            raise ValueError("components contains NaN or inf values")
        gram = matrix @ matrix.T
        error = (gram - torch.eye(len(matrix), dtype=torch.float64)).abs().max().item()
        if error > atol:
            raise ValueError(
                f"components rows are not orthonormal: max |P P^T - I| = {error:.3g} > atol={atol:g}"
            )
        if not polish:
            return matrix
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u @ vh  # nearest matrix with exactly orthonormal rows (same row space)

    @property
    def lipschitz_excess(self) -> float:
        """How far the computed P's largest singular value may exceed 1: sqrt(1 + ||P P^T - I||_F) - 1."""
        if self.components.numel() == 0:
            return 0.0
        p = self.components.to(torch.float64)
        error = torch.linalg.matrix_norm(p @ p.T - torch.eye(len(p), dtype=torch.float64, device=p.device)).item()
        return (1.0 + error * (1 + 2.0**-40)) ** 0.5 - 1.0

    @property
    def in_features(self):
        return self.components.shape[1]

    @property
    def out_features(self):
        return self.components.shape[0]

    def forward(self, x):
        if self.components.numel() == 0:
            raise RuntimeError("OrthonormalProjection has no components: build it with from_pca or load a state_dict")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"x has {flat.shape[1]} features per point, the projection expects {self.in_features}"
            )
        return flat.to(torch.float64) @ self.components.to(flat.device).T

    @classmethod
    def from_pca(cls, train, dim, batch_size=4096):
        """Top-``dim`` principal directions of ``train`` ([n, ...]) as an orthonormal projection.

        Exact PCA in float64 (eigh of the D x D covariance when D <= n, else SVD of the data).
        """
        x = torch.as_tensor(train).detach().reshape(len(train), -1)
        n, d = x.shape
        if check(PositiveInt, dim, "dim") > min(n, d):
            raise ValueError(f"dim must be an integer in [1, min(n, D)] = [1, {min(n, d)}], got {dim!r}")
        mean = torch.zeros(d, dtype=torch.float64)
        for i in range(0, n, batch_size):
            mean += x[i:i + batch_size].to("cpu", torch.float64).sum(0)
        mean /= n
        if d <= n:
            cov = torch.zeros(d, d, dtype=torch.float64)
            for i in range(0, n, batch_size):
                block = x[i:i + batch_size].to("cpu", torch.float64) - mean
                cov += block.T @ block
            _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
            components = vectors[:, -dim:].flip(1).T
        else:
            centered = x.to("cpu", torch.float64) - mean
            components = torch.linalg.svd(centered, full_matrices=False)[2][:dim]
        signs = torch.sign(components[torch.arange(dim), components.abs().argmax(1)])
        return cls(components * signs[:, None])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "components"
        if key in state_dict:  # accept any shape (a placeholder is 0 x 0), then re-check orthonormality
            shape = state_dict[key].shape
            self.components = torch.empty(shape, dtype=torch.float64, device=self.components.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in state_dict:  # saved after polishing: check it, keep it bit for bit (sigma(x) must not move)
            self.components = self._orthonormal(self.components, 1e-12, polish=False).to(self.components.device)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, lipschitz_constant=1"


class PCAProjection(OrthonormalProjection):
    """The top ``dim`` principal directions of the training inputs, learnt by ``fit`` (Lip(phi) = 1).

    ``KnnSigma.fit`` calls ``fit(train)`` once; the components are then a buffer saved with the model,
    so a loaded checkpoint does not recompute them.
    """

    def __init__(self, dim: PositiveInt = 32):
        super().__init__()
        self.dim = check(PositiveInt, dim, "dim")

    @property
    def is_fitted(self):
        return self.components.numel() > 0

    def fit(self, train):
        fitted = OrthonormalProjection.from_pca(train, self.dim)
        self.components = fitted.components.to(self.components.device)
        return self
