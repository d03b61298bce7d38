"""Deep CORAL (``coral``) and multi-kernel MMD (``mmd``): match the source and target feature distributions.

On top of :mod:`tl_jax.objectives.domain_adaptation` (target stream, keys, one pass over
``[x_s; x_t]``), with f the chosen layer (``layer``)::

    coral:  L = CE + w·‖C_s − C_t‖_F² / (4 d²)
    mmd:    L = CE + w·MMD²_k(f_s, f_t),   k = Σ_k exp(−‖x − y‖² / β_k)   (multi-bandwidth)

(``kernel_mul``, ``num_kernels`` set the MMD bandwidths β_k, see :func:`mmd_loss`.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.objectives._checks import check_scalar, config_int, config_number, is_concrete
from tl_jax.objectives.base import register
from tl_jax.objectives.domain_adaptation import UnsupervisedDA, target_defaults


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


@register
class CORAL(UnsupervisedDA):
    """Deep CORAL (Sun & Saenko 2016): match the feature covariances; see the module docstring."""

    name: ClassVar[str] = "coral"
    defaults: ClassVar[dict] = target_defaults()

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        return coral_loss(*self.layer(zs, fs, zt, ft)), {}


@register
class MMD(UnsupervisedDA):
    """Multi-kernel MMD (DAN, Long et al. 2015) on the features; see the module docstring."""

    name: ClassVar[str] = "mmd"
    defaults: ClassVar[dict] = target_defaults(kernel_mul=2.0, num_kernels=5)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.kernel_mul = config_number(f"{self.where}.kernel_mul", self.cfg.kernel_mul)
        if self.kernel_mul <= 0:
            raise ValueError(f"{self.where}.kernel_mul must be > 0, got {self.kernel_mul!r}")
        self.num_kernels = config_int(f"{self.where}.num_kernels", self.cfg.num_kernels, low=1)

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        return mmd_loss(*self.layer(zs, fs, zt, ft), kernel_mul=self.kernel_mul, num_kernels=self.num_kernels), {}
