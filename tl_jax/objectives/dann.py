"""DANN, domain-adversarial training (Ganin & Lempitsky 2015): ``config.objective.name='dann'``.

On top of :mod:`tl_jax.objectives.domain_adaptation` (target stream, keys, one pass over
``[x_s; x_t]``), with f the chosen layer (``layer``)::

    L = CE + w·L_d(D_ψ(GRL_λ(f_s)), D_ψ(GRL_λ(f_t))),   λ = dann_lambda(step / train.steps, gamma)

The discriminator D_ψ (an MLP, ``hidden`` units × ``depth`` layers, each with
a LayerNorm if ``layer_norm``, one logit) is a trainable extra under
``params['discriminator']``; the gradient reversal layer GRL_λ is the identity
forward and multiplies the gradient reaching the backbone by −λ, so ψ
minimises L_d while the features maximise it. Logged besides the shared
metrics: ``train/da/lambda`` and ``train/da/domain_accuracy``.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tl_jax.objectives._checks import config_int, config_number
from tl_jax.objectives.base import PyTree, register
from tl_jax.objectives.domain_adaptation import (DomainDiscriminator, UnsupervisedDA, dann_lambda, gradient_reversal,
                                                 target_defaults)


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


@register
class DANN(UnsupervisedDA):
    """Domain-adversarial training (Ganin & Lempitsky 2015); see the module docstring."""

    name: ClassVar[str] = "dann"
    defaults: ClassVar[dict] = target_defaults(gamma=10.0, hidden=256, depth=2, layer_norm=True)
    extra_keys: ClassVar[tuple[str, ...]] = ("discriminator",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.gamma = config_number(f"{self.where}.gamma", self.cfg.gamma)
        hidden = config_int(f"{self.where}.hidden", self.cfg.hidden, low=1)
        depth = config_int(f"{self.where}.depth", self.cfg.depth, low=1)
        self.discriminator = DomainDiscriminator(hidden, depth, bool(self.cfg.layer_norm))

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        d, c = self.dims(params)  # (D, C) of a linear or MLP head
        dim = d if self.cfg.layer == "features" else c
        disc = self.discriminator.init(rng, jnp.zeros((1, dim), jnp.float32))["params"]
        return {"discriminator": disc}, {}

    def lam(self, step: jax.Array) -> jax.Array:
        """GRL coefficient λ = 2 / (1 + exp(−γ·p)) − 1, p = step / config.train.steps."""
        return dann_lambda(jnp.asarray(step, jnp.float32) / self.total_steps, self.gamma)

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        fs, ft = self.layer(zs, fs, zt, ft)
        lam = self.lam(step)
        ns = fs.shape[0]
        d = self.discriminator.apply({"params": params["discriminator"]},
                                     gradient_reversal(jnp.concatenate([fs, ft], axis=0), lam))
        term = domain_adversarial_loss(d[:ns], d[ns:])
        correct = jnp.concatenate([d[:ns] > 0, d[ns:] <= 0]).astype(jnp.float32)
        return term, {"train/da/lambda": lam, "train/da/domain_accuracy": jnp.mean(correct)}
