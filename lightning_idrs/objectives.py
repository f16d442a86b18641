"""Training objectives of the base classifier under smoothing noise, pluggable by ``class_path``.

An objective turns a clean batch, its labels and the per-input noise levels sigma(x) into a loss. It
draws every noise sample with :func:`lightning_idrs.smoothing.add_noise` (the one noise path, also
used by certification) at the sigma the module hands it: the constant sigma_b under RS, sigma(x) of
the training point (itself excluded from its neighbours) under IDRS. The objective only shapes the
base classifier; the certificate depends on sigma(x) and the counts alone, so any objective is sound.

* :class:`GaussianAugmentation`: cross-entropy on one noisy copy (Cohen et al. 2019; the default).
* :class:`ConsistencyRegularization`: m noisy copies, cross-entropy + lambda * KL to the copies' mean
  prediction + eta * its entropy (Jeong & Shin, NeurIPS 2020).
* :class:`MACER`: the smoothed classifier's cross-entropy + lambda * a hinge on its certified radius
  (Zhai et al., ICLR 2020), with sigma(x) per input in the radius.

A user's objective subclasses :class:`Objective` in any importable module and is selected with
``--model.objective my_module.MyObjective`` (docs/extending.md).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_idrs.configurable import Configurable, config_of
from lightning_idrs.smoothing import add_noise
from lightning_idrs.arguments import NonNegativeFloat, PositiveFloat, PositiveInt, check

__all__ = ["ConsistencyRegularization", "GaussianAugmentation", "MACER", "Objective", "ObjectiveOutput"]


class ObjectiveOutput(NamedTuple):
    loss: Tensor  # scalar to minimise
    logits: Tensor  # [B, C]: the base classifier on one noisy copy of each input (scored as train/noisy_acc)


class Objective(Configurable, nn.Module):
    """Base class. Subclasses implement ``forward(model, x, y, sigma) -> ObjectiveOutput``.

    ``x`` [B, C, H, W] clean inputs in pixel space, ``y`` [B] labels, ``sigma`` [B] the noise level of
    each input; draw noise only with ``add_noise(x, sigma)`` (repeat ``x`` and ``sigma`` for several
    copies). Constructor arguments are recorded for the checkpoint (as for sigma functions).
    """

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    @property
    def config(self):
        """``{"class_path", "init_args"}`` that rebuilds this objective (stored in the hyper-parameters)."""
        return config_of(self)


def _noisy_copies(model: nn.Module, x: Tensor, sigma: Tensor, copies: int) -> Tensor:
    """Logits [copies, B, C] of ``copies`` independent noisy copies of each input (one forward pass), in
    float32 also under bf16 / fp16 autocast: the losses built on them (probabilities near 1, Phi^-1 of them)
    need it (in bf16, 1 - 1e-6 rounds to 1 and MACER's Phi^-1 would be infinite)."""
    batch = x.repeat(copies, *([1] * (x.dim() - 1)))
    logits = model(add_noise(batch, sigma.repeat(copies)))
    return logits.reshape(copies, len(x), -1).float()


class GaussianAugmentation(Objective):
    """Cross-entropy on x + sigma(x) * eps, one fresh eps per input and step (Cohen et al. 2019)."""

    def forward(self, model, x, y, sigma):
        logits = model(add_noise(x, sigma))
        return ObjectiveOutput(F.cross_entropy(logits, y), logits)


class ConsistencyRegularization(Objective):
    """Jeong & Shin (2020): mean CE over m noisy copies + lambda * KL(mean || copy) + eta * H(mean).

    Args:
        num_noise: m, noisy copies per input (their default 2).
        lbd: lambda, weight of the consistency term (their MNIST / sigma = 1.0 value 10; 20 on CIFAR-10).
        eta: weight of the entropy of the mean prediction (their default 0.5).
    """

    def __init__(self, num_noise: PositiveInt = 2, lbd: NonNegativeFloat = 10.0, eta: NonNegativeFloat = 0.5):
        super().__init__()
        self.num_noise = check(PositiveInt, num_noise, "num_noise")
        self.lbd = check(NonNegativeFloat, lbd, "lbd")
        self.eta = check(NonNegativeFloat, eta, "eta")

    def forward(self, model, x, y, sigma):
        logits = _noisy_copies(model, x, sigma, self.num_noise)  # [m, B, C]
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_noise))
        log_probs = F.log_softmax(logits, dim=-1)
        mean = log_probs.exp().mean(0)  # [B, C]
        log_mean = mean.clamp_min(1e-20).log()
        kl = (mean * (log_mean - log_probs)).sum(-1).mean(0)  # KL(mean || copy), averaged over copies
        entropy = -(mean * log_mean).sum(-1)
        loss = cross_entropy + self.lbd * kl.mean() + self.eta * entropy.mean()
        return ObjectiveOutput(loss, logits[0])


class MACER(Objective):
    """Zhai et al. (2020): CE of the smoothed soft classifier + lambda * hinge on its certified radius.

    With m noisy copies per input, p = mean softmax: loss = -log p_y + lbd * (sigma(x) / 2) *
    max(0, gamma - (Phi^-1(q_y) - Phi^-1(q_2nd))) over the correctly classified inputs whose margin is
    below gamma, q the mean softmax of ``beta`` x logits; averaged over the batch. Their CIFAR-10
    defaults: m = 16, lbd = 12, gamma = 8, beta = 16.
    """

    def __init__(self, num_noise: PositiveInt = 16, lbd: NonNegativeFloat = 12.0, gamma: PositiveFloat = 8.0,
                 beta: PositiveFloat = 16.0):
        super().__init__()
        self.num_noise = check(PositiveInt, num_noise, "num_noise")
        self.lbd = check(NonNegativeFloat, lbd, "lbd")
        self.gamma = check(PositiveFloat, gamma, "gamma")
        self.beta = check(PositiveFloat, beta, "beta")

    def forward(self, model, x, y, sigma):
        logits = _noisy_copies(model, x, sigma, self.num_noise)  # [m, B, C]
        soft = F.softmax(logits, dim=-1).mean(0)
        classification = F.nll_loss(soft.clamp_min(1e-10).log(), y)
        sharp = F.softmax(self.beta * logits, dim=-1).mean(0)
        top, second = sharp.topk(2, dim=-1).values.unbind(-1)
        normal = torch.distributions.Normal(0.0, 1.0)
        margin = normal.icdf(top.clamp(1e-6, 1 - 1e-6)) - normal.icdf(second.clamp(1e-6, 1 - 1e-6))
        active = (sharp.argmax(-1) == y) & torch.isfinite(margin) & (margin <= self.gamma)
        hinge = torch.where(active, self.gamma - margin, torch.zeros_like(margin))
        robustness = (hinge * sigma.to(hinge.dtype) / 2).sum() / len(x)
        return ObjectiveOutput(classification + self.lbd * robustness, logits[0])
