"""torchmetrics Metrics over certify rows: the one way certification results travel between processes.

* :class:`CertifyRows` accumulates rows of ``certify.tsv``'s columns (``ROW_FIELDS``) in one float64
  list state reduced with ``dist_reduce_fx="cat"``: ``compute()`` returns the rows of every rank
  (torchmetrics' all-gather, shards of any length), in rank order. The ``certify`` command and the
  certification Callback gather each round of chunks with it
  (:func:`lightning_idrs.sharding.certify_sharded`).
* :class:`CertifiedAccuracy` is the same accumulator whose ``compute()`` returns the summary
  (:func:`lightning_idrs.statistics.summarize_columns`): the Callback feeds it the gathered rows, and
  it works as any torchmetrics Metric in a user's own (DDP) loop.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_idrs.statistics import ABSTAIN, as_radius_grid, summarize_columns
from lightning_idrs.tsv_log import TSV_HEADER

__all__ = ["CertifyRows", "CertifiedAccuracy", "ROW_FIELDS"]

#: The columns of a certify row: those of ``certify.tsv``. Rows are float64 (integers are exact, and a
#: float32 radius of 0.7 is 0.69999999, which would drop the point from the R = 0.7 column).
ROW_FIELDS = TSV_HEADER
_IDX, _COLUMNS = ROW_FIELDS.index("idx"), len(ROW_FIELDS)


class CertifyRows(Metric):
    """Certify rows ([points, len(ROW_FIELDS)] float64) of this rank; ``compute()`` returns all ranks'.

    Rows with a repeated idx >= 0 (e.g. the padding a ``DistributedSampler`` adds to make shards
    equal) are kept once (first occurrence wins); rows with idx < 0 are all kept (-1: a point added
    without its idx; -2 and below: markers, such as :func:`~lightning_idrs.sharding.certify_sharded`'s
    "this rank failed").
    The list state always holds an empty tensor of the right shape (see ``reset``), so a rank that
    added nothing still takes part in the all-gather.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.rows.append(torch.zeros(0, _COLUMNS, dtype=torch.float64, device=self.device))

    def update(self, rows) -> None:
        """Add rows (a float64 array or tensor [points, len(ROW_FIELDS)], e.g. ``CertifiedChunk.rows()``)."""
        rows = torch.as_tensor(rows, dtype=torch.float64, device=self.device)
        if rows.ndim != 2 or rows.shape[1] != _COLUMNS:
            raise ValueError(f"update(): rows must have shape [points, {_COLUMNS}] ({', '.join(ROW_FIELDS)}), "
                             f"got {tuple(rows.shape)}")
        self.rows.append(rows)

    def gathered(self) -> np.ndarray:
        """The accumulated rows (this rank's, or all ranks' inside ``compute``/``sync_context``), repeats dropped."""
        rows = dim_zero_cat(self.rows).detach().cpu().numpy().reshape(-1, _COLUMNS)
        ind = rows[:, _IDX]
        valid = np.flatnonzero(ind >= 0)
        _, first = np.unique(ind[valid], return_index=True)
        keep = ind < 0
        keep[valid[first]] = True
        return rows[keep]

    def compute(self) -> np.ndarray:
        return self.gathered()


class CertifiedAccuracy(CertifyRows):
    """Certified accuracy (and the rest of :func:`~lightning_idrs.statistics.summarize`) over certify rows.

    ``update(rows)`` adds rows; ``update(labels, predictions, radius, sigma, correct=None, idx=None)``
    adds points by column (1-D tensors / arrays of equal length; ``correct`` defaults to
    ``predictions == labels``, not abstained). Radii are kept in float64: pass float64 tensors, NumPy
    arrays or Python floats (a float32 tensor has already lost the digits that decide ``radius >= R``).
    ``compute()`` returns the summary of all ranks' points on the radius grid ``radii``.
    """

    higher_is_better = True

    def __init__(self, radii: Sequence[float], num_classes: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.radii_grid = [float(R) for R in as_radius_grid(radii)]
        self.num_classes = num_classes

    def update(self, labels, predictions=None, radius=None, sigma=None, correct=None, idx=None) -> None:
        if predictions is None and radius is None and sigma is None and correct is None and idx is None:
            return super().update(labels)  # rows

        def column(x, dtype):  # dtype inside as_tensor: a Python list of floats must not pass through float32
            return torch.as_tensor(x, dtype=dtype).reshape(-1).to(torch.float64)

        lab, pred = column(labels, torch.int64), column(predictions, torch.int64)
        rad, sig = column(radius, torch.float64), column(sigma, torch.float64)
        cor = ((pred == lab) & (pred != ABSTAIN)).to(torch.float64) if correct is None else column(correct, torch.int64)
        ind = torch.full_like(lab, -1) if idx is None else column(idx, torch.int64)
        if len({len(x) for x in (lab, pred, rad, sig, cor, ind)}) != 1:
            raise ValueError("update(): all arguments must have the same number of points")
        given = {"idx": ind, "label": lab, "predict": pred, "radius": rad, "correct": cor, "sigma": sig}
        nan = torch.full_like(lab, float("nan"))
        super().update(torch.stack([given.get(name, nan) for name in ROW_FIELDS], dim=1))

    def compute(self) -> dict:
        rows = self.gathered()
        rows = rows[rows[:, _IDX] >= -1]  # idx -1: a point added without its idx; below: markers
        if len(rows) == 0:
            raise ValueError("CertifiedAccuracy.compute(): no points were added (on any rank); nothing to summarise")
        columns: Dict[str, np.ndarray] = dict(zip(ROW_FIELDS, rows.T))
        if np.isnan(columns["samples"]).any():  # points added by column carry no sample counts
            del columns["samples"]
        return summarize_columns(columns, self.radii_grid, self.num_classes)
