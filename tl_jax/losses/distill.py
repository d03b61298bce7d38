"""Knowledge distillation loss (Hinton, Vinyals & Dean, 2015).

The student matches the temperature-softened teacher distribution; the T² factor
keeps the soft-target gradient magnitude independent of T (soft-target
gradients scale as 1/T²).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tl_jax.losses._checks import check_scalar, check_shape
from tl_jax.losses.classification import cross_entropy


def kl_softmax(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-example KL(softmax(t/T) ‖ softmax(s/T)).

    KL_i = Σ_c p_{i,c} (log p_{i,c} − log q_{i,c}),  p = softmax(t_i/T), q = softmax(s_i/T)

    Terms with p_{i,c} = 0 contribute 0. Shapes: [B, C], [B, C] -> [B].
    """
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array | None, *,
                      alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinton distillation: hard-label CE plus temperature-scaled KL to the teacher.

    L_i = α · CE(y_i, s_i) + (1 − α) · T² · KL(softmax(t_i/T) ‖ softmax(s_i/T))

    CE uses the student's logits at temperature 1. The teacher logits pass through
    ``jax.lax.stop_gradient`` (no gradient reaches the teacher).

    Args:
      student_logits: [B, C] s.
      teacher_logits: [B, C] t.
      labels: [B] integer y, or None for unlabelled data (then α must be 0 and
        'ce' is all zeros).
      alpha: α ∈ [0, 1], weight of the hard-label term.
      temperature: T > 0.

    Returns:
      (per-example L [B], {'ce': CE_i [B], 'kd': T²·KL_i [B]}), so
      L = α·ce + (1 − α)·kd.
    """
    if jnp.ndim(student_logits) != 2:
        raise ValueError(f"student_logits must have shape [B, C], got {jnp.shape(student_logits)}")
    check_shape("teacher_logits", teacher_logits, jnp.shape(student_logits))
    check_scalar("alpha", alpha, low=0.0, high=1.0)
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if labels is None:
        if not (isinstance(alpha, (int, float)) and alpha == 0):
            raise ValueError(f"alpha must be 0 when labels is None (unlabelled), got {alpha!r}")
        ce = jnp.zeros(jnp.shape(student_logits)[:1], jnp.result_type(student_logits, jnp.float32))
    else:
        ce = cross_entropy(student_logits, labels)
    kd = temperature ** 2 * kl_softmax(teacher_logits, student_logits, temperature)
    return alpha * ce + (1.0 - alpha) * kd, {"ce": ce, "kd": kd}
