"""The LightningModule: a base classifier trained under noise with per-input sigma(x).

Training (Cohen et al. 2019, Sec. 4; Sukenik et al. 2022, Sec. 5): x_noisy = x + sigma(x) * eps,
eps ~ N(0, I), one sigma per image, fresh eps every step, noise added in pixel space (the data
normalisation is the model's first layer). Training points use ``Sigma.training_sigma`` (the kNN
sigma excludes each point from its own neighbours). The loss is the configured objective
(:mod:`lightning_idrs.objectives`; default Gaussian augmentation), which draws the noise with
:func:`lightning_idrs.smoothing.add_noise`, the same function certification uses.
"""

import math
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from lightning_idrs.compiling import COMPILE_MODES, CompiledModel, CompileMode, check_compiler
from lightning_idrs.digests import state_dict_sha256
from lightning_idrs.models import build_model
from lightning_idrs.objectives import GaussianAugmentation, Objective
from lightning_idrs.sigma import KnnSigma, Sigma
from lightning_idrs.smoothing import add_noise
from lightning_idrs.arguments import UsageError

#: The checkpoint entry with what certification needs besides the weights (read by lightning_idrs.checkpoint).
CHECKPOINT_KEY = "lightning_idrs"
_PROBE = 16  # training inputs whose sigma is compared across DDP ranks


def non_finite_weights(state) -> list:
    """Names of the floating-point tensors of a state dict that hold NaN or inf (the one weight check:
    training, checkpoint loading)."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class TrainingDiverged(UsageError):
    """The loss or the weights became NaN / inf: training stops and nothing more is saved."""


class IDRSClassifier(pl.LightningModule):
    """Base classifier + sigma function, trained on noisy inputs.

    Args:
        arch: model name for :func:`lightning_idrs.models.build_model`.
        sigma: the noise level sigma(x), any :class:`lightning_idrs.sigma.Sigma` (``class_path`` in
            YAML): ``KnnSigma`` (IDRS, the default with its default arguments) or ``ConstantSigma`` (RS).
        input_shape, num_classes, mean, std: linked from the datamodule by the CLI.
        optimizer, lr_scheduler: callables from the config (``model.optimizer.class_path``, ...);
            default Adam(lr=1e-3) and no schedule.
        objective: the training loss, any :class:`lightning_idrs.objectives.Objective` (``class_path``):
            ``GaussianAugmentation`` (the default), ``ConsistencyRegularization`` or ``MACER``. Recorded
            in the hyper-parameters as ``_objective``; certification never needs it.
        compile: none, default or max-autotune: the training steps run the base classifier under
            torch.compile (README, "GPU"); checkpoints and certification see the plain model.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        sigma: Optional[Sigma] = None,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        objective: Optional[Objective] = None,
        compile: CompileMode = "none",
    ):
        super().__init__()
        self.sigma = KnnSigma() if sigma is None else sigma
        if not isinstance(self.sigma, Sigma):
            raise ValueError(f"sigma must be a lightning_idrs.sigma.Sigma, got {type(sigma).__name__}")
        sigma = self.sigma.config  # the hyper-parameter is class_path + init_args, never the module itself
        self.objective = GaussianAugmentation() if objective is None else objective
        if not isinstance(self.objective, Objective):
            raise ValueError(f"objective must be a lightning_idrs.objectives.Objective, got {type(objective).__name__}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "objective"])
        self.hparams["_objective"] = self.objective.config  # a record: loading a checkpoint skips "_" keys
        self.model = build_model(arch, tuple(input_shape), num_classes, tuple(mean), tuple(std))
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
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

    @property
    def network(self) -> torch.nn.Module:
        """The base classifier as the training steps run it: ``self.model``, or with ``compile`` the same
        model under torch.compile. The compiled wrapper is no child of this module, so the state dict
        (checkpoints) keeps ``model.*`` keys (no ``_orig_mod.``) and everything else gets the plain model."""
        if self.hparams.get("compile", "none") == "none":
            return self.model
        if self.__dict__.get("_compiled") is None:
            self.__dict__["_compiled"] = CompiledModel(self.model, self.hparams.compile, "--model.compile none")
        return self.__dict__["_compiled"]

    def check_compile(self) -> None:
        """With ``compile``, compile a one-line function on this device first: a missing C compiler
        or Triton is one error line before training starts."""
        check_compiler(self.device, self.hparams.get("compile", "none"), "--model.compile none")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_compiled", None)  # compiled code does not pickle; it is rebuilt on first use
        return state

    # ------------------------------------------------------------------ sigma(x) and the data
    def setup(self, stage: str) -> None:
        """Fit sigma on the datamodule's clean training set before the first batch."""
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

    def check_training_sigma(self, datamodule, batch_size: int = 4096) -> None:
        """Refuse, before the first step, a sigma(x) that is NaN, inf or <= 0 for any training point."""
        train = datamodule.split_dataset("train")
        for start in range(0, len(train), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(train)))
            x = train.inputs(idx)
            with torch.no_grad():
                sigma = self.sigma.training_sigma(x.to(self.device), idx.to(self.device))
            bad = ~(torch.isfinite(sigma) & (sigma > 0))
            if bad.any():
                first = int(idx[bad.nonzero()[0, 0].cpu()])
                raise UsageError(
                    f"sigma(x) is {float(sigma[bad][0])} for training point {first} ({int(bad.sum())} of the "
                    f"{len(idx)} in its batch are not finite and > 0): {self.sigma.label} over- or underflows; lower the "
                    "semi-elasticity r, or set m near the training points' mean kNN distance, or change k")

    def on_fit_start(self) -> None:
        """Under DDP, check that sigma(x) is identical on every rank (same fit, same state)."""
        if not hasattr(getattr(self.trainer, "datamodule", None), "split_dataset"):
            return  # trained from plain dataloaders: nothing to probe sigma with
        digest = self._sigma_digest()
        gathered = self.all_gather(digest)
        if gathered.dim() > digest.dim() and not torch.equal(gathered, digest.expand_as(gathered)):
            raise RuntimeError(f"sigma(x) differs across ranks: digests {gathered.tolist()}")
        ranks = gathered.shape[0] if gathered.dim() > digest.dim() else 1
        rank_zero_info(f"lightning_idrs: sigma(x) identical on {ranks} rank(s), digest {digest.tolist()}")

    def _sigma_digest(self) -> torch.Tensor:
        """A few numbers that differ when sigma(x) differs: sums over the first training inputs."""
        train = self.trainer.datamodule.split_dataset("train")
        count = min(_PROBE, len(train))
        x = torch.stack([train[i][0] for i in range(count)]).to(self.device)
        with torch.no_grad():
            values = torch.cat([self.sigma(x), self.sigma.training_sigma(x, torch.arange(count, device=self.device))])
        values = values.double().to(self.device)
        return torch.stack([values.sum(), (values**2).sum()])

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        loss, logits = self.objective(self.network, x, y, self.sigma.training_sigma(x, idx))
        if not torch.isfinite(loss):  # stop before the step that would write NaN into the weights
            raise TrainingDiverged(
                f"training diverged: the loss is {loss.detach().item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}; nothing is saved from here on. Lower the learning rate "
                "(--model.optimizer.init_args.lr) or the noise level, or resume from an earlier checkpoint")
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log("train/noisy_acc", self.train_acc, on_epoch=True, on_step=False)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        """Accuracy on clean inputs and on inputs with noise sigma(x) (the full index, no exclusion)."""
        x, y = batch[0], batch[1]
        clean = self.model(x)
        noisy = self.model(add_noise(x, self.sigma(x)))
        self.eval_acc[f"{stage}_clean"](clean, y)
        self.eval_acc[f"{stage}_noisy"](noisy, y)
        self.log(f"{stage}/loss", F.cross_entropy(noisy, y), sync_dist=True)
        self.log(f"{stage}/clean_acc", self.eval_acc[f"{stage}_clean"], prog_bar=True)
        self.log(f"{stage}/noisy_acc", self.eval_acc[f"{stage}_noisy"], prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        """Weights that are NaN / inf are never validated, checkpointed or certified."""
        broken = non_finite_weights(self.state_dict())
        if broken:
            raise TrainingDiverged(f"training diverged: the weights {', '.join(broken[:3])} hold NaN or inf at "
                                   f"epoch {self.current_epoch}; lower the learning rate (--model.optimizer.init_args.lr)")

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
    def get_extra_state(self) -> dict:
        """The identity of the training data sigma was fitted on (saved in the state dict)."""
        return {"dataset": self.dataset_name, "data_fingerprint": self.data_fingerprint}

    def set_extra_state(self, state: dict) -> None:
        self.dataset_name, self.data_fingerprint = state["dataset"], state["data_fingerprint"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Describe the checkpoint for certification and for people (``lightning_idrs.checkpoint`` reads it)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "version": 2,
            "dataset": self.dataset_name,
            "data_fingerprint": self.data_fingerprint,
            "input_shape": list(self.hparams.input_shape),
            "dim": self.input_dim,
            "sigma": self.hparams.sigma,
            "sigma_label": self.sigma.label,
            "semi_elasticity": self._certified_semi_elasticity(),
            "datamodule_class": None if datamodule is None else f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "weights_sha256": state_dict_sha256(checkpoint["state_dict"]),  # checked when the checkpoint is loaded
        }

    def _certified_semi_elasticity(self) -> Optional[float]:
        """sigma's semi-elasticity r, or None where sigma cannot be certified (undeclared Lip, approximate index)."""
        try:
            return float(self.sigma.semi_elasticity)
        except ValueError:
            return None
