"""Durable JSON files: ``summary.json``, ``settings.json`` and the like, written atomically (a temp file in
the same folder, fsync, rename) as strict JSON, so that a reader never sees a partial file and a crash
never leaves one. Storage only: nothing here draws, plots or logs (``tsv_log`` builds on it).
"""
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

__all__ = ["SUMMARY_NAME", "fsync_dir", "json_ready", "read_summary", "write_json_atomic", "write_summary",
           "write_text_atomic"]

SUMMARY_NAME = "summary.json"
PathLike = Union[str, os.PathLike]


def fsync_dir(path: Path) -> None:
    """Make a created/renamed directory entry durable (best effort; not possible everywhere)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def json_ready(obj: Any):
    """Plain-JSON version of ``obj``: NumPy/torch values to Python, paths to str, non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # NumPy / torch values, without importing torch
        return json_ready(obj.tolist())
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: temp file in the same folder, fsync, os.replace."""
    write_text_atomic(path, json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o644)  # mkstemp creates 0600; results are meant to be shared
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_summary(path: PathLike, summary: Mapping[str, Any]) -> None:
    """Write a summary dict to ``path`` as JSON, atomically (a reader never sees a partial file).

    NumPy / torch scalars and arrays become Python numbers and lists; NaN and infinities become
    ``null`` so that the file is strict JSON.
    """
    write_json_atomic(path, dict(summary))


def read_summary(path: PathLike) -> dict:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)
