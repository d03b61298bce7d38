"""Weighted k-nearest-neighbour classification of frozen features (DINO's kNN protocol).

For each test feature ``q`` (rows L2-normalised, like every train feature ``x_j``):

    s_j = q · x_j                          (cosine similarity to every train feature)
    N   = the k train rows of largest s_j
    votes_c = Σ_{j ∈ N, y_j = c} exp(s_j / T)
    prediction = argmax_c votes_c          (ties: the smaller class index)

with ``k`` (DINO: 20) and temperature ``T`` (DINO: 0.07). The accuracy of these
predictions on the test split is the evaluator's number (``knn/<name>/accuracy``).

Why numpy and not a jitted function: the work is one float32 matmul
``[chunk, D] x [D, N]`` per chunk of queries plus ``np.argpartition`` (linear
time, no full sort); numpy's BLAS runs the matmul at the CPU's speed with no
compilation, and the evaluator's shapes change per dataset, so a jit would add a
compile per evaluator for no gain on a CPU. Queries go in chunks so that the
similarity block stays under ``chunk_mb`` (default 64 MB) for any train size.
"""
from __future__ import annotations

import numpy as np

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (a zero row stays zero), float32."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                chunk_mb: float = 64.0) -> np.ndarray:
    """Predicted labels ``[M]`` of ``test_x [M, D]`` by the weighted kNN vote over ``train_x [N, D]``
    with labels ``train_y [N]`` (see module doc); ``k`` is capped at N."""
    train_y = np.asarray(train_y).astype(np.int64)
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise ValueError(f"knn: {len(train_x)} train features for {len(train_y)} labels (need equal, > 0)")
    if np.asarray(train_x).shape[1] != np.asarray(test_x).shape[1]:
        raise ValueError(f"knn: train features are {np.asarray(train_x).shape[1]}-d, test features "
                         f"{np.asarray(test_x).shape[1]}-d")
    c = int(num_classes or train_y.max() + 1)
    xt = l2_normalise(train_x).T.copy()  # [D, N], contiguous for the matmul
    q = l2_normalise(test_x)
    n, m = xt.shape[1], len(q)
    k = max(1, min(int(k), n))
    rows = max(1, int(chunk_mb * 2**20 // (4 * n)))
    out = np.empty(m, np.int64)
    for start in range(0, m, rows):
        sim = q[start:start + rows] @ xt  # [r, N]
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), sim.shape)
        top = np.take_along_axis(sim, idx, axis=1)  # [r, k]
        weights = np.exp((top - 1.0) / temperature)  # exp(s/T) up to the factor exp(1/T): same argmax, no overflow
        votes = np.zeros((len(sim), c), np.float64)
        np.add.at(votes, (np.arange(len(sim))[:, None], train_y[idx]), weights)
        out[start:start + rows] = votes.argmax(1)
    return out


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Accuracy of :func:`knn_predict` on ``(test_x, test_y)``."""
    test_y = np.asarray(test_y).astype(np.int64)
    num_classes = int(max(np.max(train_y), np.max(test_y)) + 1)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    return float(np.mean(pred == test_y))
