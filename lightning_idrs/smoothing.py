"""Monte Carlo prediction and certification of a smoothed classifier (Cohen et al., 2019, Alg. 1-2).

g(x) = argmax_c P(f(x + sigma(x) * eps) = c), eps ~ N(0, I): one sigma per input, the same for all
of its noise samples (docs/math.md). With a constant sigma this is Cohen et al.'s RS.

* :func:`add_noise` draws x + sigma(x) * eps: the noise of training and validation.
* :class:`PointNoise`: certification's noise, a function of (seed, the point's index in the data set)
  only, so the rows of a data set do not depend on which points share a batch, a chunk or a process
  (counter-based: :mod:`lightning_idrs.philox`).
* :class:`SmoothedClassifier` runs CERTIFY / PREDICT on a batch of inputs at once.
* :func:`use_channels_last` stores a convolutional base classifier's weights channels-last, the
  layout in which its forward passes run fastest on CPU (benchmarks/README.md).

Certifying the points of a data set (seeded chunks, several processes) is ``lightning_idrs.sharding``.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import stats
from torch import nn

from lightning_idrs import philox
from lightning_idrs.philox import WORD
from lightning_idrs.radius import certified_radius
from lightning_idrs.statistics import ABSTAIN
from lightning_idrs.arguments import OpenUnitInterval, PositiveInt, Seed, UsageError, check


__all__ = ["ABSTAIN", "BrokenModelError", "Certificates", "NOISE_VERSION", "PROJECTION_LEVEL",
           "PointNoise", "SmoothedClassifier", "add_noise",
           "clopper_pearson_lower", "clopper_pearson_upper", "sequential_schedule", "use_channels_last"]


class BrokenModelError(UsageError):
    """The base classifier returned NaN / inf logits: its weights are broken, no certificate is issued."""

    def __init__(self, message: str, positions=()):
        super().__init__(message)
        self.positions = list(positions)  # positions in the batch of the inputs concerned


def add_noise(x: torch.Tensor, sigma: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x + sigma_i * eps_i with eps_i ~ N(0, I): one noise level per input of the batch ``x`` [B, ...]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * noise


#: Name of the way :class:`PointNoise` derives the noise; recorded with the rows (a folder written
#: with another version cannot be extended: its rows came from other noise).
NOISE_VERSION = "point-philox-v3"


class PointNoise:
    """The noise of certification: input i's samples are a function of (``seed``, ``keys[i]``, the sampling
    phase, the sample's index in the phase) only, so they are the same however the inputs are batched.

    ``keys[i]`` is input i's index in the data set; a phase is selection (0), estimation (1) or stage k
    of sequential estimation (2 + k). Every value comes from its own Philox4x32-10 call, key (index,
    seed) and counter (coordinate pair, sample, phase, 0) (:mod:`lightning_idrs.philox`): different
    (seed, index, phase, sample) never share a stream, by construction (docs/math.md, "The noise").
    The seed, the indices, the phases and the samples per phase must each be below 2^32.
    """

    def __init__(self, seed: int, keys):
        self.seed = check(Seed, seed, "seed")
        keys = np.asarray(keys).reshape(-1)
        if keys.size and (keys.dtype.kind not in "iu" or keys.min() < 0 or keys.max() >= WORD):
            raise ValueError(f"PointNoise keys must be indices in the data set, integers in [0, 2^32); got "
                             f"{keys.min()!r} to {keys.max()!r}")
        self.keys = keys.astype(np.int64)

    def subset(self, rows) -> "PointNoise":
        return PointNoise(self.seed, self.keys[np.asarray(rows)])

    def batches(self, x: torch.Tensor, num: int, batch_size: int, phase: int):
        """(owner, eps) per forward batch: ``num`` samples of each input of ``x``, input-major, cut into
        batches of ``batch_size``; eps [batch, *x.shape[1:]] is the standard normal noise."""
        if len(self.keys) != len(x):
            raise ValueError(f"PointNoise has {len(self.keys)} keys for {len(x)} inputs")
        if not 0 <= phase < WORD or not 0 <= num <= WORD or math.prod(x.shape[1:]) > 2 * WORD:
            raise ValueError(f"PointNoise draws at most 2^32 samples of at most 2^33 values in each of 2^32 phases; "
                             f"asked for {num} samples of {math.prod(x.shape[1:])} values in phase {phase}")
        keys = torch.as_tensor(self.keys, device=x.device)
        total = len(x) * num
        for start in range(0, total, batch_size):
            position = torch.arange(start, min(start + batch_size, total), device=x.device)
            owner = position // num
            eps = philox.normals(self.seed, keys[owner], phase, position - owner * num, x.shape[1:], x.dtype)
            yield owner, eps


def use_channels_last(model: nn.Module, input_shape, device) -> bool:
    """Store ``model``'s 4-D weights channels-last (NHWC), in place; False if it has none (nothing changes).

    Convolutions then pick oneDNN's NHWC kernels: measured 1.8-2.9x faster on CPU for the digits CNN,
    1.1-1.5x for ResNets at 400-1,000 samples per batch (benchmarks/README.md). Inputs and noise keep
    the default layout, so the noise stream is unchanged; the logits move by float rounding only
    (~1e-6). Raises ValueError, with the weights restored, if the model cannot run that way (e.g. it
    calls ``.view`` on a feature map).
    """
    if not any(p.dim() == 4 for p in model.parameters()):
        return False
    was_training = model.training
    model.to(memory_format=torch.channels_last).eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, *input_shape, device=device))
    except RuntimeError as error:
        model.to(memory_format=torch.contiguous_format)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"the base classifier cannot run with channels-last weights: {reason}") from None
    finally:
        model.train(was_training)
    return True


def clopper_pearson_lower(successes, trials, alpha) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion: Beta(alpha; k, n-k+1)."""
    successes = np.asarray(successes, dtype=np.float64)
    bound = stats.beta.ppf(alpha, np.maximum(successes, 1e-300), trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, alpha) -> np.ndarray:
    """One-sided (1 - alpha) upper confidence bound on a binomial proportion: Beta(1 - alpha; k+1, n-k)."""
    successes = np.asarray(successes, dtype=np.float64)
    bound = stats.beta.ppf(1.0 - alpha, successes + 1, np.maximum(trials - successes, 1e-300))
    return np.where(successes < trials, bound, 1.0)


def sequential_schedule(n: int, first: int = 1000, growth: float = math.sqrt(10.0)) -> list:
    """Cumulative estimation samples after each stage: ``first``, then x ``growth`` per stage, ending at ``n``
    (n = 100,000: 1,000, 3,162, 10,000, 31,623, 100,000)."""
    sizes, stage = [], 0
    while True:
        size = min(n, round(first * growth**stage))
        sizes.append(size)
        if size >= n:
            return sizes
        stage += 1


#: Level of the upper bound on pA that projects whether a point can still reach a higher grid radius
#: (only the stopping rule uses it: it decides how many samples are drawn, never the certificate).
#: On 100 digits test points (n = 100,000, grid 0.25..1.0) 1e-2 drew 6.8x fewer samples than fixed n
#: and 1e-3 4.9x, both with every point in the same grid bucket as fixed n (benchmarks/README.md).
PROJECTION_LEVEL = 1e-2


@dataclass
class Certificates:
    """Per-input results of :meth:`SmoothedClassifier.certify` (NumPy arrays, one entry per input)."""

    prediction: np.ndarray  # int64, ABSTAIN (-1) where pA_lower < 1/2
    p_a_lower: np.ndarray  # one-sided Clopper-Pearson lower bound on pA at confidence 1 - alpha
    sigma: np.ndarray  # sigma(x) used for the noise and the radius
    radius: np.ndarray  # certified l2 radius (0 for abstentions)
    samples: np.ndarray  # estimation samples drawn (n, or where the sequential test stopped)

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

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int, generator=None,
                radii=None) -> Certificates:
        """CERTIFY for every input of the batch ``x`` at once.

        Selection: top class cA of n0 noisy samples. Estimation: n fresh samples, nA hits of cA,
        pA_lower = Beta(alpha; nA, n - nA + 1). Abstain if pA_lower < 1/2, else return cA and the
        radius ``certified_radius(pA_lower, sigma(x), r, N)`` (IDRS, or Cohen's for r = 0).

        With ``radii`` (a grid such as [0.25, 0.5, 0.75, 1.0]) the estimation is sequential: samples
        are drawn in the stages of :func:`sequential_schedule` and a point stops as soon as its
        outcome on the grid is decided (docs/math.md, "Sequential certification"); the bound of stage
        k uses alpha / K, so the certificate holds with probability >= 1 - alpha whatever the stop.

        Example: a half-space classifier, class 1 where x_0 > 0, whose true radius is |x_0|:

            >>> class Halfspace(nn.Module):
            ...     def forward(self, x):
            ...         return torch.stack([-x[:, 0], x[:, 0]], dim=1)
            >>> from lightning_idrs import ConstantSigma
            >>> smoothed = SmoothedClassifier(Halfspace(), ConstantSigma(0.5), num_classes=2)
            >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
            >>> cert = smoothed.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=10_000,
            ...                         generator=torch.Generator().manual_seed(0))
            >>> cert.prediction.tolist(), bool(((0.9 < cert.radius) & (cert.radius <= 1.0)).all())
            ([1, 0], True)
        """
        n0, n, batch_size = (check(PositiveInt, v, name) for v, name in ((n0, "n0"), (n, "n"), (batch_size, "batch_size")))
        alpha = check(OpenUnitInterval, alpha, "alpha")
        x = self._check_inputs(x)
        r = float(self.sigma.semi_elasticity)  # raises if the sigma function cannot be certified
        if not (0.0 <= r < math.inf):
            raise UsageError(f"the semi_elasticity of {type(self.sigma).__name__} must be a finite number >= 0, got {r}; "
                             "fix the sigma function")
        computed = self._sigmas(x)
        sigma = computed.to(x.dtype)  # the level the noise multiplies: the certificate is about this one
        guess = self._sample_counts(x, sigma, n0, batch_size, generator, phase=0).argmax(dim=1)
        sigma_np, slack, dim = sigma.double().cpu().numpy(), self._log_slack(computed, sigma, r), math.prod(x.shape[1:])

        def radius_of(p_a_lower, rows):
            return certified_radius(p_a_lower, sigma_np[rows], r, dim if r > 0 else None, slack[rows])

        if radii is None:
            counts = self._sample_counts(x, sigma, n, batch_size, generator, phase=1)
            p_a_lower = clopper_pearson_lower(counts.gather(1, guess[:, None])[:, 0].cpu().numpy(), n, alpha)
            samples = np.full(len(x), n)
        else:
            p_a_lower, samples = self._estimate_sequentially(x, sigma, guess, n, alpha, batch_size, generator,
                                                             radii, radius_of)
        certified = p_a_lower >= 0.5
        prediction = np.where(certified, guess.cpu().numpy(), ABSTAIN)
        radius = radius_of(p_a_lower, slice(None))
        return Certificates(prediction, p_a_lower, sigma_np, np.where(certified, radius, 0.0), samples)

    def _estimate_sequentially(self, x, sigma, guess, n, alpha, batch_size, generator, radii, radius_of):
        """(pA_lower, samples drawn) per input: stop when the grid level reached is the highest that an
        optimistic projection to the full budget could still reach (or the budget is spent)."""
        schedule = sequential_schedule(n)
        level = alpha / len(schedule)  # union bound over the fixed schedule: any stopping rule is sound
        grid = np.unique(np.r_[0.0, np.asarray(radii, dtype=np.float64)])  # 0: correct, whatever the radius

        def grid_level(p_a_lower, rows):  # index of the highest grid radius reached; -1: abstain
            return np.where(p_a_lower >= 0.5, np.searchsorted(grid, radius_of(p_a_lower, rows), "right") - 1, -1)

        hits, samples, p_a_lower = np.zeros(len(x)), np.zeros(len(x), dtype=np.int64), np.zeros(len(x))
        active, drawn = np.arange(len(x)), 0
        for stage, total in enumerate(schedule):
            rows = torch.as_tensor(active, device=x.device)
            noise = generator.subset(active) if isinstance(generator, PointNoise) else generator
            counts = self._sample_counts(x[rows], sigma[rows], total - drawn, batch_size, noise, phase=2 + stage)
            hits[active] += counts.gather(1, guess[rows][:, None])[:, 0].cpu().numpy()
            drawn, samples[active] = total, total
            p_a_lower[active] = clopper_pearson_lower(hits[active], total, level)
            if total == n:
                break
            upper = clopper_pearson_upper(hits[active], total, PROJECTION_LEVEL)
            projected = clopper_pearson_lower(upper * n, n, level)  # pA_lower at the full budget if pA were this
            active = active[grid_level(projected, active) > grid_level(p_a_lower[active], active)]
            if not len(active):
                break
        return p_a_lower, samples

    def predict(self, x, n: int, alpha: float, batch_size: int, generator=None) -> np.ndarray:
        """PREDICT: top two counts nA, nB of n samples; abstain (-1) unless the two-sided binomial
        test of nA ~ Bin(nA + nB, 1/2) rejects at level alpha."""
        n, batch_size = check(PositiveInt, n, "n"), check(PositiveInt, batch_size, "batch_size")
        alpha = check(OpenUnitInterval, alpha, "alpha")
        x = self._check_inputs(x)
        counts = self._sample_counts(x, self._sigmas(x), n, batch_size, generator, phase=1)
        top2 = counts.topk(min(2, self.num_classes), dim=1)
        n_a = top2.values[:, 0].cpu().numpy()
        n_b = top2.values[:, 1].cpu().numpy() if self.num_classes > 1 else np.zeros_like(n_a)
        # SciPy's reference test, one point at a time: ~1 ms a point, against the n forward passes just
        # spent on it (PREDICT is not on certify's path)
        p_value = np.array([stats.binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(n_a, n_b)])
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
        bad = ~(torch.isfinite(sigma) & (sigma > 0))
        if bad.any():  # a user's sigma function: no certificate (nor noise) from such a level
            values = sorted({str(float(v)) for v in sigma[bad][:100].tolist()})[:5]
            raise UsageError(f"sigma(x) must be finite and > 0 for every input, but {type(self.sigma).__name__} gave "
                             f"{', '.join(map(str, values))} for {int(bad.sum())} input(s); fix the sigma function")
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
    def _sample_counts(self, x, sigma, num: int, batch_size: int, generator, phase: int = 0) -> torch.Tensor:
        """counts[i, c] = #{j < num : f(x_i + sigma_i * eps_ij) = c}, in batches that mix inputs.

        The B * num noisy samples are enumerated input-major and cut into chunks of ``batch_size``, so
        a small model always sees full batches. eps comes from ``generator``: a :class:`PointNoise`
        (streams per input, ``phase`` names the sampling phase) or one torch.Generator (or None) for all.
        Per batch only the argmax and the float64 sum of each row's logits are stored (finite iff every
        logit of the row is; float32 logits cannot overflow it); counting and the non-finite check run
        once per call, on the stored values: no host sync and no scatter per batch.
        """
        base = self.base_classifier
        was_training = getattr(base, "training", False)
        if isinstance(base, nn.Module):
            base.eval()
        try:
            total = x.shape[0] * num
            predictions = torch.empty(total, dtype=torch.long, device=x.device)
            row_sums = torch.empty(total, dtype=torch.float64, device=x.device)
            batches = (generator.batches(x, num, batch_size, phase) if isinstance(generator, PointNoise)
                       else _shared_noise(x, num, batch_size, generator))
            start, shape = 0, (-1, *([1] * (x.dim() - 1)))
            for owner, eps in batches:
                first, last = start // num, (start + len(owner) - 1) // num
                if first == last:  # one input's samples: broadcast it instead of gathering copies (same values)
                    noisy = x[first:first + 1] + sigma[first:first + 1].reshape(shape) * eps
                else:
                    noisy = x[owner] + sigma[owner].reshape(shape) * eps
                with self.forward_context():
                    logits = base(noisy)
                if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                    raise ValueError(f"the base classifier returns logits of shape {tuple(logits.shape)}; expected "
                                     f"[{len(owner)}, {self.num_classes}] (num_classes={self.num_classes})")
                end = start + len(owner)
                torch.argmax(logits, dim=1, out=predictions[start:end])
                torch.sum(logits, dim=1, dtype=torch.float64, out=row_sums[start:end])
                start = end
            owners = torch.arange(total, device=x.device) // num
            broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            broken[owners[~torch.isfinite(row_sums)]] = True
            if broken.any():  # one check per call
                positions = broken.nonzero().flatten().tolist()
                raise BrokenModelError(f"the base classifier returned NaN or inf logits for input(s) {positions[:10]} "
                                       "of the batch: its weights are broken, no certificate is issued", positions)
            counts = torch.bincount(owners * self.num_classes + predictions, minlength=x.shape[0] * self.num_classes)
            return counts.reshape(x.shape[0], self.num_classes)
        finally:
            if isinstance(base, nn.Module):
                base.train(was_training)


def _shared_noise(x, num: int, batch_size: int, generator):
    """(owner, eps) per forward batch, eps drawn from one generator for all inputs (the API without keys)."""
    total = x.shape[0] * num
    for start in range(0, total, batch_size):
        owner = torch.arange(start, min(start + batch_size, total), device=x.device) // num
        yield owner, torch.randn((len(owner), *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
