"""SHA-256 digests that identify data and weights (training set, certified split, sigma's point set)."""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["dataset_fingerprint", "sha256_hex", "state_dict_sha256"]

_ROWS = 4096  # rows hashed per block: bounded memory for any array


def _blocks(array):
    """Contiguous byte blocks of a NumPy array or torch tensor (row blocks of the C-ordered data)."""
    if hasattr(array, "detach"):  # torch tensor, without importing torch
        array = array.detach().to("cpu")
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    for start in range(0, len(flat), _ROWS):
        block = flat[start:start + _ROWS]
        yield np.ascontiguousarray(block.numpy() if hasattr(block, "numpy") else block)


def dataset_fingerprint(train) -> str:
    """Hex sha256 of ``repr(shape)`` followed by the data as C-ordered float32 bytes (a tensor or an array)."""
    x = train.detach().float() if hasattr(train, "detach") else np.asarray(train, dtype=np.float32)
    return sha256_hex(repr(tuple(x.shape)), x)


def sha256_hex(header: str, *arrays) -> str:
    """Hex SHA-256 of ``header`` (UTF-8) followed by the raw bytes of each array in turn."""
    digest = hashlib.sha256(header.encode())
    for array in arrays:
        for block in _blocks(array):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict) -> str:
    """Hex SHA-256 of a state dict: each entry's name, then a tensor's dtype, shape and bytes (or the
    repr of any other value, e.g. extra state), in sorted name order. Any changed byte changes it."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{name}|{value!r}|".encode())
    return digest.hexdigest()
