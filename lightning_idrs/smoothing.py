"""Monte Carlo prediction and certification of a smoothed classifier (Cohen et al., 2019, Alg. 1-2).

g(x) = argmax_c P(f(x + sigma(x) * eps) = c), eps ~ N(0, I): one sigma per input, the same for all
of its noise samples (docs/math.md). With a constant sigma this is Cohen et al.'s RS.

* :func:`add_noise` draws x + sigma(x) * eps: the one noise path of training, validation and
  certification.
* :class:`SmoothedClassifier` runs CERTIFY / PREDICT on a batch of inputs at once.
* :func:`certify_chunks` certifies points of a data set in fixed chunks, chunk c with noise seeded
  from (seed, c), so the results do not depend on which process certifies which chunk, nor on
  interruptions; :func:`certify_sharded` shares the chunks out over the ranks of a distributed
  job and gathers the rows after each round. The ``certify`` command (under Lightning Fabric) and
  the certification Callback (under the Trainer's strategy) both use it.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from scipy import stats
from torch import nn

from lightning_idrs.radius import certified_radius
from lightning_idrs.tsv_log import TSV_HEADER
from lightning_idrs.validation import NonNegativeInt, OpenUnitInterval, PositiveInt, UsageError, check

ABSTAIN = -1

__all__ = ["ABSTAIN", "BrokenModelError", "CertifySettings", "Certificates", "CertifiedChunk", "ROW_FIELDS",
           "SmoothedClassifier", "add_noise", "certify_chunks", "certify_sharded", "chunk_seed",
           "clopper_pearson_lower", "plan_chunks"]


class BrokenModelError(UsageError):
    """The base classifier returned NaN / inf logits: its weights are broken, no certificate is issued."""

    def __init__(self, message: str, positions=()):
        super().__init__(message)
        self.positions = list(positions)  # positions in the batch of the inputs concerned


def add_noise(x: torch.Tensor, sigma: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x + sigma_i * eps_i with eps_i ~ N(0, I): one noise level per input of the batch ``x`` [B, ...]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * noise


def clopper_pearson_lower(successes, trials, alpha) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion: Beta(alpha; k, n-k+1)."""
    successes = np.asarray(successes, dtype=np.float64)
    bound = stats.beta.ppf(alpha, np.maximum(successes, 1e-300), trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


@dataclass
class CertifySettings:
    """How each point is certified: Cohen et al.'s CERTIFY and the noise stream (rows depend on all of it).

    Args:
        n0: noise samples to select the top class (Cohen et al.: 100).
        n: noise samples to estimate pA (Cohen et al.: 100,000).
        alpha: failure probability of each certificate, in (0, 1) (Cohen et al.: 0.001).
        batch_size: noisy samples per forward pass (part of the noise stream: a rerun must keep it).
        seed: seed of the noise; chunk c uses a generator seeded from (seed, c).
        points_per_chunk: consecutive points certified together in one vectorised call.
    """

    n0: PositiveInt = 100
    n: PositiveInt = 100_000
    alpha: OpenUnitInterval = 0.001
    batch_size: PositiveInt = 1000
    seed: NonNegativeInt = 0
    points_per_chunk: PositiveInt = 10

    def __post_init__(self):
        for name, kind in (("n0", PositiveInt), ("n", PositiveInt), ("alpha", OpenUnitInterval),
                           ("batch_size", PositiveInt), ("seed", NonNegativeInt), ("points_per_chunk", PositiveInt)):
            setattr(self, name, check(kind, getattr(self, name), name))


@dataclass
class Certificates:
    """Per-input results of :meth:`SmoothedClassifier.certify` (NumPy arrays, one entry per input)."""

    prediction: np.ndarray  # int64, ABSTAIN (-1) where pA_lower < 1/2
    p_a_lower: np.ndarray  # one-sided Clopper-Pearson lower bound on pA at confidence 1 - alpha
    sigma: np.ndarray  # sigma(x) used for the noise and the radius
    radius: np.ndarray  # certified l2 radius (0 for abstentions)

    def correct(self, labels) -> np.ndarray:
        """1 where the (non-abstained) prediction equals the label, else 0."""
        return (self.prediction == np.asarray(labels)).astype(np.int64)


class SmoothedClassifier:
    """Gaussian smoothing of ``base_classifier`` with per-input noise level ``sigma(x)``.

    Args:
        base_classifier: maps a batch [B, *input_shape] (pixel space) to logits [B, num_classes].
        sigma: a :class:`lightning_idrs.sigma.Sigma` (any callable mapping a batch to one sigma per
            input, [B], with attribute ``semi_elasticity``).
        num_classes: number of classes of the base classifier.
    """

    def __init__(self, base_classifier: nn.Module, sigma, num_classes: int, forward_context=nullcontext):
        self.base_classifier = base_classifier
        self.sigma = sigma
        self.num_classes = check(PositiveInt, num_classes, "num_classes")
        self.forward_context = forward_context  # e.g. Fabric's autocast: mixed precision for the base model only

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int, generator=None) -> Certificates:
        """CERTIFY for every input of the batch ``x`` at once.

        Selection: top class cA of n0 noisy samples. Estimation: n fresh samples, nA hits of cA,
        pA_lower = Beta(alpha; nA, n - nA + 1). Abstain if pA_lower < 1/2, else return cA and the
        radius ``certified_radius(pA_lower, sigma(x), r, N)`` (IDRS, or Cohen's for r = 0).
        """
        n0, n, batch_size = (check(PositiveInt, v, name) for v, name in ((n0, "n0"), (n, "n"), (batch_size, "batch_size")))
        alpha = check(OpenUnitInterval, alpha, "alpha")
        x = self._check_inputs(x)
        r = float(self.sigma.semi_elasticity)  # raises if the sigma function cannot be certified
        computed = self._sigmas(x)
        sigma = computed.to(x.dtype)  # the level the noise multiplies: the certificate is about this one
        guess = self._sample_counts(x, sigma, n0, batch_size, generator).argmax(dim=1)
        counts = self._sample_counts(x, sigma, n, batch_size, generator)
        n_a = counts.gather(1, guess[:, None])[:, 0].cpu().numpy()
        p_a_lower = clopper_pearson_lower(n_a, n, alpha)
        sigma_np = sigma.double().cpu().numpy()
        certified = p_a_lower >= 0.5
        prediction = np.where(certified, guess.cpu().numpy(), ABSTAIN)
        dim = math.prod(x.shape[1:])
        slack = self._log_slack(computed, sigma, r)
        radius = certified_radius(p_a_lower, sigma_np, r, dim if r > 0 else None, slack)
        return Certificates(prediction, p_a_lower, sigma_np, np.where(certified, radius, 0.0))

    def predict(self, x, n: int, alpha: float, batch_size: int, generator=None) -> np.ndarray:
        """PREDICT: top two counts nA, nB of n samples; abstain (-1) unless the two-sided binomial
        test of nA ~ Bin(nA + nB, 1/2) rejects at level alpha."""
        n, batch_size = check(PositiveInt, n, "n"), check(PositiveInt, batch_size, "batch_size")
        alpha = check(OpenUnitInterval, alpha, "alpha")
        x = self._check_inputs(x)
        counts = self._sample_counts(x, self._sigmas(x), n, batch_size, generator)
        top2 = counts.topk(min(2, self.num_classes), dim=1)
        n_a = top2.values[:, 0].cpu().numpy()
        n_b = top2.values[:, 1].cpu().numpy() if self.num_classes > 1 else np.zeros_like(n_a)
        p_value = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(n_a, n_b), n_a + n_b, 0.5))
        return np.where(p_value <= alpha, top2.indices[:, 0].cpu().numpy(), ABSTAIN)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        return x

    @torch.inference_mode()
    def _sigmas(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(self.sigma(x), device=x.device).reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma(x) must give one value per input: {sigma.shape[0]} for {x.shape[0]}")
        if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
            raise ValueError("sigma(x) must be finite and > 0 for every input")
        return sigma

    def _log_slack(self, computed: torch.Tensor, used: torch.Tensor, r: float) -> np.ndarray:
        """s_i with |log sigma_used(x_i) - log sigma_used(y)| <= r ||x_i - y|| + s_i (docs/math.md, "Floating point").

        sigma_used is sigma(x) rounded to the noise's dtype: twice (x_i and y) the rounding, plus twice
        the sigma function's own error bound within reach of x_i. The reach is 40 sigma_i: no radius
        exceeds Cohen's sigma * Phi^{-1}(pA_lower), and Phi^{-1} < 38.5 below 1 in float64.
        """
        if r == 0.0:
            return np.zeros(len(used))
        rounding = 0.0
        if torch.finfo(computed.dtype).eps < torch.finfo(used.dtype).eps:
            unit = torch.finfo(used.dtype).eps / 2
            rounding = -math.log1p(-unit)
        error = self.sigma.log_error(computed.double(), 40.0 * used.double())
        return 2.0 * (rounding + error.double().cpu().numpy())

    @torch.inference_mode()
    def _sample_counts(self, x, sigma, num: int, batch_size: int, generator) -> torch.Tensor:
        """counts[i, c] = #{j < num : f(x_i + sigma_i * eps_ij) = c}, in batches that mix inputs.

        The B * num noisy samples are enumerated input-major and cut into chunks of
        ``batch_size``, so a small model always sees full batches, whatever B and num are.
        """
        base = self.base_classifier
        was_training = getattr(base, "training", False)
        if isinstance(base, nn.Module):
            base.eval()
        try:
            counts = torch.zeros(x.shape[0], self.num_classes, dtype=torch.long, device=x.device)
            broken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # non-finite logits per input
            total = x.shape[0] * num
            for start in range(0, total, batch_size):
                owner = torch.arange(start, min(start + batch_size, total), device=x.device) // num
                noisy = add_noise(x[owner], sigma[owner], generator)
                with self.forward_context():
                    logits = base(noisy)
                if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                    raise ValueError(f"the base classifier returns logits of shape {tuple(logits.shape)}; expected "
                                     f"[{len(owner)}, {self.num_classes}] (num_classes={self.num_classes})")
                broken.index_add_(0, owner, (~torch.isfinite(logits).all(dim=1)).long())
                predictions = logits.argmax(dim=1)
                counts.index_put_((owner, predictions), torch.ones_like(predictions), accumulate=True)
            if broken.any():  # one check per call: no host sync per batch
                positions = broken.nonzero().flatten().tolist()
                raise BrokenModelError(f"the base classifier returned NaN or inf logits for input(s) {positions[:10]} "
                                       "of the batch: its weights are broken, no certificate is issued", positions)
            return counts
        finally:
            if isinstance(base, nn.Module):
                base.train(was_training)


# ---------------------------------------------------------------------------------- data sets
def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit generator seed for chunk ``chunk`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def plan_chunks(indices, points_per_chunk: int) -> list:
    """``[(c, indices[c*size:(c+1)*size])]``: the fixed chunks that :func:`certify_chunks` seeds by c."""
    indices = np.asarray(indices, dtype=np.int64)
    return [(c, indices[i:i + points_per_chunk]) for c, i in enumerate(range(0, len(indices), points_per_chunk))]


#: The columns of :meth:`CertifiedChunk.rows`: those of ``certify.tsv``.
ROW_FIELDS = TSV_HEADER


@dataclass
class CertifiedChunk:
    """One chunk's results: dataset indices, labels, certificates and the wall time per point."""

    chunk: int
    indices: np.ndarray
    labels: np.ndarray
    certificates: Certificates
    seconds_per_point: float

    def rows(self) -> np.ndarray:
        """float64 [points, len(ROW_FIELDS)]: one row per point (integers are exact in float64)."""
        cert = self.certificates
        return np.column_stack([self.indices, self.labels, cert.prediction, cert.radius, cert.correct(self.labels),
                                cert.sigma, cert.p_a_lower, np.full(len(self.indices), self.seconds_per_point)])


def certify_chunks(smoothed: SmoothedClassifier, dataset, chunks: Iterable, settings: CertifySettings,
                   device) -> Iterator[CertifiedChunk]:
    """CERTIFY the points of each chunk ``(c, indices)`` of ``dataset`` (items ``(x, y, ...)``) on ``device``."""
    device = torch.device(device)
    for c, indices in chunks:
        items = [dataset[int(i)] for i in indices]
        x = torch.stack([item[0] for item in items]).to(device)
        labels = np.asarray([int(item[1]) for item in items], dtype=np.int64)
        generator = torch.Generator(device=device).manual_seed(chunk_seed(settings.seed, c))
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                certificates = smoothed.certify(x, settings.n0, settings.n, settings.alpha, settings.batch_size,
                                                generator)
        except BrokenModelError as error:  # name the data set's points, not positions in the chunk
            points = [int(indices[p]) for p in error.positions]
            raise BrokenModelError(f"the base classifier returned NaN or inf logits on noisy copies of data set "
                                   f"point(s) {points[:10]}: its weights are broken, no certificate is issued",
                                   points) from None
        seconds = (time.perf_counter() - start) / len(indices)
        yield CertifiedChunk(c, np.asarray(indices), labels, certificates, seconds)


def certify_sharded(smoothed: SmoothedClassifier, dataset, chunks: list, settings: CertifySettings, device,
                    rank: int, world_size: int, all_gather) -> Iterator[np.ndarray]:
    """Rank r certifies chunks r, r + W, r + 2W, ... of ``chunks``; after each round the rows of all
    ranks are gathered with ``all_gather`` (Fabric's or a LightningModule's) and yielded on every rank,
    in chunk order: the same rows as one process would produce, for any number of ranks."""
    width = settings.points_per_chunk
    mine = certify_chunks(smoothed, dataset, chunks[rank::world_size], settings, device)
    for _ in range(-(-len(chunks) // world_size)):
        rows = np.full((width + 1, len(ROW_FIELDS)), -1.0)  # idx -1: padding; the extra row flags a failure
        try:
            done = next(mine, None)
        except UsageError as error:  # tell the other ranks instead of leaving them waiting in all_gather
            failure, done = error, None
            rows[width, 0] = -2.0
        else:
            failure = None
        if done is not None:
            rows[:len(done.indices)] = done.rows()
        gathered = all_gather(torch.from_numpy(rows).to(device)).reshape(-1, len(ROW_FIELDS)).cpu().numpy()
        if failure is not None:
            raise failure
        if (gathered[:, 0] == -2.0).any():
            raise UsageError("certification stopped: another process failed (its error is printed above)")
        yield gathered[gathered[:, 0] >= 0]
