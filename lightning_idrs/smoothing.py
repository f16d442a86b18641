"""Monte Carlo prediction and certification of a smoothed classifier (Cohen et al., 2019, Alg. 1-2).

g(x) = argmax_c P(f(x + sigma(x) * eps) = c), eps ~ N(0, I): one sigma per input, the same for
all of its noise samples (PAPER.md section 2). With a constant sigma this is Cohen et al.'s RS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

from lightning_idrs.radius import certified_radius

ABSTAIN = -1


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


def clopper_pearson_lower(successes, trials, alpha) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion: Beta(alpha; k, n-k+1)."""
    successes = np.asarray(successes, dtype=np.float64)
    bound = stats.beta.ppf(alpha, np.maximum(successes, 1e-300), trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_alpha(alpha) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return float(alpha)


class SmoothedClassifier:
    """Gaussian smoothing of ``base_classifier`` with per-input noise level ``sigma(x)``.

    Args:
        base_classifier: maps a batch [B, *input_shape] (pixel space) to logits [B, num_classes].
        sigma: callable mapping a batch to one sigma per input ([B] tensor), with attribute
            ``semi_elasticity`` (r such that log sigma is r-Lipschitz; 0 for a constant sigma).
        num_classes: number of classes of the base classifier.
    """

    def __init__(self, base_classifier: nn.Module, sigma, num_classes: int):
        self.base_classifier = base_classifier
        self.sigma = sigma
        self.num_classes = check_positive_int(num_classes, "num_classes")

    # ------------------------------------------------------------------ public algorithms
    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int, generator=None) -> Certificates:
        """CERTIFY for every input of the batch ``x`` at once.

        Selection: top class cA of n0 noisy samples. Estimation: n fresh samples, nA hits of cA,
        pA_lower = Beta(alpha; nA, n - nA + 1). Abstain if pA_lower < 1/2, else return cA and the
        radius ``certified_radius(pA_lower, sigma(x), r, N)`` (IDRS, or Cohen's for r = 0).
        """
        n0, n = check_positive_int(n0, "n0"), check_positive_int(n, "n")
        alpha = check_alpha(alpha)
        batch_size = check_positive_int(batch_size, "batch_size")
        x = self._check_inputs(x)
        r = float(self.sigma.semi_elasticity)  # raises if the sigma function cannot be certified
        sigma = self._sigmas(x)
        guess = self._sample_counts(x, sigma, n0, batch_size, generator).argmax(dim=1)
        counts = self._sample_counts(x, sigma, n, batch_size, generator)
        n_a = counts.gather(1, guess[:, None])[:, 0].cpu().numpy()
        p_a_lower = clopper_pearson_lower(n_a, n, alpha)
        sigma_np = sigma.double().cpu().numpy()
        certified = p_a_lower >= 0.5
        prediction = np.where(certified, guess.cpu().numpy(), ABSTAIN)
        dim = math.prod(x.shape[1:])
        radius = certified_radius(p_a_lower, sigma_np, r, dim if r > 0 else None)
        return Certificates(prediction, p_a_lower, sigma_np, np.where(certified, radius, 0.0))

    def predict(self, x, n: int, alpha: float, batch_size: int, generator=None) -> np.ndarray:
        """PREDICT: top two counts nA, nB of n samples; abstain (-1) unless the two-sided binomial
        test of nA ~ Bin(nA + nB, 1/2) rejects at level alpha."""
        n = check_positive_int(n, "n")
        alpha = check_alpha(alpha)
        batch_size = check_positive_int(batch_size, "batch_size")
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
            total = x.shape[0] * num
            for start in range(0, total, batch_size):
                owner = torch.arange(start, min(start + batch_size, total), device=x.device) // num
                clean = x[owner]
                noise = torch.randn(clean.shape, generator=generator, device=x.device, dtype=x.dtype)
                scale = sigma[owner].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
                predictions = base(clean + scale * noise).argmax(dim=1)
                counts.index_put_((owner, predictions), torch.ones_like(predictions), accumulate=True)
            return counts
        finally:
            if isinstance(base, nn.Module):
                base.train(was_training)
