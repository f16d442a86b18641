"""lightning_idrs: input-dependent randomized smoothing (Sukenik, Kuvshinov, Guennemann, ICML 2022).

Public names are imported lazily, so ``from lightning_idrs import certified_radius`` does not pull
in torch or Lightning.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "certified_radius": "lightning_idrs.radius",
    "cohen_radius": "lightning_idrs.radius",
    "worst_case_probability": "lightning_idrs.radius",
    "sigma_ratio_bounds": "lightning_idrs.radius",
    "SmoothedClassifier": "lightning_idrs.smoothing",
    "KnnSigma": "lightning_idrs.sigma",
    "ConstantSigma": "lightning_idrs.sigma",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_idrs' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
