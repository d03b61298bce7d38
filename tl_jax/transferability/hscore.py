"""H-score: how much of the features' variance the class means explain (Bao et al., ICIP 2019).

"An Information-Theoretic Approach to Transferability in Task Transfer Learning",
Bao, Li, Huang, Zheng, Wang, Tong (ICIP 2019). For features ``f`` ``[N, D]`` and
target labels ``y``:

    H(f) = tr( cov(f)⁺ · cov(E[f | y]) )

where ``E[f | y]`` replaces each row by the mean of its class and ``cov`` is the
sample covariance (``1/(N−1)``, centred). ``⁺`` is the pseudo-inverse: eigenvalues
below ``max(N, D)·eps·λ_max`` are dropped (numpy's ``matrix_rank`` tolerance). Higher is
better; at most ``C − 1``.

Caveat: when ``N ≤ D`` (few shots, wide features) ``cov(f)`` is singular and the
pseudo-inverse projects onto the span of the centred examples, which then holds
every class-mean direction: the score is ``C − 1`` whatever the features. The
shrinkage H-score of Ibrahim, Ponomareva, Mazumder ("Newer is not always better",
ECML-PKDD 2022) fixes this with a Ledoit–Wolf shrunk covariance:

    H_α(f) = tr( ((1−α)·cov(f) + α·σ̄·I)⁻¹ · (1−α)·cov(E[f | y]) ),   σ̄ = tr cov(f) / D

``shrinkage='auto'`` takes Ledoit and Wolf's (2004) α (:func:`ledoit_wolf_shrinkage`,
equal to ``sklearn.covariance.ledoit_wolf_shrinkage``); ``0`` is the paper's score.
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_pair, class_indices


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit–Wolf's shrinkage ``α ∈ [0, 1]`` towards ``σ̄·I`` of the covariance of ``x`` ``[N, D]``.

    With ``X`` centred, ``S = XᵀX/N``, ``μ = tr S / D``: ``α = min(b², d²)/d²`` where
    ``d² = ‖S − μI‖²_F`` and ``b² = 1/N² · Σ_i ‖x_i x_iᵀ − S‖²_F``
    (through the smaller Gram matrix and the row norms: no D x D product when N < D).
    """
    x = x - x.mean(0)
    n, d = x.shape
    x2 = x ** 2
    trace_diag = x2.sum(0) / n  # diag of S
    mu = trace_diag.sum() / d
    small = (lambda a: a @ a.T) if n <= d else (lambda a: a.T @ a)  # ‖XᵀX‖_F = ‖XXᵀ‖_F: the smaller Gram
    delta_ = np.sum(small(x) ** 2) / n ** 2  # ‖S‖²_F
    beta_ = np.sum(x2.sum(1) ** 2)  # Σ_jk Σ_i x_ij² x_ik² = Σ_i ‖x_i‖⁴
    b2 = (beta_ / n - delta_) / (d * n)
    d2 = (delta_ - 2 * mu * trace_diag.sum() + d * mu ** 2) / d
    b2 = min(b2, d2)
    return 0.0 if b2 == 0 else float(b2 / d2)


def _class_energy(fc: np.ndarray, index: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(w [k], e [k])`` of centred features ``fc`` ``[N, D]``: eigenvalues ``w_i`` of ``FcᵀFc`` and
    ``e_i = Σ_c n_c (v_iᵀ μ_c)²``, the between-class scatter along each eigenvector ``v_i``.

    ``N > D``: ``v_i`` from ``eigh(FcᵀFc)`` ``[D, D]`` and the class means ``μ_c`` ``[C, D]``.
    ``N ≤ D``: ``u_i`` from ``eigh(FcFcᵀ)`` ``[N, N]``; as ``μ_c = Fcᵀ 1_c / n_c`` and
    ``v_i = Fcᵀ u_i / √w_i``, ``e_i = w_i · Σ_c (1_cᵀ u_i)² / n_c`` (no division by a small ``√w_i``).
    """
    n, d = fc.shape
    if n > d:
        w, v = np.linalg.eigh(fc.T @ fc)
        sums = np.zeros((counts.size, d))
        np.add.at(sums, index, fc)
        return w, ((sums @ v) ** 2 / counts[:, None]).sum(0)  # n_c (v·μ_c)² = (v·Σ_c f)² / n_c
    w, u = np.linalg.eigh(fc @ fc.T)
    sums = np.zeros((counts.size, n))
    np.add.at(sums, index, u)  # [C, N]: 1_cᵀ u_i
    return w, w * (sums ** 2 / counts[:, None]).sum(0)


def h_score(features, labels, *, shrinkage: float | str = 0.0) -> float:
    """H-score of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (see module doc).

    ``shrinkage``: ``0`` (the paper's score), a weight ``α`` in ``[0, 1]``, or
    ``'auto'`` (Ledoit–Wolf). Raises ``ValueError`` for fewer than 2 classes,
    mismatched lengths, non-finite features or a bad ``shrinkage``.
    """
    f, y = check_pair(features, labels, "h_score")
    n, d = f.shape
    if shrinkage == "auto":
        alpha = ledoit_wolf_shrinkage(f)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0.0 <= shrinkage <= 1.0:
        alpha = float(shrinkage)
    else:
        raise ValueError(f"h_score: shrinkage must be a number in [0, 1] or 'auto', got {shrinkage!r}")
    _, index = class_indices(y)
    # cov(f) = Σ_i λ_i v_i v_iᵀ with λ_i = w_i/(N−1) (the eigenpairs of the smaller Gram matrix), cov(E[f|y]) =
    # Σ_c n_c μ_c μ_cᵀ/(N−1), so tr(cov⁺ cov_g) = Σ_i e_i / ((N−1) λ_i): one eigh of a min(N, D) square matrix
    # instead of a D x D pseudo-inverse and product. Shrinkage changes λ_i to (1−α)λ_i + α σ̄ (the class means
    # have no component outside the span of the centred rows, where only α σ̄ would remain).
    w, e = _class_energy(f - f.mean(0), index, np.bincount(index))
    lam = np.maximum(w, 0.0) / (n - 1)
    keep = lam > lam.max() * max(n, d) * np.finfo(np.float64).eps  # the pseudo-inverse's tolerance
    if alpha > 0:
        lam = (1 - alpha) * lam + alpha * lam.sum() / d  # tr cov(f) = Σ λ_i
    return float((1 - alpha) * np.sum(e[keep] / lam[keep]) / (n - 1))
