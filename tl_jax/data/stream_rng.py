"""Random numbers keyed by an example's position in the training stream, for a whole batch at once.

The random ops of a training batch (:meth:`tl_jax.data.Preprocess.on_batch`)
draw from a :class:`StreamRng` built for the positions ``kB .. kB+B-1`` of
batch ``k`` in the repeated, shuffled stream. Value ``j`` of the ``c``-th draw
is a hash of ``(seed, position_j, c)`` (SplitMix64's finaliser, a bijection of
64-bit words, applied twice), so

* an example's crop/flip depends on the seed, its stream position and the op
  only: not on the batch size, the process count (``data_sharding='batch'``
  cuts the same global stream into blocks: tl_jax/parallel/data.py) or how far
  an iterator has run (exact resume from ``{"next_index": k}``);
* a batch's draws are a few vectorised integer ops (microseconds), where one
  ``numpy.random.Generator`` per example cost ~5 us each.

It offers the two ``numpy.random.Generator`` methods the ops use,
``random(n)`` and ``integers(low, high)``, so an op takes either.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CALL = np.uint64(0xD1B54A32D192ED03)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class StreamRng:
    """Per-position draws for ``positions`` (int ``[B]``) under ``seed``; every call is a fresh draw."""

    def __init__(self, seed: int, positions: np.ndarray):
        with np.errstate(over="ignore"):
            self._key = _mix(np.asarray([int(seed) % 2**64], np.uint64))
        self._positions = np.asarray(positions).astype(np.uint64)
        self._calls = 0

    def random(self, size: int | None = None) -> np.ndarray:
        """Uniform float64 in ``[0, 1)``, one per position (53 random bits each)."""
        n = len(self._positions)
        if size is not None and size != n:
            raise ValueError(f"StreamRng draws one value per position ({n}), got size={size}")
        self._calls += 1
        with np.errstate(over="ignore"):
            z = _mix(self._key ^ _mix(self._positions * _GOLDEN + np.uint64(self._calls) * _CALL))
        return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def integers(self, low: int, high: np.ndarray | int) -> np.ndarray:
        """Uniform int64 in ``[low, high)`` (``high`` a scalar or one bound per position)."""
        high = np.broadcast_to(np.asarray(high, np.int64), self._positions.shape)
        return low + np.floor(self.random() * (high - low)).astype(np.int64)
