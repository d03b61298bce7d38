"""Fine-tuning regularisers beyond parameter norms: BSS, DELTA and Co-Tuning; and feature distillation
(FitNets hint loss, attention transfer).

Pure functions of features / logits; the objectives in
:mod:`tl_jax.objectives.finetune_methods` and :mod:`tl_jax.objectives.feature_distill`
wire them to the model and to the constants in ``state.aux``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tl_jax.losses._checks import check_scalar


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.result_type(x, jnp.float32))


# ----------------------------------------------------------------------------- BSS


def bss_loss(features: jax.Array, k: int = 1) -> jax.Array:
    """Batch spectral shrinkage (Chen et al. NeurIPS 2019).

    L = Σ_{i=1}^{k} σ²_{−i}(F),   F [B, D] the batch feature matrix, σ_{−i} its i-th
    SMALLEST singular value (of the min(B, D) ones). The σ² are computed as the
    eigenvalues of the smaller Gram matrix (F Fᵀ [B, B] when B <= D) with
    ``jnp.linalg.eigvalsh``: the same values as ``jnp.linalg.svd`` and their
    gradient 2σ·u vᵀ, several times cheaper on a CPU than the SVD of [B, D].

    Penalising the small singular values suppresses the feature directions that
    are not transferable (the paper's negative-transfer argument). The paper
    uses k = 1 and a weight η = 0.001.

    Args:
      features: [B, D]; k: 1 <= k <= min(B, D).

    Returns:
      scalar.
    """
    if jnp.ndim(features) != 2:
        raise ValueError(f"features must have shape [B, D], got {jnp.shape(features)}")
    n = min(jnp.shape(features))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, min(B, D) = {n}], got {k!r}")
    f = _f32(features)
    gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f   # [n, n], n = min(B, D): eigenvalues σ_i²
    eig = jnp.linalg.eigvalsh(gram)                           # ascending
    return jnp.sum(jnp.maximum(eig[:k], 0.0))


# ----------------------------------------------------------------------------- DELTA


def delta_loss(features: jax.Array, pretrained_features: jax.Array, attention: jax.Array | None = None
               ) -> jax.Array:
    """DELTA's behavioural regulariser (Li et al. ICLR 2019): attention-weighted feature-map distance
    to the pretrained network on the same inputs.

    With channels c on the last axis and every other non-batch axis (spatial
    positions) summed::

        L = (1/B) Σ_b Σ_c w_c · ‖FM_bc(θ, x_b) − FM_bc(θ*, x_b)‖²

    θ* = the pretrained weights (``pretrained_features`` is gradient-stopped);
    w = ``attention`` [C] (None: w_c = 1, the paper's unweighted "L2-FE" variant).
    DELTA's supervised attention (how much the pretrained model's loss grows
    when channel c is removed, softmax-normalised) is :func:`delta_attention`.

    Args:
      features / pretrained_features: [B, C] or [B, ..., C], same shape.
      attention: optional [C] non-negative weights.

    Returns:
      scalar.
    """
    if jnp.shape(features) != jnp.shape(pretrained_features) or jnp.ndim(features) < 2:
        raise ValueError(f"features and pretrained_features must have one shape [B, ..., C], got "
                         f"{jnp.shape(features)} and {jnp.shape(pretrained_features)}")
    diff = _f32(features) - jax.lax.stop_gradient(_f32(pretrained_features))
    per_channel = jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1, diff.shape[-1]), axis=1)   # [B, C]
    if attention is not None:
        if jnp.shape(attention) != (diff.shape[-1],):
            raise ValueError(f"attention must have shape [C] = ({diff.shape[-1]},), got {jnp.shape(attention)}")
        per_channel = per_channel * jax.lax.stop_gradient(attention)[None, :]
    return jnp.sum(per_channel) / diff.shape[0]


def channel_loss_increase(features: jax.Array, labels: jax.Array, kernel: jax.Array, bias: jax.Array,
                          chunk_elements: int = 2**24) -> jax.Array:
    """DELTA's per-channel loss increase of a linear head: ΔL_c = CE(f with channel c zeroed) − CE(f).

    With z = f W + b [N, K] and p = softmax(z), zeroing channel c of example n
    moves its logits by −f_nc W_c, so every channel at once ([N, D, K], no loop)::

        ΔCE_nc = log Σ_k p_nk exp(−f_nc W_ck) + f_nc W_{c, y_n}      ΔL_c = (1/N) Σ_n ΔCE_nc

    (the difference written out, not two cross-entropies subtracted: the
    increases are small next to the CE itself). Rows are processed in chunks
    of about ``chunk_elements`` [n, D, K] entries, so memory stays bounded.

    Args:
      features: [N, D]; labels: [N] ints in [0, K); kernel: [D, K]; bias: [K].

    Returns:
      [D] float32.
    """
    f, w, b = _f32(features), _f32(kernel), _f32(bias)
    if f.ndim != 2 or w.shape != (f.shape[1], b.shape[-1]) or jnp.shape(labels) != f.shape[:1]:
        raise ValueError(f"features [N, D], labels [N], kernel [D, K], bias [K] must agree, got {f.shape}, "
                         f"{jnp.shape(labels)}, {w.shape}, {b.shape}")
    n, d = f.shape
    rows = max(1, chunk_elements // max(1, d * w.shape[1]))
    total = jnp.zeros((d,), jnp.float32)
    for i in range(0, n, rows):
        total = total + _loss_increase_sum(f[i:i + rows], jnp.asarray(labels[i:i + rows]), w, b)
    return total / n


@jax.jit
def _loss_increase_sum(f: jax.Array, y: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(f @ w + b, axis=-1)                                        # [n, K]
    shifted = jax.nn.logsumexp(log_p[:, None, :] - f[:, :, None] * w[None], axis=-1)      # [n, D]
    return jnp.sum(shifted + f * w[:, y].T, axis=0)


def delta_attention(loss_increase: jax.Array, temperature: float = 1.0, standardize: bool = False) -> jax.Array:
    """DELTA's supervised channel attention: w = C · softmax(s / T).

    s = ΔL, or its z-score (ΔL − mean ΔL) / std ΔL with ``standardize`` (as
    TLlib's DELTA does, with T = 5: the raw increases of one channel out of
    hundreds are tiny and their scale depends on the data, so a fixed T means
    the same sharpness on every task; equal ΔL give s = 0, uniform weights).
    ΔL_c = (loss of the pretrained model with channel c zeroed) − (its loss), [C]
    (:func:`channel_loss_increase`); the weights sum to C (mean 1), so the
    scale matches the unweighted variant.
    """
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    x = _f32(loss_increase)
    if standardize:
        x = x - jnp.mean(x)
        std = jnp.sqrt(jnp.mean(jnp.square(x)))
        x = jnp.where(std > 0, x / jnp.where(std > 0, std, 1.0), 0.0)
    return x.shape[-1] * jax.nn.softmax(x / temperature)


# ----------------------------------------------------------------------------- Co-Tuning


def category_relationship(source_probs: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Co-Tuning's source-category relationship p(y_s | y_t) (You et al. NeurIPS 2020, direct approach).

    M[t] = mean of the pretrained source head's softmax p(y_s | x) over the target
    training examples of class t:  M[t] = Σ_{b: y_b = t} p_b / n_t.   [N, K_s], [N] -> [C_t, K_s]

    A class with no example gets the uniform row 1/K_s. Rows sum to 1.
    """
    if jnp.ndim(source_probs) != 2 or jnp.shape(labels) != jnp.shape(source_probs)[:1]:
        raise ValueError(f"source_probs [N, K_s] and labels [N] must agree, got {jnp.shape(source_probs)} "
                         f"and {jnp.shape(labels)}")
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)   # [N, C_t]
    sums = onehot.T @ _f32(source_probs)                             # [C_t, K_s]
    counts = jnp.sum(onehot, axis=0)[:, None]
    uniform = jnp.full_like(sums, 1.0 / source_probs.shape[1])
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), uniform)


def co_tuning_loss(source_logits: jax.Array, labels: jax.Array, relationship: jax.Array) -> jax.Array:
    """Co-Tuning's source-head term: soft cross-entropy against the translated labels.

    L = (1/B) Σ_b −Σ_k M[y_b, k] · log softmax(s_b)_k,   s = source-head logits [B, K_s], M [C_t, K_s].
    """
    if jnp.ndim(source_logits) != 2 or jnp.shape(relationship)[1:] != jnp.shape(source_logits)[1:]:
        raise ValueError(f"relationship [C_t, K_s] must match source_logits [B, K_s], got "
                         f"{jnp.shape(relationship)} and {jnp.shape(source_logits)}")
    soft = jax.lax.stop_gradient(_f32(relationship))[labels]
    return -jnp.mean(jnp.sum(soft * jax.nn.log_softmax(_f32(source_logits), axis=-1), axis=-1))


# ----------------------------------------------------------------------------- feature distillation


def hint_loss(student_projected: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """FitNets hint loss (Romero et al. ICLR 2015): L = (1/B) Σ_b ½‖r(s_b) − t_b‖².

    ``student_projected`` = the learned regressor r applied to the student's
    features (shape of the teacher's), teacher gradient-stopped. [B, ...] -> scalar.
    """
    if jnp.shape(student_projected) != jnp.shape(teacher_features):
        raise ValueError(f"the projected student features {jnp.shape(student_projected)} must have the teacher "
                         f"features' shape {jnp.shape(teacher_features)}")
    diff = _f32(student_projected) - jax.lax.stop_gradient(_f32(teacher_features))
    return 0.5 * jnp.sum(jnp.square(diff)) / diff.shape[0]


def attention_map(features: jax.Array, p: float = 2.0) -> jax.Array:
    """Attention transfer's spatial map: Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂.

    [B, H, W, C] -> [B, H·W]; a vector feature [B, D] (no spatial axes) gives
    Q_b = |f_b|^p / ‖|f_b|^p‖₂ over its D entries (the map of a 1x1xD "image").
    """
    x = _f32(features)
    if x.ndim == 2:
        q = jnp.abs(x) ** p
    elif x.ndim >= 3:
        q = jnp.sum(jnp.abs(x) ** p, axis=-1).reshape(x.shape[0], -1)
    else:
        raise ValueError(f"features must be [B, D] or [B, H, W, C], got {jnp.shape(features)}")
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def attention_transfer_loss(student_features: jax.Array, teacher_features: jax.Array, p: float = 2.0
                            ) -> jax.Array:
    """Attention transfer (Zagoruyko & Komodakis ICLR 2017): L = (1/B) Σ_b ‖Q^S_b − Q^T_b‖₂²
    (the squared L2 distance, as in the authors' code; no channel matching needed,
    only equal spatial sizes). Teacher gradient-stopped."""
    qs, qt = attention_map(student_features, p), attention_map(jax.lax.stop_gradient(teacher_features), p)
    if qs.shape != qt.shape:
        raise ValueError(f"student and teacher attention maps differ in size: {qs.shape} vs {qt.shape}")
    return jnp.sum(jnp.square(qs - qt)) / qs.shape[0]
