"""LogME: the log maximum evidence of a Bayesian linear model on the features (You et al., ICML 2021).

"LogME: Practical Assessment of Pre-trained Models for Transfer Learning", You, Liu,
Wang, Long (ICML 2021, arXiv:2102.11005). For each class ``c`` the target is the
indicator ``y = 1[label == c]`` ``[N]`` and the model ``y = F w + noise`` with prior
``w ~ N(0, α⁻¹ I_D)`` and noise ``N(0, β⁻¹)``. Its log evidence is

    L(α, β) = D/2·log α + N/2·log β − ½·Σ_{i=1..D} log(α + β σ_i)
              − β/2·‖y − F m‖² − α/2·‖m‖² − N/2·log 2π

with ``σ_i`` the eigenvalues of ``FᵀF`` (``σ_i = 0`` beyond rank ``k = min(N, D)``) and
``m = β (αI + βFᵀF)⁻¹ Fᵀy`` the posterior mean. MacKay's evidence maximisation
iterates to the fixed point

    γ = Σ_i σ_i / (σ_i + α/β),   α ← γ / ‖m‖²,   β ← (N − γ) / ‖y − F m‖².

With one thin SVD ``F = U diag(s) Vᵀ`` (``σ = s²``, ``x = Uᵀy``) every quantity of
the loop is a sum over ``k`` numbers (the paper's Algorithm 2, "fixed point"):
``‖m‖² = Σ σ x² / (σ + t)²`` and ``‖y − F m‖² = Σ x² t² / (σ + t)² + (‖y‖² − ‖x‖²)``
with ``t = α/β``. The score is ``L/N`` at the fixed point, averaged over the classes
present. Higher is better. As in the authors' code, ``ε = 1e-5`` is added to the
two squared norms (it keeps α, β finite when a norm is 0).
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_pair, class_indices

EPS = 1e-5


def _class_evidence(u: np.ndarray, sigma: np.ndarray, y: np.ndarray, d: int, tol: float,
                    max_iter: int) -> float:
    """``L/N`` of one binary target ``y`` [N] at the α, β fixed point (see module doc)."""
    n = len(y)
    x2 = (u.T @ y) ** 2  # [k]
    res_out = max(float(y @ y - x2.sum()), 0.0)  # ‖y‖² outside the span of F's columns
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + res_out
        alpha, beta = gamma / (m2 + EPS), (n - gamma) / (res2 + EPS)
        if abs(alpha / beta - t) / t <= tol:
            break
    k = len(sigma)
    log_det = np.log(alpha + beta * sigma).sum() + (d - k) * np.log(alpha)  # σ_i = 0 for i > k
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * (res2 + EPS)
                - alpha / 2 * (m2 + EPS) - n / 2 * np.log(2 * np.pi))
    return float(evidence / n)


def logme(features, labels, *, tol: float = 1e-8, max_iter: int = 200) -> float:
    """LogME of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (mean over classes of ``L/N``).

    ``tol``: stop when ``α/β`` changes by at most this fraction (the authors' code
    stops at 1e-3 after at most 11 steps; the fixed point is usually reached in a few).
    Raises ``ValueError`` for fewer than 2 classes, mismatched lengths or non-finite features.
    """
    f, y = check_pair(features, labels, "logme")
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # u [N, k], s [k]
    sigma = s ** 2
    _, index = class_indices(y)
    per_class = [_class_evidence(u, sigma, (index == c).astype(np.float64), f.shape[1], tol, max_iter)
                 for c in range(index.max() + 1)]
    return float(np.mean(per_class))
