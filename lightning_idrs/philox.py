"""Philox4x32-10, the counter-based generator of certification's noise, and the standard normals it gives.

Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the Random123 library) maps a 128-bit counter and a 64-bit key to 128 random bits; for a fixed key it
is a bijection of the counters. Certification's noise (:class:`lightning_idrs.smoothing.PointNoise`)
draws every value from its own (key, counter):

* key = (point, seed): the point's index in the data set and the seed, one 32-bit word each;
* counter = (pair, sample, phase, 0): the pair of coordinates within the noise sample, the sample's
  index within its sampling phase, and the phase (0 selection, 1 estimation, 2 + k stage k of
  sequential estimation).

Both maps are injective, so two different noise values of a run come from two different (key,
counter) inputs, whatever the batching (docs/math.md, "The noise"). The four words of one call give
one pair of standard normals by the Box-Muller transform in float64, from 53-bit uniforms in (0, 1].

The integer part is exact on every device: torch int64 arithmetic whose products never exceed 2^49
(the 32 x 32-bit multiplication is split into 16-bit halves; signed overflow is undefined behaviour in
C++), and on CPU the same function in NumPy uint64 arithmetic, where the full 64-bit product is
defined and three times faster. On CUDA the torch function is compiled into one fused kernel
(:func:`torch.compile`), with the eager function as a fallback; on CPU the integers and the uniforms
are drawn in NumPy, normals included. The uniforms are exact, so they too are the same everywhere;
the float64 log, sqrt, cos and sin of the Box-Muller transform are NumPy's on CPU and CUDA's on a GPU,
so the noise of CPU and CUDA may differ in the last place of a float64 and, rarely, of a float32.
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["WORD", "box_muller", "normals", "philox4x32", "philox4x32_numpy", "standard_normal_pairs",
           "uniforms", "uniforms_numpy", "box_muller_numpy"]

#: Seeds, data set indices, sample indices and phases are 32-bit words of the key and the counter:
#: each must be in [0, WORD).
WORD = 2**32
_MASK = WORD - 1
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # and its Weyl key increments (Random123's PHILOX_W32_0/1)
_HALF = 2.0**-53


def _mulhilo(m: int, c: torch.Tensor):
    """(hi, lo) 32-bit words of m * c for a 32-bit constant m and int64 words c, no product above 2^49."""
    low = (c & 0xFFFF) * m  # < 2^48
    high = (c >> 16) * m  # < 2^48: m * c = high * 2^16 + low
    t = low + ((high & 0xFFFF) << 16)  # < 2^49
    return (high >> 16) + (t >> 32), t & _MASK


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding 32-bit words (broadcast together): counter
    (c0, c1, c2, c3), key (k0, k1) -> the four output words (Random123's philox4x32_R)."""
    for r in range(rounds):
        if r:  # the key schedule: a Weyl sequence
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_numpy(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """:func:`philox4x32` on NumPy uint64 arrays of 32-bit words: unsigned products of two words fit in 64 bits."""
    mask, shift = np.uint64(_MASK), np.uint64(32)
    m0, m1, w0, w1 = np.uint64(_M0), np.uint64(_M1), np.uint64(_W0), np.uint64(_W1)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def uniforms(w0, w1, w2, w3):
    """Two uniforms of 53 random bits from four 32-bit words (int64 tensors), exactly, in float64:
    u = (w0 * 2^21 + w1 // 2^11 + 1) / 2^53 on the 2^53 multiples of 2^-53 in (0, 1] (never 0), and
    t = (w2 * 2^21 + w3 // 2^11) / 2^53 on [0, 1)."""
    u = ((w0 << 21) + (w1 >> 11) + 1).to(torch.float64) * _HALF
    t = ((w2 << 21) + (w3 >> 11)).to(torch.float64) * _HALF
    return u, t


def uniforms_numpy(w0, w1, w2, w3, u: np.ndarray, t: np.ndarray) -> None:
    """:func:`uniforms` on NumPy uint64 words, into the float64 arrays ``u`` and ``t`` (the same numbers)."""
    np.multiply((w0 << np.uint64(21)) + (w1 >> np.uint64(11)) + np.uint64(1), _HALF, out=u)
    np.multiply((w2 << np.uint64(21)) + (w3 >> np.uint64(11)), _HALF, out=t)


def box_muller(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The pair sqrt(-2 log u) (cos 2 pi t, sin 2 pi t) [..., 2] of independent standard normals (float64).

    With u >= 2^-53 the radius is at most sqrt(106 log 2) = 8.57: the normal's tail beyond it, 2^-53
    per pair, is left out (docs/math.md, "The noise")."""
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = (2.0 * math.pi) * t
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


def box_muller_numpy(u: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    """:func:`box_muller` in NumPy, into the float64 array ``out`` [..., 2]."""
    radius = np.sqrt(-2.0 * np.log(u))
    angle = (2.0 * math.pi) * t
    np.multiply(radius, np.cos(angle), out=out[..., 0])
    np.multiply(radius, np.sin(angle), out=out[..., 1])


def standard_normal_pairs(w0, w1, w2, w3) -> torch.Tensor:
    """Four 32-bit words (int64 tensors) -> a pair of standard normals [..., 2] in float64
    (:func:`uniforms`, then :func:`box_muller`)."""
    return box_muller(*uniforms(w0, w1, w2, w3))


def _pairs_torch(point, seed, sample, phase, pair, dtype: torch.dtype) -> torch.Tensor:
    """Standard normals [rows, pairs, 2] for keys (point [rows, 1], seed) and counters (pair [1, pairs],
    sample [rows, 1], phase, 0): a pure function of tensors, no data-dependent control flow (compilable)."""
    zero = torch.zeros_like(phase)
    words = philox4x32(pair, sample, phase, zero, point, seed)
    return standard_normal_pairs(*words).to(dtype)


_compiled = {"function": None, "failed": False}


def _compiled_pairs(*args):
    """:func:`_pairs_torch` compiled (one fused kernel); the eager function, with one warning, if that fails."""
    if not _compiled["failed"]:
        try:
            if _compiled["function"] is None:
                _compiled["function"] = torch.compile(_pairs_torch, dynamic=True, fullgraph=True)
            return _compiled["function"](*args)
        except Exception as error:  # no compiler, no Triton, an unsupported GPU...: the same numbers, slower
            _compiled["failed"] = True
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"torch.compile of the noise generator failed ({reason[:200]}); drawing the noise "
                          "eagerly: the same values, more slowly", RuntimeWarning, stacklevel=3)
    return _pairs_torch(*args)


#: Philox calls per piece when the noise is drawn piece by piece: a piece's temporaries stay in the
#: CPU's cache (NumPy), or within a few hundred MB of GPU memory (eager torch).
_PIECE = {"cpu": 2**15, "eager": 2**22}


def normals(seed: int, points: torch.Tensor, phase: int, samples: torch.Tensor, shape, dtype: torch.dtype,
            compiled=None) -> torch.Tensor:
    """Noise [len(points), *shape] of ``dtype`` on ``points.device``: row b is sample ``samples[b]`` of
    phase ``phase`` of point ``points[b]`` under ``seed``, a function of these four numbers only.

    Coordinate 2q + e of a row (flattened) is element e of the pair of Philox4x32-10 call
    (key = (point, seed), counter = (q, sample, phase, 0)). The arguments must be in [0, 2^32); the
    caller checks them (:class:`lightning_idrs.smoothing.PointNoise`).

    ``compiled``: None (default) compiles on CUDA and draws eagerly elsewhere (in NumPy on CPU); True
    or False forces it (benchmarks, tests: torch's eager or compiled function on CPU). Every way gives
    the same integers and uniforms; the float64 log, sqrt, cos and sin are NumPy's or torch's.
    """
    device = points.device
    dim = math.prod(shape)
    num_pairs = -(-dim // 2)
    rows = len(points)
    if compiled is None:
        compiled = device.type == "cuda"
    if device.type == "cpu" and not compiled:
        return _normals_numpy(seed, points, phase, samples, num_pairs, dim, shape, dtype)
    point = points.to(torch.int64).reshape(-1, 1)
    sample = samples.to(device=device, dtype=torch.int64).reshape(-1, 1)
    seed_word = torch.tensor(seed, dtype=torch.int64, device=device)
    phase_word = torch.tensor(phase, dtype=torch.int64, device=device)
    pair = torch.arange(num_pairs, dtype=torch.int64, device=device).reshape(1, -1)
    if compiled:
        out = _compiled_pairs(point, seed_word, sample, phase_word, pair, dtype).reshape(rows, 2 * num_pairs)
    else:
        out = torch.empty((rows, 2 * num_pairs), dtype=dtype, device=device)
        step = max(1, _PIECE["eager"] // num_pairs)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            out[start:end] = _pairs_torch(point[start:end], seed_word, sample[start:end], phase_word, pair,
                                          dtype).reshape(end - start, -1)
    if 2 * num_pairs != dim:
        out = out[:, :dim]
    return out.reshape(rows, *shape)


def _normals_numpy(seed, points, phase, samples, num_pairs, dim, shape, dtype) -> torch.Tensor:
    """:func:`normals` on CPU, all in NumPy, piece by piece: each piece's arrays stay in cache, and the pieces
    are shared out over torch's number of threads (NumPy releases the GIL; no torch operation per piece)."""
    rows = len(points)
    point = points.numpy().astype(np.uint64).reshape(-1, 1)
    sample = samples.cpu().numpy().astype(np.uint64).reshape(-1, 1)
    pair = np.arange(num_pairs, dtype=np.uint64).reshape(1, -1)
    seed_word, phase_word, zero = np.uint64(seed), np.uint64(phase), np.uint64(0)
    out = np.empty((rows, num_pairs, 2))

    def piece(start: int) -> None:
        end = min(start + step, rows)
        words = philox4x32_numpy(pair, sample[start:end], phase_word, zero, point[start:end], seed_word)
        u, t = np.empty((end - start, num_pairs)), np.empty((end - start, num_pairs))
        uniforms_numpy(*words, u, t)
        box_muller_numpy(u, t, out[start:end])

    threads = torch.get_num_threads()
    step = max(1, min(_PIECE["cpu"] // num_pairs, -(-rows // threads)))
    starts = range(0, rows, step)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(piece, starts))
    else:
        for start in starts:
            piece(start)
    noise = out.reshape(rows, 2 * num_pairs)[:, :dim]
    if dtype in _NUMPY_DTYPES:  # NumPy's cast, the same rounding: no parallel torch operation for a small batch
        return torch.from_numpy(noise.astype(_NUMPY_DTYPES[dtype])).reshape(rows, *shape)
    return torch.from_numpy(noise).to(dtype).reshape(rows, *shape)


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}
