"""Certification during training: certified accuracy vs radius at the end of validation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from pytorch_lightning import Callback
from pytorch_lightning.loggers import WandbLogger

from lightning_idrs.certified_accuracy import CertifiedAccuracy
from lightning_idrs.metrics import default_radius_grid, radius_key
from lightning_idrs.plots import plot_certified_accuracy
from lightning_idrs.smoothing import SmoothedClassifier, check_alpha, check_positive_int


def stratified_subset(labels: torch.Tensor, num_points: int, seed: int) -> torch.Tensor:
    """A fixed, class-balanced choice of ``num_points`` indices (round robin over shuffled classes)."""
    generator = torch.Generator().manual_seed(seed)
    per_class = [
        members[torch.randperm(len(members), generator=generator)]
        for members in (torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True))
    ]
    rounds = max(len(m) for m in per_class)
    padded = torch.full((len(per_class), rounds), -1, dtype=torch.long)
    for row, members in enumerate(per_class):
        padded[row, : len(members)] = members
    order = padded.T.reshape(-1)  # round robin: one of each class, then the next of each class
    return order[order >= 0][:num_points].sort().values


class CertificationCallback(Callback):
    """Every ``every_n_epochs`` validation epochs, CERTIFY a fixed class-stratified validation subset.

    Uses the model's own base classifier and sigma(x), and the IDRS radius for sigma's
    semi-elasticity (Cohen's for a constant sigma). Logs ``certify/acc@R`` for every R of the grid,
    ``certify/acr``, ``certify/abstain_rate``, ``certify/smoothed_clean_acc``, ``certify/mean_sigma``
    and ``certify/class_{c}/acc@R``; with a WandbLogger also a (radius, certified accuracy) table
    with its line plot and a histogram of sigma(x); with any logger a PNG of the curve in the run
    directory. Under DDP each rank certifies its shard; the results are gathered (torchmetrics) and
    logged once.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_points: int = 100,
        n0: int = 16,
        n: int = 256,
        alpha: float = 0.001,
        batch_size: int = 1024,
        radii: Optional[Sequence[float]] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.num_points = check_positive_int(num_points, "num_points")
        self.n0, self.n = check_positive_int(n0, "n0"), check_positive_int(n, "n")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.radii = [float(r) for r in (default_radius_grid(1.0, 0.125) if radii is None else radii)]
        self.seed = seed
        self._indices: Optional[torch.Tensor] = None
        self._metric = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split_dataset"):
            raise ValueError("CertificationCallback needs a lightning_idrs datamodule (with split_dataset)")
        labels = torch.as_tensor([int(y) for _, y in datamodule.split_dataset("val")])
        self._indices = stratified_subset(labels, self.num_points, self.seed)
        self._metric = CertifiedAccuracy(self.radii, num_classes=datamodule.num_classes)

    def _due(self, trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._indices is None or not self._due(trainer):
            return
        summary, sigmas = self._certify(trainer, pl_module)
        pl_module.log_dict(self._scalars(summary), sync_dist=False)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "certify"  # collective under DDP
        if trainer.is_global_zero:
            self._log_curve(trainer, summary, sigmas, folder)

    # ------------------------------------------------------------------ work
    def _certify(self, trainer, pl_module):
        shard = self._indices[trainer.global_rank :: trainer.world_size]
        dataset = trainer.datamodule.split_dataset("val")
        device = pl_module.device
        items = [dataset[int(i)] for i in shard]
        x = torch.stack([image for image, _ in items]).to(device)
        y = torch.as_tensor([int(label) for _, label in items])
        generator = torch.Generator(device=device).manual_seed(
            self.seed + 1_000_003 * trainer.current_epoch + trainer.global_rank
        )
        smoothed = SmoothedClassifier(pl_module.model, pl_module.sigma, pl_module.hparams.num_classes)
        certificates = smoothed.certify(x, self.n0, self.n, self.alpha, self.batch_size, generator)
        metric = self._metric.to(device)
        metric.update(y, certificates.prediction, certificates.radius, certificates.sigma, idx=shard)
        summary = metric.compute()
        metric.reset()
        return summary, certificates.sigma  # the histogram shows rank 0's shard under DDP

    def _scalars(self, summary: dict) -> dict:
        scalars = {f"certify/acc@{key}": acc for key, acc in summary["certified_accuracy"].items()}
        scalars["certify/acr"] = summary["acr"]
        scalars["certify/num_points"] = float(summary["num_points"])
        scalars["certify/abstain_rate"] = summary["abstain_rate"]
        scalars["certify/smoothed_clean_acc"] = summary["clean_accuracy"]
        scalars["certify/mean_sigma"] = summary["mean_sigma"]
        for label, curve in summary["class_certified_accuracy"].items():
            scalars.update({f"certify/class_{label}/acc@{key}": acc for key, acc in curve.items()})
        return scalars

    def _log_curve(self, trainer, summary: dict, sigmas: np.ndarray, folder: Path) -> None:
        epoch = trainer.current_epoch
        radii = np.asarray(self.radii)
        accuracy = np.asarray([summary["certified_accuracy"][radius_key(r)] for r in radii])
        plot_certified_accuracy(
            {f"epoch {epoch}": (radii, accuracy)},
            folder / f"certified_accuracy_epoch{epoch:03d}.png",
            title=f"certified accuracy, epoch {epoch} ({summary['num_points']} val points)",
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(columns=["radius", "certified_accuracy"], data=np.c_[radii, accuracy].tolist())
                logger.experiment.log(
                    {
                        "certify/table": table,
                        "certify/curve": wandb.plot.line(
                            table, "radius", "certified_accuracy", title=f"certified accuracy, epoch {epoch}"
                        ),
                        "certify/sigma": wandb.Histogram(np.asarray(sigmas)),
                        "trainer/global_step": trainer.global_step,
                    }
                )
