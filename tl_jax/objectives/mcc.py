"""MCC, minimum class confusion (Jin et al. ECCV 2020): ``config.objective.name='mcc'``.

On top of :mod:`tl_jax.objectives.domain_adaptation`, with z_t the target logits::

    L = CE + w·MCC(z_t; T = temperature)

(no extra params; see :func:`mcc_loss`; TLlib's conventions.)
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.objectives._checks import check_2d, check_scalar, config_number
from tl_jax.objectives.base import register
from tl_jax.objectives.classification import entropy
from tl_jax.objectives.domain_adaptation import UnsupervisedDA, target_defaults


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
    check_2d("target_logits", target_logits)
    check_scalar("temperature", temperature, low=0.0, low_open=True)
    b, c = target_logits.shape
    probs = jax.nn.softmax(target_logits.astype(jnp.result_type(target_logits, jnp.float32)) / temperature)
    w = 1.0 + jnp.exp(-jax.lax.stop_gradient(entropy(probs)))
    w = b * w / jnp.sum(w)
    conf = (probs * w[:, None]).T @ probs
    conf = conf / jnp.sum(conf, axis=0, keepdims=True)
    return (jnp.sum(conf) - jnp.trace(conf)) / c


@register
class MCC(UnsupervisedDA):
    """Minimum class confusion (Jin et al. 2020) on the target predictions."""

    name: ClassVar[str] = "mcc"
    defaults: ClassVar[dict] = target_defaults(temperature=2.5)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.temperature = config_number(f"{self.where}.temperature", self.cfg.temperature)
        if self.temperature <= 0:
            raise ValueError(f"{self.where}.temperature must be > 0, got {self.temperature!r}")

    def term(self, params, aux, zs, fs, zt, ft, extra_logits, step):
        return mcc_loss(zt, self.temperature), {}
