"""In-memory cache of the deterministic prefix of a preprocessing chain (``config.data.cache``).

A training pipeline reads every example of a small dataset once per epoch and
runs the same deterministic ops on it every time (``rescale``, ``resize``,
``pad``, ``normalize``, ...): for a small model, redoing them (and the
per-read decoding) every epoch can cost the host more than the train step
(grain's shuffle of a few-shot subset more still, see :mod:`tl_jax.data.shuffle`).
:func:`materialize` runs the ops *before the first random op* (the
deterministic prefix) once over this process's training examples and keeps the
results as one numpy array; the pipeline then gathers whole batches of rows of
that array (:class:`tl_jax.data.shuffle.GatherBatches`) and applies only the
remaining ops (the random suffix: ``random_crop``, ``flip_lr`` and what follows
them) once per batch.

Both pipelines are built by one function (:func:`tl_jax.data.shuffle.train_chain`:
``source -> shuffle -> repeat -> prefix -> batch -> suffix``), so the shuffle
order, the random draws (per batch index) and the iterator state
(``{"next_index": k}``) are the same: batches are identical to the uncached
pipeline's, and a checkpointed iterator state resumes either of them on the
exact next batch.

``config.data.cache``: ``'auto'`` (default) caches when the prefix output of
this process's examples fits in ``config.data.cache_max_mb``; ``True`` caches
or raises if it does not fit; ``False`` never caches.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tl_jax.data.preprocess import Preprocess
from tl_jax.data.shuffle import train_chain

log = logging.getLogger("tl_jax")
MODES = ("auto", True, False)
_READ_THREADS = 8


def check_mode(mode: Any, where: str = "config.data.cache") -> None:
    """Raise ``ValueError`` unless ``mode`` is ``'auto'``, ``True`` or ``False``."""
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"{where} must be 'auto', true or false, got {mode!r}")


def split_preprocess(preprocess: Preprocess) -> tuple[Preprocess, Preprocess]:
    """``(prefix, suffix)`` of :meth:`Preprocess.split`: the prefix is what the cache holds."""
    return preprocess.split()


class ArraySource:
    """Random access to rows of in-memory arrays: ``src[i] -> {key: arrays[key][i]}``.

    ``label`` rows come back as ``np.int32`` scalars, as :class:`Preprocess`
    returns them; every other row is a read-only view into the cache.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"cached arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
        self.arrays = arrays
        for value in arrays.values():
            value.flags.writeable = False
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        out = {k: v[index] for k, v in self.arrays.items()}
        if "label" in out:
            out["label"] = np.int32(out["label"])
        return out

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.arrays.values())

    def __repr__(self) -> str:
        shapes = {k: (v.shape, str(v.dtype)) for k, v in self.arrays.items()}
        return f"ArraySource(len={self._len}, {shapes}, {self.nbytes / 2**20:.1f} MiB)"


class _ShapeMismatch(ValueError):
    """Two examples' outputs differ in shape (variable-size images): nothing to stack."""


def materialize(source: Sequence, preprocess: Preprocess, *, max_bytes: int,
                required: bool = False) -> ArraySource | None:
    """Run ``preprocess`` (deterministic) once over ``source``; ``None`` if it cannot be cached.

    The size is estimated from the first example before anything else is read:
    more than ``max_bytes`` gives ``None`` (or ``ValueError`` if ``required``),
    as do examples whose outputs differ in shape (variable-size images).
    """
    if preprocess.is_random:
        raise ValueError(f"{preprocess.where}: only the deterministic prefix of a preprocessing chain is cached")
    n = len(source)
    if n == 0:
        return None
    first = preprocess(source[0])
    per_example = sum(np.asarray(v).nbytes for v in first.values())
    if n * per_example > max_bytes:
        msg = (f"config.data.cache: {n} examples x {per_example:,} B = {n * per_example / 2**20:.1f} MiB exceed "
               f"config.data.cache_max_mb={max_bytes / 2**20:.0f}")
        if required:
            raise ValueError(msg + "; raise the limit or set config.data.cache='auto' / false")
        log.info("%s: not caching", msg)
        return None
    t0 = time.perf_counter()
    arrays = {k: np.empty((n, *np.shape(v)), np.asarray(v).dtype) for k, v in first.items()}

    def fill(rows: range) -> None:
        for i in rows:
            example = first if i == 0 else preprocess(source[i])
            for k, arr in arrays.items():
                value = np.asarray(example[k])
                if value.shape != arr.shape[1:]:
                    raise _ShapeMismatch(f"{k!r} of example {i} is {value.shape}, example 0's is {arr.shape[1:]}")
                arr[i] = value

    chunk = max(1, -(-n // (4 * _READ_THREADS)))
    try:  # reads (array_record, decoding) mostly release the GIL: a few threads help
        with concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="tl_jax-cache") as pool:
            list(pool.map(fill, [range(a, min(a + chunk, n)) for a in range(0, n, chunk)]))
    except _ShapeMismatch as e:
        if required:
            raise ValueError(f"config.data.cache=true needs same-shape examples: {e}") from None
        log.info("config.data.cache: examples differ in shape (%s): not caching", e)
        return None
    cached = ArraySource(arrays)
    log.info("config.data.cache: %d examples (%.1f MiB) after ops %s in %.2f s", n, cached.nbytes / 2**20,
             list(preprocess.op_names), time.perf_counter() - t0)
    return cached


def cached_chain(source: Any, preprocess: Preprocess, *, mode: Any, max_bytes: int
                 ) -> tuple[Any, Any] | None:
    """``(cached source, per-example rest)`` to use instead of ``(source, preprocess)``, or ``None``.

    ``mode`` is ``config.data.cache``. Text examples (no images) and chains that
    start with a random op have nothing to cache beyond the raw reads, which
    are cached too (an empty prefix).
    """
    check_mode(mode)
    if mode is False:
        return None
    prefix, suffix = split_preprocess(preprocess)
    try:
        cached = materialize(source, prefix, max_bytes=max_bytes, required=mode is True)
    except ValueError:
        if mode is True:
            raise
        return None
    if cached is None:
        return None
    return cached, suffix


def array_dataset(arrays: dict[str, np.ndarray] | ArraySource, *, batch_size: int, seed: int,
                  preprocess: Any = None) -> grain.MapDataset:
    """Infinite shuffled batches of rows of ``arrays``, chained like ``pipeline.train_dataset``.

    Same seed and same number of rows give the same order of rows as
    ``train_dataset`` over the same examples (same grain chain), e.g. batches
    of cached backbone features in the order of the image batches.
    """
    source = arrays if isinstance(arrays, ArraySource) else ArraySource(arrays)
    return train_chain(source, preprocess, batch_size=batch_size, seed=seed)
