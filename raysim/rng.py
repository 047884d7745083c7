"""Counter-based random draws keyed by (seed, purpose, ..., device id).

Every random decision in a run is a pure function of its key, never of the
order in which devices are visited or of which actor visits them. That is what
makes a run with 1 actor and a run with 4 actors report the same metrics, and
what lets a population of 10^6 devices be drawn lazily: device ``i``'s profile
is ``f(seed, i)``, computed when ``i`` is sampled and never stored.

The mixer is SplitMix64 (Steele et al., 2014), vectorised over numpy uint64
arrays; purposes are strings hashed with a stable hash (never Python's
``hash``, which changes between processes).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _part(value: int | str) -> int:
    if isinstance(value, str):
        return zlib.crc32(value.encode()) | (len(value) << 32)
    return int(value) & _MASK64


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int: the same function as :func:`_mix`."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key(seed: int, *parts: int | str) -> int:
    """A 64-bit key for (seed, *parts); equal inputs give equal keys."""
    k = _part(seed)
    for p in parts:
        k = _mix_int(k ^ _part(p))
    return k


def bits(seed: int, *parts: int | str, ids: np.ndarray) -> np.ndarray:
    """64 random bits per id, keyed by (seed, *parts, id)."""
    base = np.uint64(key(seed, *parts))
    return _mix(_mix(np.asarray(ids, dtype=np.uint64) ^ base))


def uniform(seed: int, *parts: int | str, ids: np.ndarray) -> np.ndarray:
    """Uniform draws in [0, 1), one per id, keyed by (seed, *parts, id)."""
    return (bits(seed, *parts, ids=ids) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, *parts: int | str, ids: np.ndarray) -> np.ndarray:
    """Standard normal draws, one per id (Box-Muller on two keyed uniforms)."""
    u1 = uniform(seed, *parts, "u1", ids=ids)
    u2 = uniform(seed, *parts, "u2", ids=ids)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def generator(seed: int, *parts: int | str) -> torch.Generator:
    """A torch CPU generator seeded by (seed, *parts)."""
    g = torch.Generator()
    g.manual_seed(key(seed, *parts) & ((1 << 63) - 1))
    return g


def torch_seed(seed: int, *parts: int | str) -> int:
    """A seed for ``torch.manual_seed`` keyed by (seed, *parts)."""
    return key(seed, *parts) & ((1 << 63) - 1)
