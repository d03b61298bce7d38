"""Input checks shared by the transferability scores: one-line ``ValueError``s naming what to fix."""
from __future__ import annotations

import numpy as np


def check_labels(labels, name: str, score: str, n: int | None = None, min_classes: int = 2) -> np.ndarray:
    """``labels`` as int64 ``[N]``; raises unless 1-D integers (of length ``n``) with ``>= min_classes`` classes."""
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ValueError(f"{score}: {name} must be a 1-D integer array [N], got {y.dtype} {y.shape}")
    if n is not None and len(y) != n:
        raise ValueError(f"{score}: {name} has {len(y)} entries but the first input has {n} rows; give one per example")
    if len(y) and y.min() < 0:
        raise ValueError(f"{score}: {name} holds negative class ids ({int(y.min())}); use ids 0..C-1")
    k = len(np.unique(y))
    if k < min_classes:
        raise ValueError(f"{score} needs at least {min_classes} classes in {name}, got {k} (N={len(y)})")
    return y.astype(np.int64)


def check_features(features, score: str, what: str = "features", min_rows: int = 2) -> np.ndarray:
    """``features`` as float64 ``[N, D]``; raises unless 2-D, finite, with ``>= min_rows`` rows."""
    f = np.asarray(features)
    if f.ndim != 2 or not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{score}: {what} must be a 2-D float array [N, D], got {f.dtype} {f.shape}")
    if len(f) < min_rows:
        raise ValueError(f"{score} needs at least {min_rows} examples, got {len(f)}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(axis=1).sum())
        raise ValueError(f"{score}: {what} hold non-finite values (NaN/inf) in {bad} of {len(f)} rows")
    return f


def check_pair(features, labels, score: str, what: str = "features", min_classes: int = 2,
               min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(features float64 [N, D], labels int64 [N])`` after :func:`check_features` and :func:`check_labels`."""
    f = check_features(features, score, what, min_rows=min_rows)
    return f, check_labels(labels, "labels", score, n=len(f), min_classes=min_classes)


def class_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes [K], index [N])``: the classes present and each label's position among them."""
    classes, index = np.unique(y, return_inverse=True)
    return classes, index.reshape(-1)
