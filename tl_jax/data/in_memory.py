"""Your own data in memory: numpy arrays, a grain ``MapDataset`` or any random-access sequence.

A split is given as one of

* a dict of equally long arrays with ``label`` (int ``[N]``) and the model
  input: ``image`` (``[N, H, W, C]`` or ``[N, H, W]``, any dtype the
  preprocessing ops take) or ``input_ids`` (``[N, L]``, with an optional
  ``attention_mask``); other integer columns are kept (e.g. extra label fields);
* a grain ``MapDataset`` or any sequence with ``len`` and ``[i]`` returning
  such example dicts (one example's arrays, ``label`` an int).

:func:`register_dataset` names a set of splits for this process, so
``config.data.name = NAME`` trains, evaluates, samples shots, caches and
resumes exactly as tfds data does (the same :class:`~tl_jax.data.split.DataSplit`
goes through the same grain pipeline). For other processes (the CLI, sweep
jobs, ``tl-jax eval``) name a function instead: ``config.data.name =
'path/to/file.py:load'`` (or ``package.module:load``), where ``load()``
returns ``{"train": ..., "test": ...}`` in any of the forms above; it is
called once per process.

The class count is the largest label over all splits + 1 unless given.
Arrays are not copied: a split holds read-only views of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tl_jax.util import references
from tl_jax.data.builders import EMBEDDED  # names that must keep meaning the embedded data
from tl_jax.data.cache import ArraySource
from tl_jax.data.split import DataSplit, labels_of, wrap_index

INPUT_KEYS = ("image", "input_ids")
_REGISTRY: dict[str, dict[str, DataSplit]] = {}
_BY_REFERENCE: dict[str, dict[str, DataSplit]] = {}


class SequenceSource:
    """``src[i] -> example dict`` over a user's sequence (labels as ``int``; 2-D images get a channel axis)."""

    def __init__(self, sequence: Sequence, where: str):
        self._seq = sequence
        self._len = len(sequence)
        self.where = where

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = wrap_index(index, self._len)
        ex = self._seq[index]
        if not isinstance(ex, Mapping) or "label" not in ex:
            raise ValueError(f"{self.where}[{index}] must be a dict with 'label', got "
                             f"{sorted(ex) if isinstance(ex, Mapping) else type(ex).__name__}")
        out = {k: np.asarray(v) for k, v in ex.items()}
        out["label"] = int(out["label"])
        if "image" in out and out["image"].ndim == 2:
            out["image"] = out["image"][..., None]
        return out

    def __repr__(self) -> str:
        return f"SequenceSource(len={self._len}, {type(self._seq).__name__})"


def _input_key(keys: Any, where: str) -> str:
    found = [k for k in INPUT_KEYS if k in keys]
    if not found:
        raise ValueError(f"{where} has no model input: it needs 'image' or 'input_ids' (and 'label'); "
                         f"it has {sorted(keys)}")
    return found[0]


def _array_source(arrays: Mapping[str, Any], where: str) -> tuple[ArraySource, np.ndarray]:
    if "label" not in arrays:
        raise ValueError(f"{where} has no 'label' array; it has {sorted(arrays)}")
    key = _input_key(arrays, where)
    cols = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (len(v) if v.ndim else 0) for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: arrays must be equally long (one row per example), got lengths {lengths}")
    labels = cols["label"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}['label'] must be integer class ids [N], got {labels.dtype} {labels.shape}")
    if key == "image" and cols[key].ndim == 3:
        cols[key] = cols[key][..., None]  # [N, H, W] -> [N, H, W, 1]
    if key == "image" and cols[key].ndim != 4:
        raise ValueError(f"{where}['image'] must be [N, H, W, C] or [N, H, W], got shape {cols[key].shape}")
    views = {k: v.view() for k, v in cols.items()}  # ArraySource makes its arrays read-only: not the user's
    return ArraySource(views), labels


def as_split(name: str, split: str, data: Any, num_classes: int | None = None) -> DataSplit:
    """One :class:`DataSplit` from arrays or a sequence of examples (see the module doc)."""
    where = f"dataset {name!r} split {split!r}"
    if isinstance(data, Mapping):
        source, labels = _array_source(data, where)
        key = _input_key(data, where)
        shape = tuple(source.arrays[key].shape[1:])
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        source = SequenceSource(data, where)
        if len(source) == 0:
            raise ValueError(f"{where} is empty")
        first = source[0]
        shape = tuple(first[_input_key(first, where)].shape)
        labels = labels_of(source)
    else:
        raise ValueError(f"{where} must be a dict of arrays, a grain MapDataset or a sequence of example dicts, "
                         f"got {type(data).__name__}")
    if len(labels) == 0:
        raise ValueError(f"{where} is empty")
    if labels.min() < 0:
        raise ValueError(f"{where}: labels must be class ids >= 0, got {int(labels.min())}")
    n = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= n:
        raise ValueError(f"{where}: label {int(labels.max())} >= num_classes={n}")
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    out = DataSplit(name, split, source, n, shape)
    object.__setattr__(out, "_labels", labels)  # known already: no second read
    return out


def make_splits(name: str, splits: Mapping[str, Any], num_classes: int | None = None) -> dict[str, DataSplit]:
    """``{split: DataSplit}`` with one class count for all (largest label + 1 unless given)."""
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"dataset {name!r}: expected a dict of splits such as {{'train': ..., 'test': ...}}, "
                         f"got {type(splits).__name__}")
    out = {k: as_split(name, k, v, num_classes) for k, v in splits.items()}
    n = max(s.num_classes for s in out.values())
    for k, s in out.items():
        if s.num_classes != n:  # a split without the last classes: the dataset's count
            out[k] = dataclasses.replace(s, num_classes=n)
            object.__setattr__(out[k], "_labels", s.labels())
    return out


def register_dataset(name: str, splits: Mapping[str, Any] | None = None, *, num_classes: int | None = None,
                     overwrite: bool = True, **named_splits: Any) -> dict[str, DataSplit]:
    """Make ``config.data.name = name`` read these splits in this process.

    ``register_dataset("my_data", train={"image": x, "label": y}, test=...)``
    (or ``splits={"train": ..., ...}``). Re-registering a name replaces it.

    Raises:
        ValueError: a name of the embedded datasets or with ':', bad arrays (named by split and key).
    """
    if not isinstance(name, str) or not name or references.is_reference(name) or name in EMBEDDED:
        raise ValueError(f"in-memory dataset name must be a non-empty string without ':' and not one of "
                         f"{sorted(EMBEDDED)}, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"in-memory dataset {name!r} is already registered")
    _REGISTRY[name] = make_splits(name, {**dict(splits or {}), **named_splits}, num_classes)
    return _REGISTRY[name]


def unregister_dataset(name: str) -> None:
    _REGISTRY.pop(name, None)


def is_in_memory(name: str) -> bool:
    """Whether ``load_split`` reads ``name`` from memory (registered here, or a reference)."""
    return name in _REGISTRY or references.is_reference(name)


def load_in_memory(name: str, split: str) -> DataSplit:
    """The split ``split`` of a registered dataset or of ``reference()``'s splits."""
    if name in _REGISTRY:
        splits = _REGISTRY[name]
    else:
        if name not in _BY_REFERENCE:
            fn = references.resolve(name, "config.data.name")
            try:
                data = fn()
            except Exception as e:  # noqa: BLE001 - the user's loader: its message, one line
                raise ValueError(f"config.data.name={name!r}: the loader raised {type(e).__name__}: {e}") from None
            _BY_REFERENCE[name] = make_splits(name, data)
        splits = _BY_REFERENCE[name]
    if split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits: {sorted(splits)}")
    return splits[split]
