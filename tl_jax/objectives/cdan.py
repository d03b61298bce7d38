"""CDAN(+E), conditional domain-adversarial network (Long et al. NeurIPS 2018): ``config.objective.name='cdan'``.

On top of :mod:`tl_jax.objectives.domain_adaptation`, with f the features, g = softmax of the logits z
(gradient-stopped), w = ``weight``::

    L = CE + w·CDAN(D_ψ(GRL_λ(f ⊗ g)))   (+E: entropy=True; randomized_dim > 0: (f R_f) ⊙ (g R_g) / √d)

λ = dann_lambda(step / train.steps, gamma). The discriminator
(``params['discriminator']``, the DANN MLP) reads the C·D-dim map (or
``randomized_dim``; the fixed random matrices R_f, R_g live in
``state.aux['cdan_random']``). The full map is C·D wide (5,120 for 10 classes
and the small CNN), which makes the discriminator's first layer as costly as
the CNN itself (about 2x a plain step in ``benchmarks/methods_bench.py``);
``randomized_dim=1024`` brings it to ~1.5x. Conventions follow the
Transfer-Learning-Library (TLlib). Logged besides the shared metrics:
``train/da/lambda``, ``train/da/domain_accuracy``.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tl_jax.objectives._checks import check_2d, config_int
from tl_jax.objectives.base import register
from tl_jax.objectives.classification import entropy
from tl_jax.objectives.dann import DANN
from tl_jax.objectives.domain_adaptation import gradient_reversal, target_defaults


def multilinear_map(features: jax.Array, probs: jax.Array) -> jax.Array:
    """CDAN's multilinear conditioning h = f ⊗ g, flattened (Long et al. 2018).

    h_b = vec(g_b f_bᵀ),  i.e. h_b[c·D + d] = g_bc · f_bd.   [B, D], [B, C] -> [B, C·D]
    """
    check_2d("features", features)
    check_2d("probs", probs)
    b, d = features.shape
    return (probs[:, :, None] * features[:, None, :]).reshape(b, probs.shape[1] * d)


def randomized_multilinear_map(features: jax.Array, probs: jax.Array, r_f: jax.Array, r_g: jax.Array
                               ) -> jax.Array:
    """CDAN's randomized multilinear map for large C·D: h = (f R_f) ⊙ (g R_g) / √d_out.

    ``r_f`` [D, d_out], ``r_g`` [C, d_out]: fixed random (e.g. Gaussian) matrices. -> [B, d_out]
    """
    check_2d("features", features)
    check_2d("probs", probs)
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


@register
class CDAN(DANN):
    """Conditional domain-adversarial network (Long et al. 2018), +E with ``entropy=True``: DANN's
    discriminator and λ on the map h of features and predictions."""

    name: ClassVar[str] = "cdan"
    defaults: ClassVar[dict] = target_defaults(entropy=True, gamma=10.0, hidden=256, depth=2, layer_norm=True,
                                               randomized_dim=0)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.randomized_dim = config_int(f"{self.where}.randomized_dim", self.cfg.randomized_dim, low=0)
        if not isinstance(self.cfg.entropy, bool):
            raise ValueError(f"{self.where}.entropy must be true or false, got {self.cfg.entropy!r}")

    def init_extra(self, rng, params, batch_stats):
        d, c = self.dims(params)
        d = c if self.cfg.layer == "logits" else d
        aux = {}
        if self.randomized_dim:
            rf, rg = jax.random.split(jax.random.fold_in(rng, 7))
            aux["cdan_random"] = {"r_f": jax.random.normal(rf, (d, self.randomized_dim)),
                                  "r_g": jax.random.normal(rg, (c, self.randomized_dim))}
        width = self.randomized_dim or c * d
        disc = self.discriminator.init(rng, jnp.zeros((1, width), jnp.float32))["params"]
        return {"discriminator": disc}, aux

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        if self.cfg.layer == "logits":
            fs, ft = zs, zt
        lam = self.lam(step)
        f = jnp.concatenate([fs, ft], axis=0)
        g = jax.lax.stop_gradient(jax.nn.softmax(jnp.concatenate([zs, zt], axis=0).astype(jnp.float32)))
        f = gradient_reversal(f, lam)
        if self.randomized_dim:
            h = randomized_multilinear_map(f, g, aux["cdan_random"]["r_f"], aux["cdan_random"]["r_g"])
        else:
            h = multilinear_map(f, g)
        d = self.discriminator.apply({"params": params["discriminator"]}, h)
        ns = zs.shape[0]
        term = cdan_loss(d[:ns], d[ns:], g[:ns], g[ns:], entropy_conditioning=self.cfg.entropy)
        correct = jnp.concatenate([d[:ns] > 0, d[ns:] <= 0]).astype(jnp.float32)
        return term, {"train/da/lambda": lam, "train/da/domain_accuracy": jnp.mean(correct)}
