"""TransRate: the coding rate the labels explain (Huang, Huang, Ru, Chen, Chen, ICML 2022).

"Frustratingly Easy Transferability Estimation" (ICML 2022, arXiv:2106.09362). With
``Z`` the features ``[N, D]`` centred over all examples, ``Z_c`` the rows of class
``c`` (``n_c`` of them) and the coding rate at distortion ``ε``

    R(Z, ε) = ½ · log det( I_D + ZᵀZ / (N·ε) )

the score is ``TransRate = R(Z, ε) − R(Z | Y, ε)`` with
``R(Z | Y, ε) = Σ_c (n_c / N) · R(Z_c, ε)``: how much more it costs to code all the
features than each class's features separately. Higher is better. ``ε = 1e-4`` is
the authors' default (their code averages the class rates with weights ``1/C``:
the same on balanced classes, e.g. few-shot sets). The determinant is taken over the
smaller Gram matrix (``det(I_D + ZᵀZ·s) = det(I_N + ZZᵀ·s)``).
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_pair, class_indices


def coding_rate(z: np.ndarray, eps: float) -> float:
    """``½ · log det(I + zᵀz / (n·ε))`` of ``z`` ``[n, D]`` (no centring here)."""
    n, d = z.shape
    gram = z @ z.T if n <= d else z.T @ z
    sign, logdet = np.linalg.slogdet(np.eye(len(gram)) + gram / (n * eps))
    return float(0.5 * logdet)


def transrate(features, labels, eps: float = 1e-4) -> float:
    """TransRate of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (see module doc).

    Raises ``ValueError`` for fewer than 2 classes, mismatched lengths, non-finite
    features or ``eps <= 0``.
    """
    f, y = check_pair(features, labels, "transrate")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"transrate: eps must be a number > 0, got {eps!r}")
    z = f - f.mean(0)
    _, index = class_indices(y)
    conditional = sum((index == c).mean() * coding_rate(z[index == c], eps) for c in range(index.max() + 1))
    return coding_rate(z, eps) - conditional
