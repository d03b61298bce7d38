"""Joint multi-domain multi-task loss ``L = Σ_d Σ_i λ_{d,i} L_{d,i}``.

A batch mixes examples of D domains (``domain_ids``); every example has a
label for each of T tasks and the model one head per task, so the per-example
losses are a ``[T, B]`` array ``CE_i(b)``. ``λ`` is a ``[D, T]`` matrix: λ_{d,i} = 0
means task i is absent from domain d (its labels there need not exist: such
entries contribute no term and no gradient, even if ``CE_i(b)`` is NaN/inf).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.losses._checks import check_shape, is_concrete

NORMALIZATIONS = ("domain_mean", "global_mean")


def joint_loss(per_example_losses: jax.Array, domain_ids: jax.Array, weights: jax.Array, *,
               mask: jax.Array | None = None, normalization: str = "domain_mean"
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Domain × task weighted loss over a mixed-domain batch.

    With padding mask m_b ∈ {0, 1}, d(b) the domain of example b and
    ``active[d, i] = λ_{d,i} > 0``:

        mean_{d,i} = Σ_{b: d(b)=d} m_b CE_i(b) / Σ_{b: d(b)=d} m_b     (0 if domain d is absent)

    'domain_mean' (recommended: each domain averaged on its own, so λ alone sets
    how much a domain counts, whatever its share of the batch):
        L = Σ_d Σ_i λ_{d,i} · mean_{d,i}

    'global_mean' (one normaliser, the number of real examples B' = Σ_b m_b):
        L = Σ_d Σ_i λ_{d,i} Σ_{b: d(b)=d} m_b CE_i(b) / max(B', 1)

    Entries CE_i(b) of inactive pairs (λ_{d(b),i} = 0) and of padding rows are
    replaced by 0 before any sum, so they reach neither L nor its gradient.

    Args:
      per_example_losses: [T, B] per-example losses CE_i(b).
      domain_ids: [B] integer domain of each example, in [0, D).
      weights: [D, T] λ >= 0 (numpy or a jax array).
      mask: [B] 0/1 padding mask, or None (all real).
      normalization: 'domain_mean' or 'global_mean'.

    Returns:
      ``(L, weighted [D, T], means [D, T])`` with ``weighted[d, i]`` the term
      λ_{d,i}·(normalised sum) so that ``L = Σ weighted``, and ``means[d, i]`` the
      raw per-domain mean mean_{d,i} (for logging; 0 for inactive pairs).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if jnp.ndim(per_example_losses) != 2:
        raise ValueError(f"per_example_losses must have shape [T, B], got {jnp.shape(per_example_losses)}")
    num_tasks, batch = jnp.shape(per_example_losses)
    check_shape("domain_ids", domain_ids, (batch,))
    if isinstance(weights, (list, tuple)):
        weights = np.asarray(weights, np.float32)
    if jnp.ndim(weights) != 2 or jnp.shape(weights)[1] != num_tasks:
        raise ValueError(f"weights must have shape [D, {num_tasks}] (domains x tasks), got {jnp.shape(weights)}")
    num_domains = jnp.shape(weights)[0]
    if is_concrete(weights):
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if mask is not None:
        check_shape("mask", mask, (batch,))
    if is_concrete(domain_ids) and batch:
        ids = np.asarray(domain_ids)
        if ids.min() < 0 or ids.max() >= num_domains:
            raise ValueError(f"domain_ids must be in [0, {num_domains}), got range [{ids.min()}, {ids.max()}]")

    dtype = jnp.result_type(per_example_losses, jnp.float32)
    m = jnp.ones((batch,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    lam = jnp.asarray(weights, dtype)                                       # [D, T]
    onehot = jax.nn.one_hot(domain_ids, num_domains, dtype=dtype) * m[:, None]   # [B, D]
    example_active = (onehot @ (lam > 0).astype(dtype)).T > 0               # [T, B]
    safe = jnp.where(example_active, per_example_losses, 0.0)               # [T, B]
    sums = onehot.T @ safe.T                                                # [D, T]
    counts = jnp.sum(onehot, axis=0)[:, None]                               # [D, 1]
    means = jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1.0), 0.0)
    if normalization == "domain_mean":
        weighted = lam * means
    else:
        weighted = lam * sums / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.sum(weighted), weighted, means
