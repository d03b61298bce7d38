"""Unsupervised domain adaptation losses: DANN (gradient reversal + domain
classifier), Deep CORAL and multi-kernel MMD.

Source features/logits come from labelled source data, target ones from
unlabelled target data; all losses are scalars and differentiable in both.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tl_jax.losses._checks import check_scalar, is_concrete

# ----------------------------------------------------------------------------- DANN


@jax.custom_vjp
def _grl(x: jax.Array, lam: jax.Array) -> jax.Array:
    return x


def _grl_fwd(x: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, lam


def _grl_bwd(lam: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rev = jax.tree_util.tree_map(lambda t: (-lam * t).astype(t.dtype), g)
    return rev, jnp.zeros_like(lam)


_grl.defvjp(_grl_fwd, _grl_bwd)


def gradient_reversal(x: jax.Array, lam: float | jax.Array) -> jax.Array:
    """Gradient reversal layer (Ganin & Lempitsky, 2015).

    forward: R(x) = x;   backward: ∂R/∂x = −λ·I,   ∂R/∂λ = 0

    Args:
      x: array (or pytree of arrays) of any shape.
      lam: scalar λ (Python number or traced array, e.g. :func:`dann_lambda`);
        it receives a zero cotangent.

    Returns:
      ``x`` unchanged.
    """
    check_scalar("lam", lam, low=None)
    return _grl(x, jnp.asarray(lam, jnp.float32))


def dann_lambda(progress: float | jax.Array, gamma: float = 10.0) -> jax.Array:
    """DANN adaptation-factor schedule (Ganin & Lempitsky, 2015).

    λ(p) = 2 / (1 + exp(−γ·p)) − 1,   p = training progress clipped to [0, 1]

    λ(0) = 0 and λ(1) = tanh(γ/2) ≈ 1 (0.99991 for γ = 10). Scalar -> scalar.
    """
    check_scalar("gamma", gamma, low=0.0)
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0


def _flat_logits(name: str, z: jax.Array) -> jax.Array:
    if jnp.ndim(z) == 2 and jnp.shape(z)[1] == 1:
        return z[:, 0]
    if jnp.ndim(z) != 1:
        raise ValueError(f"{name} must have shape [B] or [B, 1], got {jnp.shape(z)}")
    return z


def domain_adversarial_loss(domain_logits_source: jax.Array, domain_logits_target: jax.Array) -> jax.Array:
    """Binary domain-classification loss of DANN (source label 1, target label 0).

    L = ½ [ (1/B_s) Σ_i BCE(z^s_i, 1) + (1/B_t) Σ_j BCE(z^t_j, 0) ],
    BCE(z, y) = −y·log σ(z) − (1 − y)·log(1 − σ(z))

    (each domain averaged separately, as in TLlib, so unequal batch sizes do not
    reweight the domains). Computed stably from logits with
    ``optax.sigmoid_binary_cross_entropy``. Put :func:`gradient_reversal` between
    the features and the domain classifier so the feature extractor maximises L.

    Args:
      domain_logits_source: [B_s] or [B_s, 1] discriminator logits z^s.
      domain_logits_target: [B_t] or [B_t, 1] discriminator logits z^t.

    Returns:
      scalar.
    """
    zs = _flat_logits("domain_logits_source", domain_logits_source)
    zt = _flat_logits("domain_logits_target", domain_logits_target)
    ls = optax.sigmoid_binary_cross_entropy(zs, jnp.ones_like(zs))
    lt = optax.sigmoid_binary_cross_entropy(zt, jnp.zeros_like(zt))
    return 0.5 * (jnp.mean(ls) + jnp.mean(lt))


# ----------------------------------------------------------------------------- CORAL / MMD


def _check_features(fs: jax.Array, ft: jax.Array, min_rows: int) -> None:
    for name, f in (("fs", fs), ("ft", ft)):
        if jnp.ndim(f) != 2 or jnp.shape(f)[0] < min_rows:
            raise ValueError(f"{name} must have shape [B, D] with B >= {min_rows}, got {jnp.shape(f)}")
    if jnp.shape(fs)[1] != jnp.shape(ft)[1]:
        raise ValueError(f"ft feature dim must match fs: {jnp.shape(ft)[1]} vs {jnp.shape(fs)[1]}")


def _covariance(f: jax.Array) -> jax.Array:
    """Unbiased covariance C = (X − X̄)ᵀ(X − X̄) / (n − 1) of [n, d] features."""
    centred = f - jnp.mean(f, axis=0, keepdims=True)
    return centred.T @ centred / (f.shape[0] - 1)


def coral_loss(fs: jax.Array, ft: jax.Array) -> jax.Array:
    """Deep CORAL loss (Sun & Saenko, 2016).

    L = ‖C_s − C_t‖_F² / (4 d²),   C = (X − 1x̄ᵀ)ᵀ(X − 1x̄ᵀ) / (n − 1)   (unbiased)

    Args:
      fs: [B_s, D] source features (B_s >= 2); ft: [B_t, D] target features (B_t >= 2).

    Returns:
      scalar.
    """
    _check_features(fs, ft, 2)
    dtype = jnp.result_type(fs, ft, jnp.float32)
    d = fs.shape[1]
    diff = _covariance(fs.astype(dtype)) - _covariance(ft.astype(dtype))
    return jnp.sum(jnp.square(diff)) / (4.0 * d * d)


def mmd_loss(fs: jax.Array, ft: jax.Array, *, bandwidths: Sequence[float] | jax.Array | None = None,
             kernel_mul: float = 2.0, num_kernels: int = 5) -> jax.Array:
    """Biased multi-kernel MMD² estimate (DAN, Long et al. 2015; as in their/TLlib code).

    MMD² = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') − 2·mean_{i,j} k(s_i, t_j)
    (all pairs including i = i'), with the multi-bandwidth Gaussian kernel

        k(x, y) = Σ_{k=0}^{K−1} exp(−‖x − y‖² / β_k)

    The β_k are on the squared-distance scale (β_k plays the role of σ_k², no ½):
    β_k = β₀ · kernel_mul^(k − ⌊K/2⌋), K = ``num_kernels``, and β₀ is the mean
    squared distance over the distinct pairs of the pooled sample Z = [fs; ft]
    (n = B_s + B_t):  β₀ = Σ_{a≠b} ‖z_a − z_b‖² / (n² − n), under ``stop_gradient``
    (floored at 1e-12). If ``bandwidths`` is given, those values are the β_k and
    ``kernel_mul``/``num_kernels`` are ignored.

    Args:
      fs: [B_s, D] source features; ft: [B_t, D] target features.
      bandwidths: optional explicit β_k > 0 (sequence or 1-D array).
      kernel_mul: ratio between neighbouring bandwidths (> 0).
      num_kernels: K >= 1.

    Returns:
      scalar (≈ 0 for identical samples, > 0 for different distributions).
    """
    _check_features(fs, ft, 1)
    dtype = jnp.result_type(fs, ft, jnp.float32)
    z = jnp.concatenate([fs.astype(dtype), ft.astype(dtype)], axis=0)
    n, ns = z.shape[0], fs.shape[0]
    sq = jnp.sum(z * z, axis=1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)   # [n, n] ‖z_a − z_b‖²
    if bandwidths is None:
        check_scalar("kernel_mul", kernel_mul, low=0.0, low_open=True)
        if not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"num_kernels must be an int >= 1, got {num_kernels!r}")
        base = jax.lax.stop_gradient(jnp.sum(dist) / (n * n - n)) if n > 1 else jnp.ones((), dtype)
        base = jnp.maximum(base, 1e-12)
        betas = base * kernel_mul ** (jnp.arange(num_kernels, dtype=dtype) - num_kernels // 2)
    else:
        if isinstance(bandwidths, (list, tuple)):
            bandwidths = np.asarray(bandwidths, np.float64) if all(map(is_concrete, bandwidths)) \
                else jnp.stack(bandwidths)
        if jnp.ndim(bandwidths) != 1 or jnp.shape(bandwidths)[0] < 1:
            raise ValueError(f"bandwidths must be a non-empty 1-D sequence, got shape {jnp.shape(bandwidths)}")
        if is_concrete(bandwidths):
            bw = np.asarray(bandwidths, np.float64)
            if not np.all(np.isfinite(bw) & (bw > 0)):
                raise ValueError(f"bandwidths must all be finite and > 0, got {bw.tolist()}")
        betas = jnp.asarray(bandwidths, dtype)
    kernel = jnp.sum(jnp.exp(-dist[None] / betas[:, None, None]), axis=0)   # [n, n]
    k_ss, k_tt, k_st = kernel[:ns, :ns], kernel[ns:, ns:], kernel[:ns, ns:]
    return jnp.mean(k_ss) + jnp.mean(k_tt) - 2.0 * jnp.mean(k_st)
