"""Co-Tuning, the source head trained on translated labels (You et al. NeurIPS 2020): ``co_tuning``.

A :class:`~tl_jax.objectives.feature_regularized.FeatureRegularized` objective::

    L = CE + w·(1/B) Σ_b −Σ_k M[y_b, k] log softmax(h_s(f_b))_k      (w = 2.3)

* ``co_tuning``: the source head h_s (``params['source_head']``, trainable,
  initialised from the head of checkpoint ``source``, '' = ``config.init_from``)
  is trained on soft targets from the relationship M = p(y_s | y_t)
  [C_t, K_s]: the mean of the pretrained model's source-class softmax over the
  target TRAINING examples of each class (those the run trains on: shots /
  validation carve-out applied), computed ONCE at build time (one inference
  pass over the training examples with ``config.data.eval_pp``: a one-off cost
  of about one epoch of forward passes, then nothing per step beyond the extra
  head) and stored in ``state.aux['co_tuning_relationship']``.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.models import model_from_config
from tl_jax.models.heads import head_dims
from tl_jax.objectives.base import PyTree, apply_model, register
from tl_jax.objectives.classification import at_least_f32
from tl_jax.objectives.feature_regularized import FeatureRegularized, training_outputs
from tl_jax.peft.merge_run import folded
from tl_jax.train.checkpoint import load_variables


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
    sums = onehot.T @ at_least_f32(source_probs)                             # [C_t, K_s]
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
    soft = jax.lax.stop_gradient(at_least_f32(relationship))[labels]
    return -jnp.mean(jnp.sum(soft * jax.nn.log_softmax(at_least_f32(source_logits), axis=-1), axis=-1))


@register
class CoTuning(FeatureRegularized):
    """Co-Tuning: the source head trained on soft targets p(y_s | y_t) (see the module docstring)."""

    name: ClassVar[str] = "co_tuning"
    defaults: ClassVar[dict] = {"weight": 2.3, "source": "", "batch_size": 256}
    extra_keys: ClassVar[tuple[str, ...]] = ("source_head",)
    AUX: ClassVar[str] = "co_tuning_relationship"

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.source = str(self.cfg.source or config.init_from or "")
        if not self.source:
            raise ValueError(f"{self.where}.source is empty and so is config.init_from: name the pretrained "
                             f"checkpoint whose head gives the source classes")

    def source_model(self, source_head: PyTree):
        """``config.model`` with the source head's number of classes (read from its params' shapes)."""
        return model_from_config(self.config.model, head_dims(source_head)[1])

    def init_extra(self, rng, params, batch_stats):
        loaded = folded(load_variables(self.source, where=f"{self.where}.source"), self.source,
                        f"{self.where}.source")  # a LoRA run: its adapters folded in (exact)
        dims = head_dims(loaded["params"].get("head", {}))
        if dims is None:
            raise ValueError(f"{self.where}.source={self.source!r} has no head/kernel (or head/logits/kernel)")
        source_head = jax.tree.map(lambda x: np.array(x, copy=True), loaded["params"]["head"])
        source_model = self.source_model(source_head)
        source = ({**self.model_params(params), "head": source_head}, batch_stats)
        probs, labels = training_outputs(
            self.config, lambda v, b: jax.nn.softmax(apply_model(source_model, *v, b, train=False)[0]), source,
            int(self.cfg.batch_size))
        rel = category_relationship(jnp.asarray(probs), jnp.asarray(labels), self.model.num_classes)
        return {"source_head": source_head}, {self.AUX: np.asarray(rel)}

    def term(self, params, aux, batch, features, rng):
        head = params["source_head"]
        s = self.source_model(head).apply({"params": {"head": head}}, features, train=True,
                                          rngs={"dropout": rng} if rng is not None else {}, method="head_logits")
        return co_tuning_loss(s, batch["label"], aux[self.AUX])
