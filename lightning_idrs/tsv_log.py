"""Certification results on disk: the per-point TSV log (resumable, crash-safe), settings, summaries.

Layout of a certification output directory::

    settings.json        the settings that produced the rows (written once; a rerun must match)
    certify.tsv          one row per finished point, header TSV_HEADER, appended batch by batch
    summary.json         written (atomically) at the end, see lightning_idrs.reporting.write_summary
    .certify.lock        advisory lock (filelock: flock on POSIX, msvcrt on Windows) so that two
                         processes never append to one log; the OS releases it when a process dies

Crash safety of ``certify.tsv``: every batch of rows is one ``write`` of complete lines followed by
``fsync``. A process killed at any moment can therefore leave at most one torn (partial) line at
the end of the file; :class:`CertifyLog` drops it on open (truncating the file to the last complete
line), so no finished row is lost (a row counts as finished once ``append`` returned) and no row is
ever duplicated or half-written in the result.
"""
from __future__ import annotations

import json
import logging
import os
from collections import namedtuple
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from filelock import FileLock, Timeout

from lightning_idrs.jsonfiles import fsync_dir, json_ready, write_json_atomic

__all__ = ["TSV_HEADER", "TSV_NAME", "SETTINGS_NAME", "CertifyRow", "CertifyLog", "format_row", "read_tsv"]

log = logging.getLogger(__name__)

TSV_HEADER = ("idx", "label", "predict", "radius", "correct", "sigma", "p_a_lower", "time", "samples")
TSV_NAME = "certify.tsv"
SETTINGS_NAME = "settings.json"
LOCK_NAME = ".certify.lock"

CertifyRow = namedtuple("CertifyRow", TSV_HEADER)

_INT_FIELDS = ("idx", "label", "predict", "correct", "samples")
_FLOAT_FIELDS = ("radius", "sigma", "p_a_lower", "time")
_PARSERS = tuple(int if name in _INT_FIELDS else float for name in TSV_HEADER)
_DTYPES = {name: (np.int64 if name in _INT_FIELDS else np.float64) for name in TSV_HEADER}
_HEADER_LINE = "\t".join(TSV_HEADER)

PathLike = Union[str, "os.PathLike[str]"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
def _as_int(name: str, value) -> int:
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # 0-d NumPy / torch values
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"field {name!r} must be an integer, got {value!r}")
        return int(value)
    try:
        return int(value.__index__()) if not isinstance(value, bool) else int(value)
    except AttributeError:
        raise ValueError(f"field {name!r} must be an integer, got {value!r}") from None


def _as_float(name: str, value) -> float:
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"field {name!r} must be a number, got {value!r}") from None


def _normalize_row(row) -> CertifyRow:
    if isinstance(row, Mapping):
        missing = [k for k in TSV_HEADER if k not in row]
        if missing:
            raise ValueError(f"row is missing field(s) {missing}")
        values = [row[k] for k in TSV_HEADER]
    else:
        values = list(row)
        if len(values) != len(TSV_HEADER):
            raise ValueError(f"row must have {len(TSV_HEADER)} fields {TSV_HEADER}, got {len(values)}")
    out = [
        _as_int(name, v) if name in _INT_FIELDS else _as_float(name, v) for name, v in zip(TSV_HEADER, values)
    ]
    r = CertifyRow(*out)
    if r.idx < 0:
        raise ValueError(f"idx must be >= 0, got {r.idx}")
    if r.correct not in (0, 1):
        raise ValueError(f"correct must be 0 or 1, got {r.correct}")
    if r.predict < -1:
        raise ValueError(f"predict must be a class or -1 (abstain), got {r.predict}")
    return r


def format_row(row) -> str:
    """One TSV line (with trailing newline). Floats use ``repr`` so that they round-trip exactly."""
    r = _normalize_row(row)
    fields = [str(v) if name in _INT_FIELDS else repr(float(v)) for name, v in zip(TSV_HEADER, r)]
    return "\t".join(fields) + "\n"


def _parse_line(line: str) -> CertifyRow:
    fields = line.split("\t")
    if len(fields) != len(TSV_HEADER):
        raise ValueError(f"expected {len(TSV_HEADER)} tab-separated fields, got {len(fields)}")
    return CertifyRow(*(parse(f) for parse, f in zip(_PARSERS, fields)))


def _parse_tsv_bytes(data: bytes, source: str) -> Tuple[List[CertifyRow], int, Optional[str]]:
    """Parse a certify.tsv image.

    Returns ``(rows, good_length, problem)``: ``good_length`` is the number of leading bytes that
    hold the header and complete, valid rows; ``problem`` describes what follows (a torn last line),
    or is None. A bad line that is NOT the last one means real corruption: ValueError.
    """
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    problem = None
    if end < len(data):
        problem = f"torn last line of {len(data) - end} bytes without a newline"
    complete = data[:end]
    if not complete:
        # not even the header is complete (empty file, or killed while the header was written)
        if data and not _HEADER_LINE.encode().startswith(data):
            raise ValueError(f"{source}: does not start with the header {_HEADER_LINE!r}")
        return [], 0, problem
    lines = complete.split(b"\n")[:-1]
    try:
        header = lines[0].decode("utf-8")
    except UnicodeDecodeError:
        header = repr(lines[0][:80])
    if header != _HEADER_LINE:
        raise ValueError(
            f"{source}: header mismatch: expected {_HEADER_LINE!r}, found {header!r}. "
            "This is not a certify.tsv of this version; use another output directory."
        )
    rows: List[CertifyRow] = []
    good = len(lines[0]) + 1
    seen = set()
    for number, raw in enumerate(lines[1:], start=2):
        try:
            row = _parse_line(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            if number == len(lines):  # last line: torn (e.g. zero-filled after a power loss)
                problem = f"malformed last line {number} ({exc})"
                break
            raise ValueError(f"{source}: line {number} is malformed ({exc}); the file is corrupted") from None
        if row.idx in seen:
            raise ValueError(f"{source}: line {number} repeats idx {row.idx}; the file is corrupted")
        seen.add(row.idx)
        rows.append(row)
        good += len(raw) + 1
    return rows, good, problem


def _columns(rows: Sequence[CertifyRow]) -> Dict[str, np.ndarray]:
    if not rows:
        return {name: np.zeros(0, dtype=_DTYPES[name]) for name in TSV_HEADER}
    table = list(zip(*rows))
    return {name: np.asarray(col, dtype=_DTYPES[name]) for name, col in zip(TSV_HEADER, table)}


def read_tsv(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a certify.tsv into NumPy columns keyed by :data:`TSV_HEADER` (ints as int64, floats as float64).

    Read-only: a torn last line (a run still writing, or one that was killed) is ignored, not removed.
    Raises ValueError on a wrong header, a malformed row before the last, or a repeated idx.
    """
    data = Path(path).read_bytes()
    if b"\n" not in data:
        raise ValueError(f"{path}: no complete header line")
    rows, _, _ = _parse_tsv_bytes(data, str(path))
    return _columns(rows)


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
def _normalize_settings(settings: Mapping[str, Any]) -> dict:
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping, got {type(settings).__name__}")
    return json_ready(dict(settings))  # tuples become lists, NumPy scalars Python numbers: as read back


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _settings_diff(saved: dict, now: dict) -> List[str]:
    a, b = _flatten(saved), _flatten(now)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"  {key}: {a[key]!r} in the directory, absent now")
        elif key not in a:
            lines.append(f"  {key}: absent in the directory, {b[key]!r} now")
        elif a[key] != b[key] or isinstance(a[key], bool) != isinstance(b[key], bool):
            lines.append(f"  {key}: {a[key]!r} in the directory, {b[key]!r} now")
    return lines


# --------------------------------------------------------------------------------------------
# the log
# --------------------------------------------------------------------------------------------
class CertifyLog:
    """Resumable, crash-safe per-point log of one certification run in ``out_dir``.

    On open: creates ``out_dir``; takes an exclusive advisory lock (a second process on the same
    directory gets RuntimeError); writes ``settings.json`` or checks it against ``settings``
    (ValueError naming the differing keys if they differ); reads ``certify.tsv`` (created with its
    header if absent), truncating a torn last line; validates the header (ValueError).

    Attributes: ``done`` (set of finished idx), ``rows`` (list of :class:`CertifyRow` in file
    order), ``settings`` (as stored), ``repaired`` (description of a dropped torn line, or None).

    ``settings`` should hold everything that determines the rows (certification parameters,
    checkpoint identity, data split/subset, batch size where it changes the noise stream) and
    nothing that may legitimately change on a rerun (device, number of workers, ``max``). Values must be JSON serialisable.
    """

    def __init__(self, out_dir: PathLike, settings: Mapping[str, Any], *, lock: bool = True):
        self.out_dir = Path(out_dir)
        self.tsv_path = self.out_dir / TSV_NAME
        self.settings_path = self.out_dir / SETTINGS_NAME
        self.repaired: Optional[str] = None
        self._fd: Optional[int] = None
        self._lock: Optional[FileLock] = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if lock:
                self._acquire_lock()
            self.settings = self._check_settings(_normalize_settings(settings))
            self.rows: List[CertifyRow] = self._open_tsv()
            self.done = {r.idx for r in self.rows}
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        # thread_local=False: close() may run on another thread (e.g. the garbage collector's)
        lock = FileLock(self.out_dir / LOCK_NAME, timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise RuntimeError(
                f"the certification output directory {self.out_dir} is in use by another process"
            ) from None
        self._lock = lock

    def _check_settings(self, settings: dict) -> dict:
        if self.settings_path.exists():
            try:
                saved = json.loads(self.settings_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{self.settings_path} is not valid JSON ({exc})") from None
            diff = _settings_diff(saved, settings)
            if diff:
                raise ValueError(
                    f"the output directory {self.out_dir} holds results of different settings:\n"
                    + "\n".join(diff)
                    + "\nUse another output directory (--certify.out) for these settings, or rerun "
                    "with the settings above to resume."
                )
            return saved
        if self.tsv_path.exists() and self.tsv_path.stat().st_size > 0:
            raise ValueError(
                f"{self.tsv_path} exists but {self.settings_path} does not, so the settings that "
                "produced it are unknown; use another output directory (--certify.out)."
            )
        write_json_atomic(self.settings_path, settings)
        return settings

    def _open_tsv(self) -> List[CertifyRow]:
        fd = os.open(str(self.tsv_path), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._fd = fd
        with open(self.tsv_path, "rb") as fh:
            data = fh.read()
        rows, good, problem = _parse_tsv_bytes(data, str(self.tsv_path))
        if good < len(data):
            log.warning("%s: dropping %s", self.tsv_path, problem)
            self.repaired = problem
            os.ftruncate(fd, good)
            os.fsync(fd)
        if good == 0:  # new file, or a header torn by a kill: (re)write the header
            _write_all(fd, (_HEADER_LINE + "\n").encode())
            os.fsync(fd)
            fsync_dir(self.out_dir)
        return rows

    # -- writing ------------------------------------------------------------------------------
    def append(self, rows: Iterable[Any]) -> int:
        """Append finished rows (mappings keyed by TSV_HEADER, CertifyRow or sequences in TSV_HEADER's order).

        All rows are validated first (ValueError, nothing written, on a bad row or an idx that is
        already done or repeated); then they are written as one block of complete lines and
        fsync'ed. Returns the number of rows written.
        """
        if self._fd is None:
            raise ValueError("append() on a closed CertifyLog")
        batch = [_normalize_row(r) for r in rows]
        if not batch:
            return 0
        idx = [r.idx for r in batch]
        again = sorted(set(idx) & self.done)
        if again:
            raise ValueError(f"idx already in {self.tsv_path}: {again[:10]}")
        if len(set(idx)) != len(idx):
            raise ValueError("append(): the batch repeats an idx")
        data = "".join(format_row(r) for r in batch).encode("utf-8")
        _write_all(self._fd, data)
        os.fsync(self._fd)
        self.rows.extend(batch)
        self.done.update(idx)
        return len(batch)

    # -- reading ------------------------------------------------------------------------------
    def columns(self, only=None) -> Dict[str, np.ndarray]:
        """The rows so far as NumPy columns (like :func:`read_tsv`); ``only``: just these idx."""
        if only is None:
            return _columns(self.rows)
        keep = {int(i) for i in np.asarray(only).tolist()}
        return _columns([r for r in self.rows if r.idx in keep])

    def summarize(self, radii, num_classes: Optional[int] = None, only=None) -> dict:
        """:func:`lightning_idrs.statistics.summarize` of the rows so far (``only``: just these idx)."""
        from lightning_idrs.statistics import summarize_columns

        return summarize_columns(self.columns(only), radii, num_classes)

    def __len__(self) -> int:
        return len(self.rows)

    # -- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "CertifyLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
