"""SHA-256 digests that identify data and weights (training set, certified split, sigma's point set)."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

__all__ = ["dataset_fingerprint", "fingerprint_in_background", "sha256_hex", "state_dict_sha256"]

_ROWS = 4096  # rows hashed per block: bounded memory for any array


def _blocks(array):
    """Contiguous byte blocks of a NumPy array or torch tensor (row blocks of the C-ordered data)."""
    if hasattr(array, "detach"):  # torch tensor, without importing torch
        array = array.detach().to("cpu")
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    for start in range(0, len(flat), _ROWS):
        block = flat[start:start + _ROWS]
        yield np.ascontiguousarray(block.numpy() if hasattr(block, "numpy") else block)


def dataset_fingerprint(inputs, labels=None, *, header=None) -> str:
    """The one digest of a data set: hex SHA-256 of ``header`` (default ``repr(shape)`` of the inputs),
    the inputs as C-ordered bytes in their own dtype, then the labels (if given) as int64.

    ``KnnSigma`` fingerprints the float32 training inputs it is fitted on; a data module fingerprints
    each split with a header naming the data set (``IDRSDataModule.fingerprint``).

        >>> dataset_fingerprint(np.zeros((2, 3), np.float32)) == sha256_hex("(2, 3)", np.zeros((2, 3), np.float32))
        True
    """
    if not hasattr(inputs, "detach"):
        inputs = np.asarray(inputs)
    arrays = [inputs]
    if labels is not None:
        labels = labels.detach().to("cpu").numpy() if hasattr(labels, "detach") else np.asarray(labels)
        arrays.append(labels.astype(np.int64))
    return sha256_hex(repr(tuple(inputs.shape)) if header is None else header, *arrays)


@contextmanager
def fingerprint_in_background(inputs):
    """Yields a function returning ``dataset_fingerprint(inputs)``, hashed in a thread while the block runs
    (hashlib frees the GIL: the hashing overlaps the work, e.g. KnnSigma's index on a GPU)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(dataset_fingerprint, inputs).result


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
