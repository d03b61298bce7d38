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


def h_score(features, labels, *, shrinkage: float | str = 0.0) -> float:
    """H-score of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (see module doc).

    ``shrinkage``: ``0`` (the paper's score), a weight ``α`` in ``[0, 1]``, or
    ``'auto'`` (Ledoit–Wolf). Raises ``ValueError`` for fewer than 2 classes,
    mismatched lengths, non-finite features or a bad ``shrinkage``.
    """
    f, y = check_pair(features, labels, "h_score")
    fc = f - f.mean(0)
    _, index = class_indices(y)
    counts = np.bincount(index)
    means = np.zeros((counts.size, f.shape[1]))
    np.add.at(means, index, fc)
    gc = (means / counts[:, None])[index]  # E[f | y] per row, centred (class means average to the mean)
    n, d = f.shape
    if shrinkage == "auto":
        alpha = ledoit_wolf_shrinkage(f)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0.0 <= shrinkage <= 1.0:
        alpha = float(shrinkage)
    else:
        raise ValueError(f"h_score: shrinkage must be a number in [0, 1] or 'auto', got {shrinkage!r}")
    # cov(f) = V diag(s²/(N−1)) Vᵀ from the thin SVD of the centred features; the centred class means lie in
    # the span of V (they are averages of centred rows), so tr(cov⁺ cov_g) = Σ_i ‖G v_i‖² / ((N−1) λ_i):
    # O(N·D·min(N, D)) instead of a D x D inverse. Shrinkage changes λ_i on the span (and 1/(α σ̄) outside
    # it, which G does not reach).
    _, s, vt = np.linalg.svd(fc, full_matrices=False)
    lam = s ** 2 / (n - 1)
    if alpha > 0:
        lam = (1 - alpha) * lam + alpha * lam.sum() / d  # tr cov(f) = Σ λ_i
    keep = lam > lam.max() * max(n, d) * np.finfo(np.float64).eps  # the pseudo-inverse's tolerance
    proj = gc @ vt[keep].T  # [N, k]
    return float((1 - alpha) * np.sum(proj ** 2 / lam[keep]) / (n - 1))
