"""TransRate: the coding rate the labels explain (Huang, Huang, Rong, Yang, Wei, ICML 2022).

"Frustratingly Easy Transferability Estimation" (ICML 2022, arXiv:2106.09362). With
``Z`` the features ``[N, D]`` centred over all examples, ``Z_c`` the rows of class
``c`` (``n_c`` of them) and the coding rate at distortion ``ε``

    R(Z, ε) = ½ · log det( I_D + ZᵀZ / (N·ε) )

the score is ``TransRate = R(Z, ε) − R(Z | Y, ε)``: how much more it costs to code all the
features than each class's features separately. Higher is better. ``ε = 1e-4`` is
the authors' default. The class rates are averaged with one of two weightings:

* ``weighting='size'`` (default): ``R(Z | Y, ε) = Σ_c (n_c / N) · R(Z_c, ε)``. TransRate
  estimates the mutual information ``H(Z) − H(Z | Y)``, and ``H(Z | Y) = Σ_c p(c) H(Z | Y=c)``
  weights each class by its frequency, as the coding rate of a partition does in the
  MCR² principle the paper builds on (Yu et al., NeurIPS 2020: ``Σ_j tr(Π_j)/(2m) log det(…)``).
  The authors' experiment code weights the same way (github.com/Long-Kai/TransRate,
  ``extract_result_utils.process_transrate_logs``: ``np.sum(rzc * nc / n)``).
* ``weighting='uniform'``: ``R(Z | Y, ε) = (1/C) · Σ_c R(Z_c, ε)``: the ten-line listing
  printed in the paper, copied by Transfer-Learning-Library (``tllib/ranking/transrate.py``,
  ``Rfy / C``). It counts a class of 2 examples as much as one of 2,000.

The two agree on balanced classes (e.g. few-shot sets). ``C`` counts the classes present
(Transfer-Learning-Library's ``int(y.max() + 1)`` also counts absent ids, with rate 0).
The determinant is taken over the smaller Gram matrix (``det(I_D + ZᵀZ·s) = det(I_N + ZZᵀ·s)``).
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_pair, class_indices

WEIGHTINGS = ("size", "uniform")


def coding_rate(z: np.ndarray, eps: float) -> float:
    """``½ · log det(I + zᵀz / (n·ε))`` of ``z`` ``[n, D]`` (no centring here)."""
    n, d = z.shape
    gram = z @ z.T if n <= d else z.T @ z
    _, logdet = np.linalg.slogdet(np.eye(len(gram)) + gram / (n * eps))
    return float(0.5 * logdet)


def transrate(features, labels, eps: float = 1e-4, *, weighting: str = "size") -> float:
    """TransRate of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (see module doc).

    ``weighting``: ``'size'`` (``n_c/N``, the default) or ``'uniform'`` (``1/C``).
    Raises ``ValueError`` for fewer than 2 classes, mismatched lengths, non-finite
    features, ``eps <= 0`` or an unknown ``weighting``.
    """
    f, y = check_pair(features, labels, "transrate")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"transrate: eps must be a number > 0, got {eps!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"transrate: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    z = f - f.mean(0)
    _, index = class_indices(y)
    counts = np.bincount(index)
    weights = counts / len(y) if weighting == "size" else np.full(counts.size, 1.0 / counts.size)
    conditional = sum(w * coding_rate(z[index == c], eps) for c, w in enumerate(weights))
    return coding_rate(z, eps) - conditional
