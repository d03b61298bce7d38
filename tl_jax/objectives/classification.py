"""Per-example classification losses and metrics, a padding-aware mean and the prediction entropy.

The plain ``classification`` objective that uses them is :class:`tl_jax.objectives.base.Objective`
(the base every method extends). All functions are pure ``jnp`` and work under
``jit``/``vmap``/``grad``; the per-example outputs are meant to be reduced with
:func:`masked_mean` (padding examples in the last batch get mask 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tl_jax.objectives._checks import check_2d, check_scalar, check_shape


def at_least_f32(x: jax.Array) -> jax.Array:
    """``x`` as float32, or wider if it already is (the losses' accumulation dtype)."""
    return jnp.asarray(x, jnp.result_type(x, jnp.float32))


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
    check_2d("logits", logits)
    check_shape("labels", labels, (jnp.shape(logits)[0],))


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing.

    L_i = − Σ_c q_{i,c} · log softmax(z_i)_c,   q_{i,c} = (1 − ε)·[c = y_i] + ε / C

    i.e. L_i = (1 − ε)·(−log p_{i,y_i}) + ε·(−(1/C) Σ_c log p_{i,c}).

    Args:
      logits: [B, C] unnormalised scores z.
      labels: [B] integer class ids y in [0, C).
      label_smoothing: ε in [0, 1] (0 = plain cross-entropy).

    Returns:
      [B] per-example loss (logits' float dtype).
    """
    _check_logits_labels(logits, labels)
    check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        return nll
    uniform = -jnp.mean(logp, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against soft targets (mixup/cutmix: ``tl_jax.data.mixing``).

    L_i = − Σ_c q_{i,c} · log softmax(z_i)_c,   q_{i,c} = (1 − ε)·t_{i,c} + ε / C

    With one-hot targets t this is :func:`cross_entropy`.

    Args:
      logits: [B, C] unnormalised scores z.
      targets: [B, C] target distributions t (rows summing to 1).
      label_smoothing: ε in [0, 1].

    Returns:
      [B] per-example loss.
    """
    check_2d("logits", logits)
    check_shape("targets", targets, jnp.shape(logits))
    check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    q = (1.0 - label_smoothing) * targets + label_smoothing / jnp.shape(logits)[-1]
    return -jnp.sum(q * logp, axis=-1)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example top-1 correctness.

    a_i = [argmax_c z_{i,c} = y_i] ∈ {0, 1}   (ties: lowest class index wins)

    Args:
      logits: [B, C]; labels: [B] integer class ids.

    Returns:
      [B] float32 array of 0.0 / 1.0.
    """
    _check_logits_labels(logits, labels)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` over the examples with non-zero mask.

    m̄ = Σ_i m_i v_i / max(Σ_i m_i, 1)      (mask None: m_i = 1 for all i)

    The ``max(·, 1)`` makes an all-padding batch give 0 instead of NaN; entries
    with m_i = 0 are zeroed before the product, so NaN/inf in padding is ignored.

    Args:
      values: [B] per-example values.
      mask: [B] bool or float weights in {0, 1} (or None).

    Returns:
      scalar.
    """
    if jnp.ndim(values) != 1:
        raise ValueError(f"values must have shape [B], got {jnp.shape(values)}")
    if mask is None:
        return jnp.mean(values)
    check_shape("mask", mask, jnp.shape(values))
    m = jnp.asarray(mask).astype(jnp.result_type(values, jnp.float32))
    total = jnp.sum(jnp.where(m != 0, m * values, 0.0))
    return total / jnp.maximum(jnp.sum(m), 1.0)


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy per row, H(p) = −Σ_c p_c log p_c (0·log 0 = 0). [B, C] -> [B]."""
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
