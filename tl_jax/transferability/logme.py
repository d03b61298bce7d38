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

    γ = Σ_i σ_i / (σ_i + t),   α ← γ / ‖m‖²,   β ← (N − γ) / ‖y − F m‖²,   t = α/β.

One eigendecomposition of the smaller Gram matrix serves every class (the paper's
Algorithm 2, "fixed point"): with ``p_i = (v_iᵀFᵀy)²`` for the eigenvectors ``v_i`` of
``FᵀF`` (``p_i = σ_i x_i²`` with ``x = Uᵀy`` for those ``u_i`` of ``FFᵀ``),

    ‖m‖² = Σ p_i / (σ_i + t)²,   ‖y − F m‖² = ‖y‖² − Σ p_i (σ_i + 2t) / (σ_i + t)²,

so each iteration of every class is a sum over ``k`` numbers, not a product with ``F``.
``N > D``: ``FᵀF`` ``[D, D]`` (as Transfer-Learning-Library does); ``N ≤ D``: ``FFᵀ``
``[N, N]``, whose orthonormal ``U`` gives the residual directly as
``Σ x_i² t² / (σ_i + t)²`` (no cancellation when ``y`` lies in the span of ``F``'s rows).
All classes iterate together, each stopping at its own tolerance.

The score is the maximum of ``L/N``, averaged over the classes present; higher is better.
For a class it is ``L/N`` at the fixed point, or, where the evidence is highest at a
boundary and the iteration drifts towards it, the boundary's limit
(:func:`boundary_evidence`: ``α → ∞`` when the features do not help the class; ``β → ∞``
when ``N ≤ D`` and the class is interpolated without noise, common with few shots of wide
features). A direct numerical maximisation of the Gaussian marginal likelihood
``log N(y; 0, β⁻¹I + α⁻¹FFᵀ)`` agrees (tests/test_transferability.py).

The score is invariant to rescaling the features (``F → cF`` maps ``α → c²α``, ``β → β``
and leaves ``L`` unchanged). The authors' code adds ``ε = 1e-5`` to ``‖m‖²`` and
``‖y − F m‖²`` in the updates and in ``L``; as ``‖F‖`` grows, ``‖m‖²`` shrinks towards ε
and the score changes with the features' scale alone (Transfer-Learning-Library drops
it). Here the two norms are only floored at the smallest positive float, in the
updates, so that an exact zero cannot divide.
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_pair, class_indices

TINY = np.finfo(np.float64).tiny  # the floor of ‖m‖² and ‖y − Fm‖² in the updates: only an exact 0 is changed


def _spectrum(f: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(σ [k], p [C, k], x² [C, k] or None)`` of features ``f`` ``[N, D]`` and targets ``[N, C]``.

    ``N > D``: eigenpairs ``(σ_i, v_i)`` of ``FᵀF``, ``p = (VᵀFᵀY)²`` and no ``x²`` (the residual
    is taken from ``‖y‖²``); ``N ≤ D``: eigenpairs ``(σ_i, u_i)`` of ``FFᵀ``, ``x² = (UᵀY)²``,
    ``p = σ x²``. Rounding can leave an eigenvalue slightly below 0: clipped to 0.
    """
    n, d = f.shape
    if n > d:
        sigma, v = np.linalg.eigh(f.T @ f)
        return np.maximum(sigma, 0.0), ((f.T @ targets).T @ v) ** 2, None
    sigma, u = np.linalg.eigh(f @ f.T)
    sigma = np.maximum(sigma, 0.0)
    x2 = (targets.T @ u) ** 2
    return sigma, sigma * x2, x2


def _norms(t: np.ndarray, sigma: np.ndarray, p: np.ndarray, x2: np.ndarray | None, y2: np.ndarray,
           n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(γ, N − γ, ‖m‖², ‖y − Fm‖²)`` ``[a]`` of ``a`` classes at ``t = α/β`` ``[a]`` (see module doc).

    ``N − γ = (N − k) + Σ t/(σ_i + t)``: no cancellation when ``γ`` nears ``N`` (``t → 0``, ``N ≤ D``).
    """
    den = sigma[None, :] + t[:, None]  # [a, k]
    gamma = (sigma[None, :] / den).sum(1)
    rest = (n - sigma.size) + (t[:, None] / den).sum(1)
    m2 = (p / den ** 2).sum(1)
    if x2 is None:
        res2 = np.maximum(y2 - (p * (sigma[None, :] + 2 * t[:, None]) / den ** 2).sum(1), 0.0)
    else:
        res2 = (x2 * (t[:, None] / den) ** 2).sum(1) + np.maximum(y2 - x2.sum(1), 0.0)
    return gamma, rest, m2, res2


def evidence_fixed_point(sigma: np.ndarray, p: np.ndarray, x2: np.ndarray | None, y2: np.ndarray, n: int, d: int,
                         tol: float, max_iter: int) -> np.ndarray:
    """``L/N`` ``[C]`` of every class at its α, β fixed point, from :func:`_spectrum`'s arrays.

    ``y2`` ``[C]``: ``‖y‖²`` per class. Each class starts at ``α = β = 1`` and stops once
    ``|t_new − t| / t < tol`` (the authors' rule: their ``tol`` is 0.01, ``max_iter`` 11);
    ``L`` is evaluated, as in their code, with the last α, β and the norms that produced them.
    A class whose ``t`` drifts beyond ``1e±30 · σ_max`` (towards a supremum at the boundary,
    :func:`boundary_evidence`) stops there, before ``‖y − Fm‖²`` or ``‖m‖²`` underflow.
    """
    c = p.shape[0]
    alpha, beta = np.ones(c), np.ones(c)
    m2, res2 = np.zeros(c), np.zeros(c)
    active = np.arange(c)
    t_min, t_max = 1e-30 * sigma.max(), 1e30 * sigma.max()
    for _ in range(max_iter):
        t = alpha[active] / beta[active]
        gamma, rest, m2[active], res2[active] = _norms(t, sigma, p[active], None if x2 is None else x2[active],
                                                       y2[active], n)
        alpha[active] = gamma / np.maximum(m2[active], TINY)
        beta[active] = rest / np.maximum(res2[active], TINY)
        t_new = alpha[active] / beta[active]
        active = active[(np.abs(t_new - t) / t >= tol) & (t_new > t_min) & (t_new < t_max)]
        if active.size == 0:
            break
    k = sigma.size
    log_det = np.log(alpha[:, None] + beta[:, None] * sigma[None, :]).sum(1) + (d - k) * np.log(alpha)  # σ = 0 beyond k
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * res2 - alpha / 2 * m2
                - n / 2 * np.log(2 * np.pi))
    return evidence / n


def boundary_evidence(sigma: np.ndarray, x2: np.ndarray | None, y2: np.ndarray, n: int) -> np.ndarray:
    """``L/N`` ``[C]`` in the limits ``t = α/β → ∞`` and ``t → 0`` (with the best β for each ``t``), the larger.

    Maximising ``L`` over β at fixed ``t`` gives ``β = N / (‖y − Fm‖² + t‖m‖²)``. As ``t → ∞``
    (the features do not help: ``m = 0``) ``L/N → −½(log(2π‖y‖²/N) + 1)``. As ``t → 0`` with
    ``N ≤ D`` and ``FFᵀ`` of full rank beyond rounding (``y`` interpolated without noise; ``m`` the minimum-norm
    solution, ``‖m‖² = Σ x_i²/σ_i``) ``L/N → [−½ Σ log σ_i + N/2·log(N/‖m‖²) − N/2·(1 + log 2π)] / N``.
    Where the evidence is highest at one of them the fixed point drifts towards it
    without converging; its supremum is then this limit.
    """
    no_signal = -0.5 * (np.log(2 * np.pi * y2 / n) + 1)
    if x2 is None or sigma.min() <= sigma.max() * n * np.finfo(np.float64).eps:
        return no_signal  # N > D, or FFᵀ singular to rounding: L → −∞ as t → 0 (or +∞ for rows repeated in a class)
    m2 = (x2 / sigma[None, :]).sum(1)
    interpolation = (-0.5 * np.log(sigma).sum() + n / 2 * np.log(n / m2) - n / 2 * (1 + np.log(2 * np.pi))) / n
    return np.maximum(no_signal, interpolation)


def logme(features, labels, *, tol: float = 1e-8, max_iter: int = 200) -> float:
    """LogME of ``features`` ``[N, D]`` for integer ``labels`` ``[N]`` (mean over classes of ``L/N``).

    ``tol``: a class stops when ``α/β`` changes by less than this fraction (the authors'
    code stops at 1e-2 after at most 11 steps; the fixed point is usually reached in a few).
    Raises ``ValueError`` for fewer than 2 classes, mismatched lengths, non-finite or all-zero features.
    """
    f, y = check_pair(features, labels, "logme")
    if not f.any():
        raise ValueError(f"logme: features are all zero ({f.shape[0]} x {f.shape[1]}); the evidence needs a non-zero F")
    _, index = class_indices(y)
    targets = (index[:, None] == np.arange(index.max() + 1)[None, :]).astype(np.float64)  # [N, C] one-hot
    sigma, p, x2 = _spectrum(f, targets)
    n, d = f.shape
    y2 = targets.sum(0)  # ‖y‖² of each indicator
    per_class = np.maximum(evidence_fixed_point(sigma, p, x2, y2, n, d, tol, max_iter),
                           boundary_evidence(sigma, x2, y2, n))
    return float(np.mean(per_class))
