"""``DataSplit``: one split of one dataset, with random access and metadata.

Every data source ends up as one: tfds splits (embedded, catalogue or
prepared by ``tl-jax data prepare``: :mod:`tl_jax.data.sources`) and the
researcher's in-memory arrays or sequences (:mod:`tl_jax.data.in_memory`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataSplit:
    """One split of one dataset, with random access and metadata.

    Attributes:
      name: dataset name (``mnist5k``, ``cifar10``, ...).
      split: tfds split spec (``train``, ``test``, ``train[:90%]``, ...).
      source: ``len(source)``; ``source[i] -> {"image": uint8 HxWxC, "label": int}``.
      num_classes: number of classes of the label feature.
      image_shape: ``(H, W, C)`` of the stored images, or ``(L,)`` for token ids.
    """

    name: str
    split: str
    source: Any
    num_classes: int
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.source)

    @functools.cached_property
    def _labels(self) -> np.ndarray:
        if hasattr(self.source, "read_labels"):  # tfds splits: kept across the points of a sweep task
            return self.source.read_labels()
        return labels_of(self.source)

    def labels(self) -> np.ndarray:
        """All labels, int64 ``[len(self)]`` (read once, then cached; read-only)."""
        return self._labels

    def __repr__(self) -> str:
        return (
            f"DataSplit({self.name}:{self.split}, n={len(self)}, "
            f"num_classes={self.num_classes}, image_shape={self.image_shape})"
        )


def wrap_index(index: int, n: int) -> int:
    """``index`` in ``[-n, n)`` as a position in ``[0, n)`` (Python's negative indexing); IndexError otherwise."""
    index = int(index)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} examples")
    return index % n


def labels_of(source: Any) -> np.ndarray:
    """Every example's ``label`` of ``source`` (``len`` and ``[i]``), int64 ``[len(source)]``, read-only."""
    labels = np.fromiter((source[i]["label"] for i in range(len(source))), dtype=np.int64, count=len(source))
    labels.flags.writeable = False
    return labels
