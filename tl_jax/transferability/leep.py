"""LEEP: the log expected empirical prediction of a source classifier (Nguyen et al., ICML 2020).

"LEEP: A New Measure to Evaluate Transferability of Learned Representations",
Nguyen, Hassner, Seeger, Archambeau (ICML 2020, arXiv:2002.12462). With
``θ(x_i)`` the source model's softmax over its ``Z`` source classes and ``y_i`` the
target labels (``Y`` classes):

    P̂(y, z) = 1/N · Σ_{i: y_i = y} θ(x_i)_z            (empirical joint, [Y, Z])
    P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)                 (empirical conditional)
    LEEP = 1/N · Σ_i log( Σ_z P̂(y_i | z) · θ(x_i)_z )    (the "expected empirical predictor")

It is the mean log-likelihood of the target labels under the classifier that
re-labels the source's predictions through ``P̂(y | z)``: ``≤ 0``, higher is better,
``0`` when the source probabilities are one-hot and determine the target label.
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_features, check_labels, class_indices

TINY = 1e-300  # guards log(0) and 0/0 for source classes no example predicts


def leep(source_probs, labels) -> float:
    """LEEP of source probabilities ``[N, Z]`` (rows sum to 1) for integer target ``labels`` ``[N]``.

    Raises ``ValueError`` for rows that are not probabilities, fewer than 2 target
    classes, mismatched lengths or non-finite values.
    """
    theta = check_features(source_probs, "leep", "source_probs")
    y = check_labels(labels, "labels", "leep", n=len(theta))
    if theta.min() < 0 or not np.allclose(theta.sum(1), 1.0, atol=1e-3):
        raise ValueError("leep: source_probs must be probabilities (>= 0, rows summing to 1): pass softmax(logits)")
    _, index = class_indices(y)
    onehot = np.eye(index.max() + 1)[index]  # [N, Y]
    joint = onehot.T @ theta / len(y)  # [Y, Z]
    cond = joint / np.maximum(joint.sum(0, keepdims=True), TINY)  # P(y | z)
    eep = (theta @ cond.T)[np.arange(len(y)), index]  # Σ_z P(y_i | z) θ(x_i)_z
    return float(np.mean(np.log(np.maximum(eep, TINY))))
