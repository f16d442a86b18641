"""Certification during training: certified accuracy vs radius at the end of validation."""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pytorch_lightning import Callback

from lightning_idrs.compiling import CompileOption, check_compiler, compile_for_certification, resolve_mode
from lightning_idrs.reporting import (DEFAULT_REPORT_RADII, ReportOptions, curve, plot_curves, radius_grid, report_radii,
                                      scalars)
from lightning_idrs.metric import ROW_FIELDS, CertifiedAccuracy
from lightning_idrs.sharding import DEVICE_DEFAULTS, CertifySettings, certify_sharded, plan_chunks
from lightning_idrs.smoothing import SmoothedClassifier
from lightning_idrs.arguments import NonNegativeFloat, OpenUnitInterval, PositiveFloat, PositiveInt, Seed, check
from lightning_idrs.wandb_logging import MONITOR, log_to_loggers


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


_DEFAULTS = {**DEVICE_DEFAULTS, "cpu": (1024, 10)}  # batch size and chunking when none is given
_FIX = "the CertificationCallback's compile: none"


class CertificationCallback(Callback):
    """Every ``every_n_epochs`` validation epochs, CERTIFY a fixed class-stratified validation subset.

    Uses the model's own base classifier and sigma(x), and the IDRS radius for sigma's
    semi-elasticity (Cohen's for a constant sigma). Points are certified in the same seeded chunks
    as the ``certify`` command (:func:`lightning_idrs.sharding.certify_sharded`), with the same noise
    every epoch, so a change between epochs is the model's, not the noise's. Under DDP the chunks are
    shared out over the ranks and the rows gathered after each round, as in the command, and summarised
    by :class:`lightning_idrs.metric.CertifiedAccuracy`. What is
    logged is the command's, under monitoring keys ``monitor/...`` (a validation subset at small n,
    never mixed with ``certify``'s reported ``certify/...``): the scalars on the report grid, logged
    like the validation metrics (in the same row, at the same epoch and step, to every logger, and in
    ``trainer.callback_metrics``, e.g. ``monitor/acc_R0p5`` for ModelCheckpoint), a PNG of the curve in the
    run directory, and with a W&B logger, in that row, the growing curve table (one line per epoch), the
    class-wise table, the sigma(x) histogram and the PNG (:func:`lightning_idrs.wandb_logging.log_to_loggers`).
    It certifies on the training device, in the trainer's precision (e.g. ``bf16-mixed`` autocasts the
    base classifier, as ``--certify.precision bf16-mixed`` does).

    Args:
        every_n_epochs: certify after every n-th validation epoch (and after the last epoch).
        num_points: validation points certified (class-stratified, fixed for the run).
        n0, n, alpha, batch_size, points_per_chunk: CERTIFY's settings (small n for monitoring); batch_size
            and points_per_chunk default to 1,024 and 10 on CPU, 16,000 and 16 on a CUDA GPU.
        radii: the report grid: the scalar keys and the grid sequential certification decides on
            (default: the data module's ``report_radii``).
        radii_step, radii_max: the curve's grid 0, radii_step, ..., radii_max (plus the report grid; sequential:
            the report grid only, where the stopping rule decided).
        seed: seed of the subset and of the noise.
        sequential: stop each point's sampling once its outcome on the radius grid is decided.
        compile: none (default: monitoring's small n rarely repays a compilation), auto, default or
            max-autotune: the base classifier under torch.compile, as ``--certify.compile``; compiled once
            per fit, at the first certification.
    """

    def __init__(
        self,
        every_n_epochs: PositiveInt = 5,
        num_points: PositiveInt = 100,
        n0: PositiveInt = 16,
        n: PositiveInt = 256,
        alpha: OpenUnitInterval = 0.001,
        batch_size: Optional[PositiveInt] = None,
        radii: Optional[list[NonNegativeFloat]] = None,
        radii_step: PositiveFloat = 0.125,
        radii_max: NonNegativeFloat = 1.0,
        seed: Seed = 0,
        points_per_chunk: Optional[PositiveInt] = None,
        sequential: bool = False,
        compile: CompileOption = "none",
    ):
        super().__init__()
        self.every_n_epochs = check(PositiveInt, every_n_epochs, "every_n_epochs")
        self.num_points = check(PositiveInt, num_points, "num_points")
        self.settings = CertifySettings(n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed,
                                        points_per_chunk=points_per_chunk, sequential=sequential)
        self.options = ReportOptions(radii=radii, radii_step=radii_step, radii_max=radii_max)
        self.report = report_radii(self.options)  # the data module's grid once known (setup)
        self.radii = radius_grid(self.options, report=self.report)
        resolve_mode(compile, "cpu")  # a bad value is refused here
        self.compile = compile
        self._compiled: Optional[tuple] = None  # (the model compiled, its compiled wrapper)
        self._indices: Optional[torch.Tensor] = None
        self._num_classes: Optional[int] = None
        self._history: dict = {}  # the W&B curve table's rows so far

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split_dataset"):
            raise ValueError("CertificationCallback needs a lightning_idrs datamodule (with split_dataset)")
        labels = torch.as_tensor([int(y) for _, y in datamodule.split_dataset("val")])
        self._indices = stratified_subset(labels, self.num_points, self.settings.seed)
        self._num_classes = datamodule.num_classes
        device = trainer.strategy.root_device  # where it will certify (the model may not be there yet)
        check_compiler(device, resolve_mode(self.compile, device), _FIX)  # a missing compiler: before the first epoch
        self.report = report_radii(self.options, getattr(datamodule, "report_radii", DEFAULT_REPORT_RADII))
        self.radii = self.report if self.settings.sequential else radius_grid(self.options, report=self.report)

    def _due(self, trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._indices is None or not self._due(trainer):
            return
        summary, sigmas = self._certify(trainer, pl_module)
        summary["report_radii"] = self.report.tolist()
        pl_module.log_dict(scalars(summary, MONITOR), sync_dist=False)  # in the validation row: same epoch and step
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "certify"  # collective under DDP
        if trainer.is_global_zero:
            self._report(trainer, summary, sigmas, folder)

    def _certify(self, trainer, pl_module):
        """Certify this rank's chunks; returns the summary over all ranks' rows and their sigmas."""
        settings = self.settings.for_device(pl_module.device, _DEFAULTS)
        chunks = plan_chunks(self._indices.numpy(), settings.points_per_chunk)
        context = trainer.precision_plugin.forward_context  # e.g. bf16-mixed: autocast, as in training
        smoothed = SmoothedClassifier(self._base(pl_module, settings.largest_batch(), context), pl_module.sigma,
                                      pl_module.hparams.num_classes, forward_context=context)
        dataset = trainer.datamodule.split_dataset("val")
        accuracy = CertifiedAccuracy(self.radii, self._num_classes, sync_on_compute=False)  # rows come gathered
        for rows in certify_sharded(smoothed, dataset, chunks, settings, pl_module.device,
                                    trainer.global_rank, trainer.world_size, self.report):
            accuracy.update(rows)
        return accuracy.compute(), accuracy.gathered()[:, ROW_FIELDS.index("sigma")]

    def _base(self, pl_module, batch_size: int, context):
        """The base classifier, compiled once per model (the weights it trains are read at every call)."""
        if resolve_mode(self.compile, pl_module.device) == "none":
            return pl_module.model
        if self._compiled is None or self._compiled[0] is not pl_module.model:
            compiled, _ = compile_for_certification(pl_module.model, self.compile, batch_size,
                                                    pl_module.hparams.input_shape, pl_module.device, context, fix=_FIX)
            self._compiled = (pl_module.model, compiled)
        return self._compiled[1]

    def _report(self, trainer, summary: dict, sigmas: np.ndarray, folder: Path) -> None:
        epoch = trainer.current_epoch
        title = f"certified accuracy, epoch {epoch} ({summary['num_points']} val points)"
        png = plot_curves({f"epoch {epoch}": curve(summary)}, folder / f"certified_accuracy_epoch{epoch:03d}.png",
                          title=title)
        log_to_loggers(trainer, summary, prefix=MONITOR, split="val", n=self.settings.n, history=self._history,
                       title=f"certified accuracy by epoch ({summary['num_points']} val points, n={self.settings.n})",
                       sigmas=sigmas, png=png)
