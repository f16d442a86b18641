"""Certifying the points of a data set: chunks of points, noise seeded per point, shared out over processes.

* The noise of a point is a function of (seed, the point's index in the data set) only
  (:class:`~lightning_idrs.smoothing.PointNoise`), so its row does not depend on skip, max, the
  chunking, the batch size, interruptions or the process that certifies it.
* :func:`plan_chunks` cuts the selected points into chunks certified together in one vectorised call.
* :func:`certify_chunks` runs :class:`~lightning_idrs.smoothing.SmoothedClassifier` chunk by chunk.
* :func:`certify_sharded` shares the chunks out over the ranks of a distributed job and gathers the
  rows after each round with :class:`~lightning_idrs.metric.CertifyRows`: the ``certify`` command
  (Lightning Fabric) and the certification Callback (the Trainer's strategy) both use it.
"""
import time
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from lightning_idrs.metric import ROW_FIELDS, CertifyRows
from lightning_idrs.smoothing import BrokenModelError, Certificates, PointNoise, SmoothedClassifier
from lightning_idrs.arguments import OpenUnitInterval, PositiveInt, Seed, UsageError, check

__all__ = ["CertifySettings", "CertifiedChunk", "DEVICE_DEFAULTS", "ROW_SETTINGS", "certify_chunks", "certify_sharded",
           "plan_chunks"]


@dataclass
class CertifySettings:
    """How each point is certified: Cohen et al.'s CERTIFY, the noise seed and how the work is cut.

    Args:
        n0: noise samples to select the top class (Cohen et al.: 100).
        n: noise samples to estimate pA (Cohen et al.: 100,000).
        alpha: failure probability of each certificate, in (0, 1) (Cohen et al.: 0.001).
        batch_size: noisy samples per forward pass (speed only: the noise of a point does not depend on it);
            default 1,000 on CPU, 16,000 on a CUDA GPU.
        seed: seed of the noise, in [0, 2^32); a point's noise is a function of (seed, its index in the data set).
        points_per_chunk: points certified together in one vectorised call (speed only); default 10 on
            CPU, 16 on a CUDA GPU.
        sequential: draw the estimation samples in stages and stop each point once its outcome on the
            radius grid is decided (needs a grid; docs/math.md, "Sequential certification").
    """

    n0: PositiveInt = 100
    n: PositiveInt = 100_000
    alpha: OpenUnitInterval = 0.001
    batch_size: Optional[PositiveInt] = None
    seed: Seed = 0
    points_per_chunk: Optional[PositiveInt] = None
    sequential: bool = False

    def __post_init__(self):
        for name, kind in (("n0", PositiveInt), ("n", PositiveInt), ("alpha", OpenUnitInterval),
                           ("batch_size", PositiveInt), ("seed", Seed), ("points_per_chunk", PositiveInt)):
            if getattr(self, name) is not None or name not in ("batch_size", "points_per_chunk"):
                setattr(self, name, check(kind, getattr(self, name), name))
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be true or false, got {self.sequential!r}")

    def for_device(self, device, defaults: Optional[dict] = None):
        """A copy whose unset batch size and chunking are the defaults of ``device``'s kind (``defaults``
        or :data:`DEVICE_DEFAULTS`: ``cuda`` for CUDA devices, ``cpu`` for the others)."""
        batch, chunk = (defaults or DEVICE_DEFAULTS)["cuda" if torch.device(device).type == "cuda" else "cpu"]
        return replace(self, batch_size=self.batch_size or batch, points_per_chunk=self.points_per_chunk or chunk)

    def largest_batch(self) -> int:
        """The most samples one forward pass gets: the batch size, or a whole chunk's samples when fewer (the
        static shape a compiled model is compiled for). Call it on the settings of a device (:meth:`for_device`)."""
        return min(self.batch_size, self.points_per_chunk * max(self.n0, self.n))


#: (noisy samples per forward pass, points per chunk) when the user gives none. CPU: 1,000 and 10 (on CPU
#: CIFAR ResNets prefer 100, benchmarks/README.md). CUDA: 16,000 and 16: on an H200, ResNet-110 (bf16,
#: channels-last) ran 81.7k / 90.0k / 95.1k samples/s eager at 1,000 / 4,000 / 16,000 per batch, and compiled
#: (max-autotune) 222k at 4,000 and 248k at 16,000; 16 points x n fill whole batches of 16,000 for any n
#: that is a multiple of 1,000, and the selection's 16 x 100 samples pad one batch.
DEVICE_DEFAULTS = {"cpu": (1000, 10), "cuda": (16_000, 16)}


#: The settings of :class:`CertifySettings` that determine the rows (batch size and chunking do not).
ROW_SETTINGS = ("n0", "n", "alpha", "seed", "sequential")


def plan_chunks(indices, points_per_chunk: int) -> list:
    """``[(c, indices[c*size:(c+1)*size])]``: the points certified together, ``points_per_chunk`` at a time."""
    indices = np.asarray(indices, dtype=np.int64)
    return [(c, indices[i:i + points_per_chunk]) for c, i in enumerate(range(0, len(indices), points_per_chunk))]


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
                                cert.sigma, cert.p_a_lower, np.full(len(self.indices), self.seconds_per_point),
                                cert.samples])


def certify_chunks(smoothed: SmoothedClassifier, dataset, chunks: Iterable, settings: CertifySettings,
                   device, radii=None) -> Iterator[CertifiedChunk]:
    """CERTIFY the points of each chunk ``(c, indices)`` of ``dataset`` (items ``(x, y, ...)``) on ``device``,
    each with the noise of (``settings.seed``, its index); sequentially on the grid ``radii`` when
    ``settings.sequential``."""
    if settings.sequential and radii is None:
        raise UsageError("sequential certification needs a radius grid (e.g. --certify.radii 0.25,0.5,0.75,1.0)")
    device = torch.device(device)
    settings = settings.for_device(device)
    for c, indices in chunks:
        items = [dataset[int(i)] for i in indices]
        x = torch.stack([item[0] for item in items]).to(device)
        labels = np.asarray([int(item[1]) for item in items], dtype=np.int64)
        noise = PointNoise(settings.seed, indices)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                certificates = smoothed.certify(x, settings.n0, settings.n, settings.alpha, settings.batch_size,
                                                noise, radii if settings.sequential else None)
        except BrokenModelError as error:  # name the data set's points, not positions in the chunk
            points = [int(indices[p]) for p in error.positions]
            raise BrokenModelError(f"the base classifier returned NaN or inf logits on noisy copies of data set "
                                   f"point(s) {points[:10]}: its weights are broken, no certificate is issued",
                                   points) from None
        except torch.OutOfMemoryError:
            smaller = max(1, settings.batch_size // 4)
            raise UsageError(f"the GPU ran out of memory at {settings.batch_size} samples per forward pass; pass a "
                             f"smaller batch size, e.g. --certify.batch_size {smaller}") from None
        seconds = (time.perf_counter() - start) / len(indices)
        yield CertifiedChunk(c, np.asarray(indices), labels, certificates, seconds)


_FAILED = -2.0  # the idx of the row by which a rank tells the others that it failed


def certify_sharded(smoothed: SmoothedClassifier, dataset, chunks: list, settings: CertifySettings, device,
                    rank: int, world_size: int, radii=None) -> Iterator[np.ndarray]:
    """Rank r certifies chunks r, r + W, r + 2W, ... of ``chunks``; after each round the rows of all
    ranks are gathered (:class:`~lightning_idrs.metric.CertifyRows`, over the default process group that
    Fabric or the Trainer set up) and yielded on every rank, in chunk order: the same rows as one
    process would produce, for any number of ranks."""
    mine = certify_chunks(smoothed, dataset, chunks[rank::world_size], settings, device, radii)
    gather = CertifyRows().to(device)
    for _ in range(-(-len(chunks) // world_size)):
        gather.reset()
        try:
            done = next(mine, None)
        except UsageError as error:  # tell the other ranks instead of leaving them waiting in the all-gather
            failure, done = error, None
            gather.update(np.full((1, len(ROW_FIELDS)), _FAILED))
        else:
            failure = None
        gather.update(done.rows() if done is not None else np.empty((0, len(ROW_FIELDS))))  # every rank gathers
        gathered = gather.compute()
        if failure is not None:
            raise failure
        if (gathered[:, 0] == _FAILED).any():
            raise UsageError("certification stopped: another process failed (its error is printed above)")
        yield gathered
