"""Few-shot subsets: exactly ``shots`` examples of every class present."""

from __future__ import annotations

import numpy as np


def sample_shots(
    labels: np.ndarray, shots: int, seed: int, *, name: str | None = None
) -> np.ndarray:
    """Returns indices of exactly ``shots`` examples per class present in ``labels``.

    Args:
      labels: integer class ids, shape ``[N]`` (e.g. ``DataSplit.labels()``).
      shots: examples per class, ``>= 1``.
      seed: the choice is a pure function of ``(labels, shots, seed)``. Each class
        ``c`` is drawn from its own ``np.random.default_rng([seed, c])`` as the
        first ``shots`` of a permutation of its indices, so a class's picks do
        not depend on the other classes, and for a fixed seed the ``k``-shot set
        is contained in the ``k+1``-shot set.
      name: dataset/split for error messages (e.g. ``"mnist5k:train"``).

    Returns:
      int64 ``[num_classes_present * shots]``, sorted ascending.

    Raises:
      ValueError: ``shots < 1``, labels not 1-D integers, or a class with fewer
        than ``shots`` examples (the message names the class and its count).
    """
    where = f" in {name}" if name else ""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels{where} must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an int >= 1, got {shots!r}")
    if labels.size == 0:
        raise ValueError(f"no labels{where} to sample shots from")
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    if counts[smallest] < shots:
        raise ValueError(
            f"shots={shots} but class {int(classes[smallest])} has only "
            f"{int(counts[smallest])} examples{where}"
        )
    order = np.argsort(labels, kind="stable")  # indices grouped by class, ascending
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picked = []
    for c, start, count in zip(classes, starts, counts, strict=True):
        members = order[start : start + count]
        rng = np.random.default_rng([int(seed) % 2**63, int(c) % 2**63])
        picked.append(members[rng.permutation(count)[:shots]])
    return np.sort(np.concatenate(picked)).astype(np.int64)
