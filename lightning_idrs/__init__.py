"""lightning_idrs: input-dependent randomized smoothing (Sukenik, Kuvshinov, Guennemann, ICML 2022).

The public API, by concept (one module each; docs/layout.md says where to change what):

* the radius (NumPy/SciPy only): ``certified_radius``, ``cohen_radius``, ``worst_case_probability``,
  ``sigma_ratio_bounds``                                                   -- ``lightning_idrs.radius``
* sigma(x): ``Sigma`` (the interface), ``KnnSigma``, ``ConstantSigma``     -- ``lightning_idrs.sigma``
  and embeddings for KnnSigma: ``OrthonormalProjection``, ``PCAProjection`` -- ``lightning_idrs.embeddings``
* the Monte Carlo algorithm: ``add_noise``, ``SmoothedClassifier``        -- ``lightning_idrs.smoothing``
  over a data set, in seeded chunks, on several processes: ``CertifySettings``, ``certify_chunks``
                                                                           -- ``lightning_idrs.sharding``
* training: ``IDRSClassifier`` (``lightning_idrs.module``), the datamodules (``lightning_idrs.data``),
  ``CertificationCallback`` (``lightning_idrs.callbacks``)
* the certify job as a function (the ``certify`` command's power): ``certify`` -> ``CertifyResult``
                                                                           -- ``lightning_idrs.certification``
  and PREDICT with abstention on a split or on files: ``predict``         -- ``lightning_idrs.prediction``
* checkpoints: ``load_checkpoint``                                         -- ``lightning_idrs.checkpoint``
* results: ``certified_accuracy``, ``summarize`` (NumPy, ``lightning_idrs.statistics``),
  ``CertifiedAccuracy`` (torchmetrics, ``lightning_idrs.metric``), ``CertifyLog`` / ``read_tsv``
  (the per-point TSV, ``lightning_idrs.tsv_log``), plots and W&B (``lightning_idrs.reporting``), tables
  (Markdown / LaTeX, ``lightning_idrs.results_table.results_table``)

Names are imported lazily, so ``from lightning_idrs import certified_radius`` does not pull in torch.
"""
from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "certified_radius": "radius",
    "cohen_radius": "radius",
    "worst_case_probability": "radius",
    "sigma_ratio_bounds": "radius",
    "Sigma": "sigma",
    "KnnSigma": "sigma",
    "ConstantSigma": "sigma",
    "OrthonormalProjection": "embeddings",
    "PCAProjection": "embeddings",
    "add_noise": "smoothing",
    "SmoothedClassifier": "smoothing",
    "CertifySettings": "sharding",
    "certify_chunks": "sharding",
    "certify": "certification",
    "CertifyOptions": "certification",
    "CertifyResult": "certification",
    "predict": "prediction",
    "PointNoise": "smoothing",
    "IDRSClassifier": "module",
    "DigitsDataModule": "data",
    "MNISTDataModule": "data",
    "MNIST5kDataModule": "data",
    "Objective": "objectives",
    "GaussianAugmentation": "objectives",
    "ConsistencyRegularization": "objectives",
    "MACER": "objectives",
    "CIFAR10DataModule": "data",
    "IDRSDataModule": "data",
    "CertificationCallback": "callbacks",
    "load_checkpoint": "checkpoint",
    "certified_accuracy": "statistics",
    "summarize": "statistics",
    "CertifiedAccuracy": "metric",
    "CertifyLog": "tsv_log",
    "read_tsv": "tsv_log",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"lightning_idrs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_idrs' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
