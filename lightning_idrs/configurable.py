"""Pluggable parts (sigma functions, embeddings) remember the arguments they were built with.

A checkpoint names its sigma function as ``{"class_path": ..., "init_args": ...}``, the same form a
YAML config uses (``model.sigma``), so loading rebuilds it with jsonargparse and never unpickles an
object. Under ``fit`` the CLI records that form itself; an object built in Python records it here.
Tensor arguments are recorded as None: they must be buffers that ``load_state_dict`` restores.
"""
from __future__ import annotations

import inspect
from typing import Optional

__all__ = ["Configurable", "config_of"]

_PLAIN = (bool, int, float, str, type(None))


class Configurable:
    """Mixin: ``Class(*args, **kwargs)`` stores the bound constructor arguments for :func:`config_of`."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
            bound.apply_defaults()
        except TypeError:  # __init__ will raise the real error
            arguments = None
        else:
            parameters = inspect.signature(cls.__init__).parameters
            arguments = {}
            for name, value in list(bound.arguments.items())[1:]:  # drop self
                kind = parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
                elif value:  # extra positional arguments cannot be named in a config
                    arguments = None
                    break
        object.__setattr__(self, "_init_args", arguments)
        return self


def _plain(value):
    """``value`` as YAML-able data, or raise TypeError."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if type(value).__name__ in ("Tensor", "ndarray", "Parameter"):
        return None  # restored from the state dict
    nested = config_of(value)
    if nested is None:
        raise TypeError(type(value).__name__)
    return nested


def config_of(obj) -> Optional[dict]:
    """``{"class_path", "init_args"}`` that rebuilds ``obj`` (before its state dict), or None if unknown."""
    arguments = getattr(obj, "_init_args", None)
    if arguments is None:
        return None
    try:
        init_args = {name: _plain(value) for name, value in arguments.items()}
    except TypeError:
        return None
    return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": init_args}
