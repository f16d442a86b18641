"""torchmetrics ``CertifiedAccuracy``: per-point certification results gathered across DDP ranks."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_idrs.statistics import ABSTAIN, as_radius_grid, summarize

# state name -> dtype. Radii and sigmas are kept in float64: a float32 radius of 0.7 is
# 0.69999999, which would drop the point from the R = 0.7 column.
STATES = {
    "indices": torch.int64,
    "labels": torch.int64,
    "predictions": torch.int64,
    "correct": torch.int64,
    "radii": torch.float64,
    "sigmas": torch.float64,
}


class CertifiedAccuracy(Metric):
    """Accumulates per-point certification results; ``compute()`` returns :func:`summarize`'s dict.

    Each rank adds its shard with ``update``; states are lists reduced with
    ``dist_reduce_fx="cat"``, so ``compute()`` sees all points of all ranks. If ``idx`` is given
    to ``update``, rows with a repeated non-negative idx (e.g. the padding a
    ``DistributedSampler`` adds to make shards equal) are counted once (first occurrence wins).

    Every list state always holds an empty tensor of its own dtype (see ``reset``) so that a rank
    that received no data still sends a tensor of the right dtype in the all-gather.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, radii: Sequence[float], num_classes: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.radii_grid = [float(R) for R in as_radius_grid(radii)]
        self.num_classes = num_classes
        for name in STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.reset()

    def reset(self) -> None:
        super().reset()
        for name, dtype in STATES.items():
            getattr(self, name).append(torch.zeros(0, dtype=dtype, device=self.device))

    def update(self, labels, predictions, radius, sigma, correct=None, idx=None) -> None:
        """Add a batch of results (1-D tensors / arrays of equal length; may be empty).

        ``correct`` defaults to ``predictions == labels``; ``idx`` is the dataset index of each point.
        Radii are stored in float64: pass float64 tensors / NumPy arrays / Python floats (a float32
        tensor has already lost the digits that decide ``radius >= R`` at a grid point).
        """
        dev = self.device

        def t(x, dtype):
            # dtype inside as_tensor: a Python list of floats must not pass through float32
            return torch.as_tensor(x, dtype=dtype, device=dev).reshape(-1)

        lab = t(labels, torch.int64)
        pred = t(predictions, torch.int64)
        rad = t(radius, torch.float64)
        sig = t(sigma, torch.float64)
        cor = (pred == lab) & (pred != ABSTAIN) if correct is None else t(correct, torch.int64)
        cor = cor.to(torch.int64)
        ind = torch.full_like(lab, -1) if idx is None else t(idx, torch.int64)
        lengths = {len(x) for x in (lab, pred, rad, sig, cor, ind)}
        if len(lengths) != 1:
            raise ValueError("update(): all arguments must have the same number of points")
        self.labels.append(lab)
        self.predictions.append(pred)
        self.radii.append(rad)
        self.sigmas.append(sig)
        self.correct.append(cor)
        self.indices.append(ind)

    def gathered(self) -> Dict[str, np.ndarray]:
        """The accumulated (on this rank, or synced inside ``compute``) points as NumPy columns."""
        cols = {name: dim_zero_cat(getattr(self, name)).detach().cpu().numpy() for name in STATES}
        ind = cols["indices"]
        if ind.size:
            keep = np.ones(len(ind), dtype=bool)
            valid = np.flatnonzero(ind >= 0)
            _, first = np.unique(ind[valid], return_index=True)
            keep[valid] = False
            keep[valid[first]] = True
            cols = {k: v[keep] for k, v in cols.items()}
        return cols

    def compute(self) -> dict:
        cols = self.gathered()
        if cols["labels"].size == 0:
            raise ValueError(
                "CertifiedAccuracy.compute(): no points were added (on any rank); nothing to summarise"
            )
        return summarize(
            cols["labels"],
            cols["predictions"],
            cols["radii"],
            cols["correct"],
            cols["sigmas"],
            self.radii_grid,
            self.num_classes,
        )

