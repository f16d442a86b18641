"""The LightningModule: a base classifier trained under Gaussian noise with per-input sigma(x).

Training (Cohen et al. 2019, Sec. 4; Sukenik et al. 2022, Sec. 5): x_noisy = x + sigma(x) * eps,
eps ~ N(0, I), one sigma per image, fresh eps every step, noise added in pixel space (the data
normalisation is the model's first layer). Training points use their own sigma with themselves
excluded from their neighbours (cached once; see ``KnnSigma.training_sigma``).
"""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from lightning_idrs.models import build_model
from lightning_idrs.sigma import ConstantSigma, KnnSigma

SIGMA_KINDS = ("knn", "constant")
CHECKPOINT_KEY = "lightning_idrs"


def build_sigma(kind: str, sigma_base: float, semi_elasticity: float, k: int, m: Optional[float]):
    """sigma(x): ``knn`` = sigma_b exp(r (mean kNN distance - m)) (PAPER.md sec. 3), ``constant`` = sigma_b."""
    if kind == "knn":
        return KnnSigma(sigma_base, semi_elasticity, k, m)
    if kind == "constant":
        return ConstantSigma(sigma_base)
    raise ValueError(f"sigma must be one of {SIGMA_KINDS}, got {kind!r}")


class IDRSClassifier(pl.LightningModule):
    """Base classifier + sigma function, trained on noisy inputs.

    Args:
        arch: model name for :func:`lightning_idrs.models.build_model`.
        sigma: ``"knn"`` (IDRS) or ``"constant"`` (RS, Cohen et al.).
        sigma_base: sigma_b > 0.
        semi_elasticity: r >= 0 of the kNN sigma (ignored for ``constant``).
        k: number of nearest training points for the kNN sigma.
        m: normalisation constant; None = mean kNN distance over the training set.
        input_shape, num_classes, mean, std: linked from the datamodule by the CLI.
        optimizer, lr_scheduler: callables from the config (``model.optimizer.class_path``, ...);
            default Adam(lr=1e-3) and no schedule.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        sigma: str = "knn",
        sigma_base: float = 0.25,
        semi_elasticity: float = 0.1,
        k: int = 20,
        m: Optional[float] = None,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = build_model(arch, tuple(input_shape), num_classes, tuple(mean), tuple(std))
        self.sigma = build_sigma(sigma, sigma_base, semi_elasticity, k, m)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.data_fingerprint: Optional[str] = None
        self.dataset_name: Optional[str] = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_acc = torch.nn.ModuleDict(
            {f"{stage}_{kind}": MulticlassAccuracy(num_classes, average="micro")
             for stage in ("val", "test") for kind in ("clean", "noisy")}
        )

    @property
    def input_dim(self) -> int:
        """N, the input dimension in which noise is added and radii are measured."""
        return math.prod(self.hparams.input_shape)

    def forward(self, x):
        return self.model(x)

    # ------------------------------------------------------------------ sigma(x) and the data
    def setup(self, stage: str) -> None:
        """Fit sigma's kNN index on the datamodule's clean training set before the first batch."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.attach_data(datamodule)

    def attach_data(self, datamodule) -> None:
        """Check that ``datamodule`` matches this model (and a loaded checkpoint), then fit sigma."""
        expected = (tuple(self.hparams.input_shape), self.hparams.num_classes)
        found = (tuple(datamodule.input_shape), datamodule.num_classes)
        if expected != found:
            raise ValueError(
                f"data {datamodule.name!r} has input shape / classes {found}, the model expects {expected}"
            )
        datamodule.setup("fit")
        fingerprint = datamodule.fingerprint()
        if self.data_fingerprint is not None and self.data_fingerprint != fingerprint:
            raise ValueError(
                f"this model was trained on {self.dataset_name!r} data with fingerprint "
                f"{self.data_fingerprint[:12]}..., but the datamodule {datamodule.name!r} gives "
                f"{fingerprint[:12]}...: sigma(x) and the certificate would differ"
            )
        self.data_fingerprint, self.dataset_name = fingerprint, datamodule.name
        if not self.sigma.is_fitted:
            self.sigma.fit(datamodule.train_inputs())

    def on_fit_start(self) -> None:
        """Under DDP, check that sigma(x) is identical on every rank (same index, same m)."""
        if isinstance(self.sigma, KnnSigma):
            digest = self._sigma_digest()
            gathered = self.all_gather(digest)
            if gathered.dim() > digest.dim() and not torch.equal(gathered, digest.expand_as(gathered)):
                raise RuntimeError(f"sigma(x) differs across ranks: digests {gathered.tolist()}")
            ranks = gathered.shape[0] if gathered.dim() > digest.dim() else 1
            rank_zero_info(f"lightning_idrs: sigma(x) identical on {ranks} rank(s), digest {digest.tolist()}")

    def _sigma_digest(self) -> torch.Tensor:
        """A few numbers that differ when the index, m or the training sigmas differ."""
        index = torch.arange(self.sigma.k + 1, device=self.device)  # fit guarantees n > k
        values = self.sigma.training_sigma(None, index).double().to(self.device)
        m = torch.tensor(float(self.sigma.m), dtype=torch.float64, device=self.device)
        return torch.stack([values.sum(), (values**2).sum(), m])

    # ------------------------------------------------------------------ steps
    def add_noise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x + sigma_i * eps_i, one sigma per image."""
        return x + sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * torch.randn_like(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.model(self.add_noise(x, self.sigma.training_sigma(x, idx)))
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log("train/noisy_acc", self.train_acc, on_epoch=True, on_step=False)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        """Accuracy on clean inputs and on inputs with noise sigma(x) (the full index, no exclusion)."""
        x, y = batch[0], batch[1]
        clean = self.model(x)
        noisy = self.model(self.add_noise(x, self.sigma(x)))
        self.eval_acc[f"{stage}_clean"](clean, y)
        self.eval_acc[f"{stage}_noisy"](noisy, y)
        self.log(f"{stage}/loss", F.cross_entropy(noisy, y), sync_dist=True)
        self.log(f"{stage}/clean_acc", self.eval_acc[f"{stage}_clean"], prog_bar=True)
        self.log(f"{stage}/noisy_acc", self.eval_acc[f"{stage}_noisy"], prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        make_optimizer = self.optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = make_optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what certification needs besides the weights: data identity, N, sigma settings."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "dataset": self.dataset_name,
            "data_fingerprint": self.data_fingerprint,
            "input_shape": list(self.hparams.input_shape),
            "dim": self.input_dim,
            "sigma": self.hparams.sigma,
            "sigma_base": float(self.hparams.sigma_base),
            "semi_elasticity": self._certified_semi_elasticity(),
            "m": None if self.sigma.m is None else float(self.sigma.m),
            "datamodule_class": None if datamodule is None else f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        }

    def _certified_semi_elasticity(self) -> Optional[float]:
        """r * Lip(phi), or None where sigma cannot be certified (undeclared Lip, approximate index)."""
        try:
            return float(self.sigma.semi_elasticity)
        except ValueError:
            return None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get(CHECKPOINT_KEY)
        if info is None:
            raise ValueError("not a lightning_idrs checkpoint (no 'lightning_idrs' entry)")
        self.data_fingerprint, self.dataset_name = info["data_fingerprint"], info["dataset"]
