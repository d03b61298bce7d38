"""More unsupervised domain adaptation losses: CDAN(+E), MCC, MDD and FixMatch-style self-training.

Each is a pure function of logits / features / discriminator outputs (no model
inside), so the objectives in :mod:`tl_jax.objectives.da_methods` only wire
them to the two-domain forward pass. Conventions follow the Transfer-Learning-Library
(TLlib) implementations the papers' numbers are usually quoted from.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tl_jax.losses._checks import check_scalar
from tl_jax.losses.classification import cross_entropy


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy per row, H(p) = −Σ_c p_c log p_c (0·log 0 = 0). [B, C] -> [B]."""
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)


def _check_2d(name: str, x: jax.Array) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must have shape [B, C], got {jnp.shape(x)}")


# ----------------------------------------------------------------------------- CDAN


def multilinear_map(features: jax.Array, probs: jax.Array) -> jax.Array:
    """CDAN's multilinear conditioning h = f ⊗ g, flattened (Long et al. 2018).

    h_b = vec(g_b f_bᵀ),  i.e. h_b[c·D + d] = g_bc · f_bd.   [B, D], [B, C] -> [B, C·D]
    """
    _check_2d("features", features)
    _check_2d("probs", probs)
    b, d = features.shape
    return (probs[:, :, None] * features[:, None, :]).reshape(b, probs.shape[1] * d)


def randomized_multilinear_map(features: jax.Array, probs: jax.Array, r_f: jax.Array, r_g: jax.Array
                               ) -> jax.Array:
    """CDAN's randomized multilinear map for large C·D: h = (f R_f) ⊙ (g R_g) / √d_out.

    ``r_f`` [D, d_out], ``r_g`` [C, d_out]: fixed random (e.g. Gaussian) matrices. -> [B, d_out]
    """
    _check_2d("features", features)
    _check_2d("probs", probs)
    return (features @ r_f) * (probs @ r_g) / jnp.sqrt(jnp.asarray(r_f.shape[1], features.dtype))


def cdan_loss(domain_logits_source: jax.Array, domain_logits_target: jax.Array, probs_source: jax.Array,
              probs_target: jax.Array, *, entropy_conditioning: bool = False) -> jax.Array:
    """Conditional domain-adversarial loss (CDAN, Long et al. NeurIPS 2018), optionally +E.

    With z = D(GRL(h)) the discriminator logits of h = f ⊗ g over the pooled batch
    of N = B_s + B_t examples (source label 1, target label 0)::

        L = Σ_n w̃_n · BCE(z_n, y_n) / N,
        w_n = 1 + exp(−H(g_n))   (+E)   or   w_n = 1,   w̃_n = N · w_n / Σ_m w_m

    H is the entropy of the (gradient-stopped) softmax prediction g, so confident
    examples weigh more ("entropy conditioning"); the weights are normalised to
    mean 1 over the pooled batch, as in TLlib. Without +E this is the plain
    mean BCE over the pooled batch.

    Args:
      domain_logits_source / _target: [B_s], [B_t] discriminator logits.
      probs_source / _target: [B_s, C], [B_t, C] softmax predictions g (stopped here).
      entropy_conditioning: the +E weighting.

    Returns:
      scalar.
    """
    z = jnp.concatenate([jnp.reshape(domain_logits_source, (-1,)), jnp.reshape(domain_logits_target, (-1,))])
    y = jnp.concatenate([jnp.ones(jnp.size(domain_logits_source)), jnp.zeros(jnp.size(domain_logits_target))])
    bce = optax.sigmoid_binary_cross_entropy(z, y.astype(z.dtype))
    if not entropy_conditioning:
        return jnp.mean(bce)
    g = jax.lax.stop_gradient(jnp.concatenate([probs_source, probs_target], axis=0))
    w = 1.0 + jnp.exp(-entropy(g))
    w = w * z.shape[0] / jnp.sum(w)
    return jnp.mean(w * bce)


# ----------------------------------------------------------------------------- MCC


def mcc_loss(target_logits: jax.Array, temperature: float = 2.5) -> jax.Array:
    """Minimum class confusion (Jin et al. ECCV 2020) on unlabelled target logits [B, C].

    Ŷ = softmax(z / T)                                  (temperature rescaling)
    w_b = 1 + exp(−H(Ŷ_b)),  W = diag(B · w / Σ w)        (entropy weighting, gradient-stopped)
    C = Ŷᵀ W Ŷ                                            [C, C] class correlation
    C̃_jj' = C_jj' / Σ_j'' C_j''j'                         (category normalisation)
    L = (Σ_jj' C̃_jj' − Σ_j C̃_jj) / C                     (between-class confusion)

    Returns:
      scalar in [0, 1): 0 when every prediction is one-hot.
    """
    _check_2d("target_logits", target_logits)
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    b, c = target_logits.shape
    probs = jax.nn.softmax(target_logits.astype(jnp.result_type(target_logits, jnp.float32)) / temperature)
    w = 1.0 + jnp.exp(-jax.lax.stop_gradient(entropy(probs)))
    w = b * w / jnp.sum(w)
    conf = (probs * w[:, None]).T @ probs
    conf = conf / jnp.sum(conf, axis=0, keepdims=True)
    return (jnp.sum(conf) - jnp.trace(conf)) / c


# ----------------------------------------------------------------------------- MDD


def mdd_loss(logits_source: jax.Array, adv_logits_source: jax.Array, logits_target: jax.Array,
             adv_logits_target: jax.Array, *, margin: float = 4.0) -> jax.Array:
    """Margin disparity discrepancy, the minimised "transfer loss" (Zhang et al. ICML 2019; TLlib's form).

    ŷ = argmax of the main head's logits (no gradient), p' = softmax of the adversarial
    head h' (which sits behind a gradient reversal layer)::

        L = γ · (1/B_s) Σ_i CE(h'(x_i), ŷ_i) − (1/B_t) Σ_j log(1 − p'_j[ŷ_j] + ε),   ε = 1e-6 (clipped at 0)

    Minimising L over h' makes it agree with the main head on the source and
    disagree on the target (the disparity on the target is the log-loss of
    "not ŷ"); through the GRL the features maximise it, i.e. shrink the
    discrepancy. γ = ``margin`` (> 0; TLlib uses 4 on Office-31).

    Args:
      logits_source / logits_target: [B_s, C], [B_t, C] main-head logits.
      adv_logits_source / adv_logits_target: the adversarial head's logits, same shapes.

    Returns:
      scalar.
    """
    for name, x in (("logits_source", logits_source), ("adv_logits_source", adv_logits_source),
                    ("logits_target", logits_target), ("adv_logits_target", adv_logits_target)):
        _check_2d(name, x)
    check_scalar("margin", margin, low=0.0, low_open=True)
    ys = jnp.argmax(jax.lax.stop_gradient(logits_source), axis=-1)
    yt = jnp.argmax(jax.lax.stop_gradient(logits_target), axis=-1)
    source = jnp.mean(cross_entropy(adv_logits_source, ys))
    pt = jnp.take_along_axis(jax.nn.softmax(adv_logits_target, axis=-1), yt[:, None], axis=-1)[:, 0]
    target = jnp.mean(jnp.log(jnp.minimum(1.0 - pt + 1e-6, 1.0)))
    return margin * source - target


# ----------------------------------------------------------------------------- self-training


def fixmatch_loss(weak_logits: jax.Array, strong_logits: jax.Array, *, threshold: float = 0.95
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FixMatch-style pseudo-label loss on unlabelled data (Sohn et al. NeurIPS 2020).

    p_b = softmax(z^weak_b) (gradient-stopped), ŷ_b = argmax p_b, m_b = [max_c p_bc ≥ τ]::

        L = (1/B) Σ_b m_b · CE(z^strong_b, ŷ_b)

    (mean over ALL B examples, masked ones contributing 0, as in the paper).

    Args:
      weak_logits, strong_logits: [B, C] logits of the weakly / strongly augmented views.
      threshold: τ ∈ [0, 1].

    Returns:
      ``(L, {'mask_rate': mean m, 'pseudo_labels': ŷ [B]})``.
    """
    _check_2d("weak_logits", weak_logits)
    _check_2d("strong_logits", strong_logits)
    if jnp.shape(weak_logits) != jnp.shape(strong_logits):
        raise ValueError(f"strong_logits must have the shape of weak_logits {jnp.shape(weak_logits)}, "
                         f"got {jnp.shape(strong_logits)}")
    check_scalar("threshold", threshold, low=0.0, high=1.0)
    p = jax.nn.softmax(jax.lax.stop_gradient(weak_logits).astype(jnp.float32), axis=-1)
    pseudo = jnp.argmax(p, axis=-1)
    mask = (jnp.max(p, axis=-1) >= threshold).astype(jnp.float32)
    loss = jnp.mean(mask * cross_entropy(strong_logits, pseudo))
    return loss, {"mask_rate": jnp.mean(mask), "pseudo_labels": pseudo}
