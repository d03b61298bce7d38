"""MDD, margin disparity discrepancy (Zhang et al. ICML 2019): ``config.objective.name='mdd'``.

On top of :mod:`tl_jax.objectives.domain_adaptation`, with z the main head's logits and f the features::

    L = CE + w·MDD(z_s, h'(GRL_λ'(f_s)), z_t, h'(GRL_λ'(f_t)); γ = margin),   λ' = grl_max·dann_lambda(...)

(TLlib's warm start to 0.1). The adversarial head h' (``params['adversary']``:
Dense(hidden) → ReLU → Dense(C), or one Dense with hidden=0) is trained to agree
with the main head on the source and disagree on the target; the features,
through the GRL, to prevent it. Logged besides the shared metrics: ``train/da/lambda``.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.objectives._checks import check_2d, check_scalar, config_int, config_number
from tl_jax.objectives.base import register
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.domain_adaptation import UnsupervisedDA, dann_lambda, gradient_reversal, target_defaults


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
        check_2d(name, x)
    check_scalar("margin", margin, low=0.0, low_open=True)
    ys = jnp.argmax(jax.lax.stop_gradient(logits_source), axis=-1)
    yt = jnp.argmax(jax.lax.stop_gradient(logits_target), axis=-1)
    source = jnp.mean(cross_entropy(adv_logits_source, ys))
    pt = jnp.take_along_axis(jax.nn.softmax(adv_logits_target, axis=-1), yt[:, None], axis=-1)[:, 0]
    target = jnp.mean(jnp.log(jnp.minimum(1.0 - pt + 1e-6, 1.0)))
    return margin * source - target


class AdversarialHead(nn.Module):
    """MDD's auxiliary classifier h': [B, D] -> [B, C] (Dense(hidden) -> ReLU -> Dense(C); hidden=0: linear)."""

    num_classes: int
    hidden: int = 256

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        if self.hidden:
            f = nn.relu(nn.Dense(self.hidden, name="fc0")(f))
        return nn.Dense(self.num_classes, name="out")(f)


@register
class MDD(UnsupervisedDA):
    """Margin disparity discrepancy (Zhang et al. 2019) with an adversarial head behind a GRL."""

    name: ClassVar[str] = "mdd"
    defaults: ClassVar[dict] = target_defaults(margin=4.0, gamma=10.0, grl_max=0.1, hidden=256)
    extra_keys: ClassVar[tuple[str, ...]] = ("adversary",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.margin, self.gamma, self.grl_max = (config_number(f"{self.where}.{k}", self.cfg[k])
                                                 for k in ("margin", "gamma", "grl_max"))
        if self.margin <= 0:
            raise ValueError(f"{self.where}.margin must be > 0, got {self.margin!r}")
        if self.cfg.layer != "features":
            raise ValueError(f"{self.where}.layer must be 'features' (the adversarial head reads the features)")
        self.adversary = AdversarialHead(model.num_classes, config_int(f"{self.where}.hidden", self.cfg.hidden, low=0))

    def init_extra(self, rng, params, batch_stats):
        d, _ = self.dims(params)
        return {"adversary": self.adversary.init(rng, jnp.zeros((1, d), jnp.float32))["params"]}, {}

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        lam = self.grl_max * dann_lambda(jnp.asarray(step, jnp.float32) / self.total_steps, self.gamma)
        adv = self.adversary.apply({"params": params["adversary"]},
                                   gradient_reversal(jnp.concatenate([fs, ft], axis=0), lam))
        ns = zs.shape[0]
        return mdd_loss(zs, adv[:ns], zt, adv[ns:], margin=self.margin), {"train/da/lambda": lam}
