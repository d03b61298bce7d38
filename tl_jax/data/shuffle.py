"""A global per-epoch shuffle for grain ``MapDataset`` chains that is fast for small datasets.

grain's ``MapDataset.shuffle`` computes each position with ``index_shuffle``
(a Feistel permutation with cycle walking), whose cost per element grows as
the dataset shrinks (cycle walking over a power-of-two domain), to
milliseconds per element for a 10-example few-shot set, which would then spend
most of its input pipeline time choosing the order.

:class:`EpochShuffle` draws a whole epoch's permutation at once
(``numpy.random.Generator.permutation`` seeded by ``(seed, epoch)``), keeps the
last few epochs' permutations, and otherwise behaves like grain's
shuffle: position ``k`` of the infinite index space is element
``perm[epoch][k mod n]`` of epoch ``epoch = k // n``, so it is random access,
deterministic in ``seed``, reshuffled every epoch, and a grain iterator over
it keeps the plain ``{"next_index": k}`` state (exact resume).
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tl_jax.data.preprocess import Preprocess, stack_examples
from tl_jax.data.stream_rng import StreamRng

_KEEP_EPOCHS = 4


class EpochShuffle(grain.MapDataset):
    """``parent`` (length ``n``) in a new random order every epoch; use before ``repeat()``."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._n = len(parent)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_perms"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: ``perm[i]`` is the parent index at position ``i``."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, int(epoch)]))
            perm = rng.permutation(self._n)
            with self._lock:
                self._perms[epoch] = perm
                while len(self._perms) > _KEEP_EPOCHS:
                    self._perms.pop(min(self._perms))
        return perm

    def _parent_index(self, index: int) -> int:
        epoch, i = divmod(int(index), self._n)
        return int(self.permutation(epoch)[i]) + epoch * self._n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]) -> Sequence[Any]:
        return self._parent._getitems([self._parent_index(i) for i in indices])  # noqa: SLF001


class _Root(grain.MapDataset):
    """A random-access source as the root of a chain, without grain's per-read source monitoring."""

    def __init__(self, source: Any):
        super().__init__()
        self._source = source
        self._n = len(source)

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"Root({type(self._source).__name__})"

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        return self._source[int(index) % self._n]


_CHUNK_BYTES = 4 * 2**20  # rows gathered (and augmented) together: bounded host memory per chunk
_MAX_CHUNK = 16


class GatherBatches(grain.MapDataset):
    """Batch ``k`` of rows stacked in memory (then ``suffix``), made ``chunk`` batches at a time.

    Equal to the per-example chain of :func:`train_chain` over the same rows
    (same shuffle, same positions ``kB .. kB+B-1`` of the repeated stream, rows
    stacked in that order, the suffix's draws keyed by position). A demo batch
    is 64 small images, where numpy's per-call costs dominate: the rows of
    ``chunk`` consecutive batches are gathered with one fancy index per key and
    the suffix runs once over them (draws keyed by position make that the same
    as batch by batch), so the host spends a fraction of the time per batch.
    ``chunk``: as many batches as fit in 4 MiB (at most 16; 1 for big batches).
    ``start``, ``step`` (:meth:`strided`): batch ``k`` is batch ``start + k * step``
    of the stream, and a chunk holds ``chunk`` of those batches only.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
                 suffix: Preprocess | None = None, chunk: int | None = None, start: int = 0, step: int = 1):
        super().__init__()
        if step < 1 or not 0 <= start < step:
            raise ValueError(f"GatherBatches: need 0 <= start < step, got start={start}, step={step}")
        self._arrays = arrays
        self._n = len(next(iter(arrays.values())))
        self._batch = int(batch_size)
        self._seed = int(seed)
        self._suffix = suffix if suffix is not None and suffix.ops else None
        row_bytes = sum(v[:1].nbytes for v in arrays.values())
        self._chunk = int(chunk or max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(1, row_bytes * self._batch))))
        self._start, self._step = int(start), int(step)  # batch k here is batch start + k * step of the stream
        self._order = EpochShuffle(grain.MapDataset.range(self._n), seed=seed)
        self._made: tuple[int, dict] | None = None  # (chunk index, its rows)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize // self._batch  # as grain's batch of an infinitely repeated dataset

    def __str__(self) -> str:
        strided = f", start={self._start}, step={self._step}" if self._step > 1 else ""
        return f"GatherBatches(batch_size={self._batch}, chunk={self._chunk}{strided})"

    def strided(self, start: int, step: int) -> GatherBatches:
        """Batches ``start, start + step, ...`` of this stream (``self[start::step]``), made ``chunk`` of *them*
        at a time: a process of ``config.parallel.data_sharding='batch'`` builds only its own blocks."""
        if self._step != 1:
            raise ValueError("GatherBatches.strided: already strided")
        return type(self)(self._arrays, batch_size=self._batch, seed=self._seed, suffix=self._suffix,
                          chunk=self._chunk, start=start, step=step)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_made"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def row_indices(self, positions: np.ndarray) -> np.ndarray:
        """Indices into the stacked rows of these positions of the repeated, shuffled stream (int64)."""
        epochs, within = np.divmod(positions, self._n)
        rows = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            rows[sel] = self._order.permutation(int(epoch))[within[sel]]
        return rows

    def rows(self, positions: np.ndarray) -> dict:
        """The rows at these positions of the repeated, shuffled stream, suffix applied."""
        rows = self.row_indices(positions)
        out = {k: v[rows] for k, v in self._arrays.items()}
        if "label" in out:
            out["label"] = out["label"].astype(np.int32, copy=False)
        if self._suffix is not None:
            out = self._suffix.on_batch(out, StreamRng(self._seed, positions) if self._suffix.is_random else None)
        return out

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        c, i = divmod(int(index), self._chunk)
        with self._lock:
            made = self._made
            if made is None or made[0] != c:
                blocks = self._start + self._step * np.arange(c * self._chunk, (c + 1) * self._chunk)
                positions = (blocks[:, None] * self._batch + np.arange(self._batch)).ravel()
                made = self._made = (c, self.rows(positions))
        lo = i * self._batch
        return {k: v[lo : lo + self._batch] for k, v in made[1].items()}


def train_chain(source: Any, preprocess: Preprocess | None, *, batch_size: int, seed: int) -> grain.MapDataset:
    """The training chain ``source -> shuffle -> repeat -> prefix -> batch -> suffix``.

    ``preprocess`` is split at its first random op (:meth:`Preprocess.split`):
    the deterministic prefix runs per example, the suffix (the random ops and
    what follows them) once per batch (:meth:`Preprocess.on_batch`), drawing
    from a :class:`~tl_jax.data.stream_rng.StreamRng` of the batch's stream
    positions: an example's augmentation depends on ``seed`` and its position
    only, whatever the batch size.
    Shared by :func:`tl_jax.data.pipeline.train_dataset` and the caches
    (:mod:`tl_jax.data.cache`): a ``source`` holding its rows stacked already
    (``source.arrays``, e.g. the cached prefix output) with a ``preprocess``
    that has no prefix (or ``None``: the rows as they are) is read by
    :class:`GatherBatches` instead, with the same order, the same batches and
    the same iterator state (``{"next_index": k}``, the batch index).
    Batches drop the remainder.
    """
    prefix, suffix = preprocess.split() if preprocess is not None else (None, None)
    arrays = getattr(source, "arrays", None)
    if arrays is not None and (prefix is None or not prefix.ops):
        return GatherBatches(arrays, batch_size=batch_size, seed=seed, suffix=suffix)
    else:
        ds = EpochShuffle(_Root(source), seed=int(seed)).repeat()
        if prefix is not None:
            ds = ds.map(prefix)
        ds = ds.batch(batch_size, drop_remainder=True, batch_fn=stack_examples)
    if suffix is not None and suffix.ops:
        ds = ds.map_with_index(_BatchOps(suffix, batch_size=batch_size, seed=seed))
    return ds


class _BatchOps:
    """``(k, batch) -> suffix.on_batch(batch, StreamRng(seed, positions kB .. kB+B-1))`` (picklable)."""

    def __init__(self, suffix: Preprocess, *, batch_size: int, seed: int):
        self.suffix, self.batch_size, self.seed = suffix, int(batch_size), int(seed)

    def __call__(self, index: int, batch: dict) -> dict:
        if not self.suffix.is_random:
            return self.suffix.on_batch(batch)
        start = int(index) * self.batch_size
        return self.suffix.on_batch(batch, StreamRng(self.seed, np.arange(start, start + self.batch_size)))


def read_threads() -> int:
    """grain read threads for a training iterator: 0 (the loop's prefetch thread does the work) on
    machines of <= 2 cores, where more threads only contend for the GIL and the cores; else cores - 2."""
    return max(0, min(16, (os.cpu_count() or 1) - 2))


def train_iterator(dataset: Any) -> Any:
    """``iter(dataset)`` with :func:`read_threads` threads (a grain iterator with get/set_state)."""
    if isinstance(dataset, grain.MapDataset):
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads())))
    return iter(dataset)
