"""Weighted multi-domain loss ``L = Σ_d Σ_i λ_{d,i} L_{d,i}``, ``λ_{d,i} = λ_d · w_i``.

A batch mixes examples from D domains (``domain_ids``); each domain has a weight
λ_d and each example an optional weight w_i and padding mask m_i. Two
normalisations say how the per-example terms are averaged (see
:func:`multi_domain_loss`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.losses._checks import check_shape, check_weights, is_concrete

NORMALIZATIONS = ("domain_mean", "global_mean")


def multi_domain_loss(per_example_loss: jax.Array, domain_ids: jax.Array, domain_weights: jax.Array, *,
                      example_weights: jax.Array | None = None, mask: jax.Array | None = None,
                      normalization: str = "domain_mean") -> tuple[jax.Array, jax.Array]:
    """Domain- and example-weighted loss over a mixed-domain batch.

    With λ_{d,i} = λ_d · w_i, padding mask m_i ∈ {0, 1} and d(i) the domain of example i:

    'domain_mean' (each domain averaged on its own, then weighted):
        per_domain[d] = λ_d · Σ_{i: d(i)=d} w_i m_i L_i / Σ_{i: d(i)=d} w_i m_i
        (0 when the denominator is 0, e.g. the domain is absent from the batch)

    'global_mean' (weighted examples, one global normaliser = number of real examples):
        per_domain[d] = Σ_{i: d(i)=d} λ_d w_i m_i L_i / max(Σ_i m_i, 1)

    and in both cases L = Σ_d per_domain[d]. Examples with w_i m_i = 0 (padding)
    are zeroed before multiplying, so NaN/inf there never reaches L or its gradient.
    Domain ids outside [0, D) are rejected when concrete; under ``jit`` they are
    silently dropped (their one-hot row is all zero).

    Args:
      per_example_loss: [B] losses L_i.
      domain_ids: [B] integer domain of each example.
      domain_weights: [D] λ_d >= 0.
      example_weights: [B] w_i >= 0, or None (all 1).
      mask: [B] bool/0-1 padding mask m_i, or None (all 1).
      normalization: 'domain_mean' or 'global_mean'.

    Returns:
      (total scalar L, per_domain [D] contributions with Σ_d per_domain[d] = L).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if jnp.ndim(per_example_loss) != 1:
        raise ValueError(f"per_example_loss must have shape [B], got {jnp.shape(per_example_loss)}")
    batch = jnp.shape(per_example_loss)[0]
    check_shape("domain_ids", domain_ids, (batch,))
    if isinstance(domain_weights, (list, tuple)):
        domain_weights = np.asarray(domain_weights, np.float32)
    if jnp.ndim(domain_weights) != 1:
        raise ValueError(f"domain_weights must have shape [D], got {jnp.shape(domain_weights)}")
    num_domains = jnp.shape(domain_weights)[0]
    check_weights("domain_weights", domain_weights)
    if example_weights is not None:
        check_shape("example_weights", example_weights, (batch,))
        check_weights("example_weights", example_weights)
    if mask is not None:
        check_shape("mask", mask, (batch,))
    if is_concrete(domain_ids) and batch:
        ids = np.asarray(domain_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"domain_ids must be integers, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_domains:
            raise ValueError(f"domain_ids must be in [0, {num_domains}), got range [{lo}, {hi}]")

    dtype = jnp.result_type(per_example_loss, jnp.float32)
    m = jnp.ones((batch,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    w = jnp.ones((batch,), dtype) if example_weights is None else jnp.asarray(example_weights, dtype)
    wm = w * m
    safe_loss = jnp.where(wm != 0, per_example_loss, 0.0)
    onehot = jax.nn.one_hot(domain_ids, num_domains, dtype=dtype)      # [B, D]
    lam = jnp.asarray(domain_weights, dtype)
    num = onehot.T @ (wm * safe_loss)                                  # [D] Σ_{i∈d} w m L
    if normalization == "domain_mean":
        den = onehot.T @ wm                                            # [D] Σ_{i∈d} w m
        per_domain = lam * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    else:
        per_domain = lam * num / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.sum(per_domain), per_domain
