"""Input pipelines: infinite shuffled training batches (grain) and exact eval batches.

Batches are dicts of numpy arrays: ``image`` float32 ``[B, H, W, C]``, ``label``
int32 ``[B]`` (and ``mask`` float32 ``[B]`` for eval). ``B`` is the per-process
batch size; sharding across processes is strided: process ``p`` of ``P`` owns
examples ``p, p + P, p + 2P, ...`` of the (optionally shot-restricted) split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from tl_jax.data import cache as data_cache
from tl_jax.data.preprocess import RANDOM_OPS, Preprocess
from tl_jax.data.shuffle import train_chain
from tl_jax.data.sources import DataSplit


class _Subset:
    """Random-access view ``source[indices[i]]`` (picklable, for grain)."""

    def __init__(self, source: Any, indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._indices[index])]


def _check_processes(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} / {process_count}"
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def train_dataset(
    split: DataSplit,
    preprocess: Preprocess,
    *,
    batch_size: int,
    seed: int,
    indices: np.ndarray | None = None,
    process_index: int = 0,
    process_count: int = 1,
    cache: Any = False,
    cache_max_mb: float = 1024.0,
) -> grain.MapDataset:
    """Infinite training batches: subset -> shard -> shuffle -> repeat -> pp -> batch.

    Args:
      split: the data.
      preprocess: applied per example (``random_map`` if ``preprocess.is_random``).
      batch_size: per-process batch size ``B``; incomplete batches are never
        produced (``drop_remainder``), and since repeat comes before batch a
        shard smaller than ``B`` still gives full batches (examples repeat).
      seed: shuffle order (reshuffled every epoch; :mod:`tl_jax.data.shuffle`)
        and random-op draws depend only on ``seed`` and the element position,
        so same seed -> same batches.
      indices: restrict to these split indices first (e.g. ``sample_shots``).
      process_index, process_count: strided shard ``indices[p::P]``.
      cache: ``config.data.cache`` (``'auto'`` | True | False): keep the output
        of the deterministic ops before the first random op in memory (at
        most ``cache_max_mb``) and run only the rest per example; same batches
        and iterator states as uncached (:mod:`tl_jax.data.cache`).

    Returns:
      An infinite ``grain.MapDataset`` of ``{"image": f32 [B,H,W,C], "label":
      i32 [B]}``. ``iter(ds)`` gives a grain ``DatasetIterator`` with
      ``get_state()`` / ``set_state()`` (a small dict, ``{"next_index": k}``)
      that resumes on the exact next batch. ``iter(ds)`` uses grain's default
      ``ReadOptions`` (16 threads, 500-element prefetch buffer), whose threads
      contend for the GIL and the cores on a small machine: the loop uses
      ``tl_jax.data.shuffle.train_iterator(ds)`` (threads sized to the
      machine). ``ds[i]`` is random access to batch ``i``.
    """
    _check_batch_size(batch_size)
    _check_processes(process_index, process_count)
    n = len(split)
    if indices is None:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"indices out of range for {split.name}:{split.split} ({n} examples)")
    idx = idx[process_index::process_count]
    if idx.size == 0:
        raise ValueError(
            f"process {process_index}/{process_count} has no training examples of "
            f"{split.name}:{split.split} ({n} examples, {0 if indices is None else len(indices)} "
            "indices given)"
        )
    source: Any = _Subset(split.source, idx)
    cached = data_cache.cached_chain(source, preprocess, mode=cache, max_bytes=int(cache_max_mb * 2**20))
    if cached is not None:
        source, preprocess = cached  # same chain below: same batches, same iterator states
    return train_chain(source, preprocess, batch_size=batch_size, seed=seed)


def num_eval_batches(n: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields for ``n`` examples: ``ceil(ceil(n / P) / B)``."""
    _check_batch_size(batch_size)
    _check_processes(0, process_count)
    return math.ceil(math.ceil(n / process_count) / batch_size)


def eval_batches(
    split: DataSplit,
    preprocess: Preprocess,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """The whole split once, in order, as masked fixed-size batches.

    Process ``p`` owns examples ``p, p + P, ...`` (strided) in ascending order;
    every process yields exactly ``num_eval_batches(len(split), B, P)`` batches
    of ``{"image": f32 [B,H,W,C], "label": i32 [B], "mask": f32 [B]}`` (plus
    any other key the preprocess returns, e.g. ``domain`` i32 [B]; text splits
    give ``input_ids`` / ``attention_mask`` i32 [B, L] instead of ``image``). Padding
    rows (end of the last batch, or whole batches for a process with fewer
    examples) are zeros with ``mask == 0``; real rows have ``mask == 1``. The
    union over processes of the rows with ``mask == 1`` is the split, once.

    Raises:
      ValueError: if ``preprocess`` has random ops (eval must be deterministic).
    """
    _check_batch_size(batch_size)
    _check_processes(process_index, process_count)
    if preprocess.is_random:
        raise ValueError(
            f"{preprocess.where} is used for eval but has random ops "
            f"{[o for o in preprocess.op_names if o in RANDOM_OPS]}; use deterministic "
            "ops (e.g. center_crop instead of random_crop, no flip_lr)"
        )
    key = _eval_key(split, preprocess, batch_size, process_index, process_count)
    if key is not None and key in _EVAL_KEPT:
        return (dict(b) for b in _EVAL_KEPT[key])
    batches = _eval_iterator(split, preprocess, batch_size, process_index, process_count)
    return batches if key is None else _keep(key, batches)


# eval_batches of tfds splits, kept for the process: every eval of a run and every point of a sweep task
# evaluates the same test split through the same ops. Batches are read-only; at most EVAL_KEEP_BYTES in all.
_EVAL_KEPT: dict[tuple, list[dict]] = {}
EVAL_KEEP_BYTES = 256 * 2**20


def _eval_key(split: DataSplit, preprocess: Preprocess, *args: int) -> tuple | None:
    """What the batches are a function of: the split's files (``ExampleSource._files_key``), the extra label
    fields, the ops with their parameters, batch size and process; None for other sources."""
    files_key = getattr(split.source, "_files_key", None)
    files = files_key() if files_key is not None else None
    if files is None:
        return None
    ops = tuple((op.name, repr(sorted(op.params.items()))) for op in preprocess.ops)
    return files, tuple(getattr(split.source, "label_fields", ())), ops, args


def _keep(key: tuple, batches: Iterator[dict]) -> Iterator[dict]:
    """``batches`` as they come (made read-only), kept in :data:`_EVAL_KEPT` once all were read if they fit
    in :data:`EVAL_KEEP_BYTES`; the oldest kept splits make room."""
    kept: list[dict] | None = []
    size = 0
    for batch in batches:
        for a in batch.values():
            a.flags.writeable = False
        size += sum(a.nbytes for a in batch.values())
        if kept is not None:
            kept = kept + [batch] if size <= EVAL_KEEP_BYTES else None
        yield dict(batch)
    if kept is None:
        return
    nbytes = lambda bs: sum(a.nbytes for b in bs for a in b.values())  # noqa: E731
    while _EVAL_KEPT and nbytes(kept) + sum(nbytes(bs) for bs in _EVAL_KEPT.values()) > EVAL_KEEP_BYTES:
        del _EVAL_KEPT[next(iter(_EVAL_KEPT))]
    _EVAL_KEPT[key] = kept


def _eval_iterator(
    split: DataSplit, preprocess: Preprocess, batch_size: int, p: int, num_p: int
) -> Iterator[dict]:
    n = len(split)
    mine = np.arange(p, n, num_p)
    first = preprocess(split.source[0])  # shapes and dtypes for all-padding batches
    # Every key the preprocess emits is batched: ``image`` (f32), or ``input_ids`` + ``attention_mask``
    # (i32) for text, and extras such as a per-example ``domain`` id (0 in padding).
    template = {k: np.asarray(v) for k, v in first.items() if k != "label"}
    for b in range(num_eval_batches(n, batch_size, num_p)):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        label = np.zeros((batch_size,), np.int32)
        mask = np.zeros((batch_size,), np.float32)
        arrays = {k: np.zeros((batch_size, *v.shape), v.dtype) for k, v in template.items()}
        for j, i in enumerate(rows):
            ex = preprocess(split.source[int(i)])
            label[j] = ex["label"]
            for k in arrays:
                arrays[k][j] = ex[k]
        mask[: len(rows)] = 1.0
        yield {**arrays, "label": label, "mask": mask}
