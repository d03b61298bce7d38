"""Feature distillation: FitNets hints with a learned projection and attention transfer, alone or added to
Hinton's logit KD (``config.objective.name='feature_distill'``).

Config group ``config.objective.feature_distill``: the teacher keys of
``distill`` (``teacher``, ``teacher_model``, ``teacher_kwargs``, ``alpha``,
``temperature``; the teacher in ``state.aux['teacher']``, inference mode) and

* ``student_layer`` / ``teacher_layer``: ``'features'`` (the backbone output fed
  to the head, [B, D]) or a module path such as ``'backbone/conv2'`` (its
  output, captured with flax ``capture_intermediates``; [B, H, W, C] for a conv);
* ``hint_weight`` β (FitNets, Romero et al. 2015) and ``at_weight`` γ
  (attention transfer, Zagoruyko & Komodakis 2017; ``at_p`` the power p);
* ``logit_kd``: add Hinton's loss (true) or use plain cross-entropy (false)::

      L = mean_b[α·CE + (1 − α)·T²·KL]  (logit_kd)  or  CE
          + β·(1/B) Σ_b ½‖r(s_b) − t_b‖² + γ·(1/B) Σ_b ‖Q(s_b) − Q(t_b)‖²

  s, t: the student's / teacher's chosen layer outputs; r: a learned linear
  projection of the last axis (a 1x1 convolution on a feature map) to the
  teacher's width, trainable params under ``params['projection']`` (created
  only when β > 0); Q: the normalised attention map
  (:func:`attention_map`; needs equal spatial sizes).

Logged besides ``distill``'s: ``train/hint``, ``train/at`` (unweighted).
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.models.heads import head_dims
from tl_jax.objectives._checks import config_number
from tl_jax.objectives.base import Batch, PyTree, model_inputs, register
from tl_jax.objectives.classification import accuracy, at_least_f32, cross_entropy
from tl_jax.objectives.distill import DistillObjective, distillation_loss

KEY = "config.objective.feature_distill"


def hint_loss(student_projected: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """FitNets hint loss (Romero et al. ICLR 2015): L = (1/B) Σ_b ½‖r(s_b) − t_b‖².

    ``student_projected`` = the learned regressor r applied to the student's
    features (shape of the teacher's), teacher gradient-stopped. [B, ...] -> scalar.
    """
    if jnp.shape(student_projected) != jnp.shape(teacher_features):
        raise ValueError(f"the projected student features {jnp.shape(student_projected)} must have the teacher "
                         f"features' shape {jnp.shape(teacher_features)}")
    diff = at_least_f32(student_projected) - jax.lax.stop_gradient(at_least_f32(teacher_features))
    return 0.5 * jnp.sum(jnp.square(diff)) / diff.shape[0]


def attention_map(features: jax.Array, p: float = 2.0) -> jax.Array:
    """Attention transfer's spatial map: Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂.

    [B, H, W, C] -> [B, H·W]; a vector feature [B, D] (no spatial axes) gives
    Q_b = |f_b|^p / ‖|f_b|^p‖₂ over its D entries (the map of a 1x1xD "image").
    """
    x = at_least_f32(features)
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


def layer_outputs(model: nn.Module, variables: dict, batch: Batch, layer: str, *, train: bool,
                  rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, PyTree]:
    """``(logits, output of layer, new batch_stats)``; ``layer`` = 'features' or a module path."""
    args, kw = model_inputs(batch)
    mutable = ["batch_stats"] if train and "batch_stats" in variables else []
    rngs = {"dropout": rng} if rng is not None else {}
    if layer == "features":
        out = model.apply(variables, *args, train=train, rngs=rngs, mutable=mutable or False, return_features=True,
                          **kw)
        (logits, feats), new = out if mutable else (out, {})
        return logits, feats, new.get("batch_stats", variables.get("batch_stats", {}))
    path = tuple(layer.split("/"))
    logits, new = model.apply(variables, *args, train=train, rngs=rngs, mutable=mutable + ["intermediates"],
                              capture_intermediates=lambda m, method: m.path == path and method == "__call__",
                              **kw)
    node = new.get("intermediates", {})
    for k in path:
        if k not in node:
            raise ValueError(f"{KEY}: layer {layer!r} is not a module path of the model (no output captured)")
        node = node[k]
    return logits, node["__call__"][0], new.get("batch_stats", variables.get("batch_stats", {}))


def projection(width: int) -> nn.Module:
    """FitNets' regressor r: a linear map of the last axis to the teacher's ``width`` (a 1x1 conv on a map)."""
    return nn.Dense(width, use_bias=False)


@register
class FeatureDistill(DistillObjective):
    """FitNets hints + attention transfer (+ optional logit KD); see the module docstring."""

    name: ClassVar[str] = "feature_distill"
    defaults: ClassVar[dict] = {**DistillObjective.defaults, "student_layer": "features",
                                "teacher_layer": "features", "hint_weight": 1.0, "at_weight": 0.0, "at_p": 2.0,
                                "logit_kd": True}
    extra_keys: ClassVar[tuple[str, ...]] = ("projection",)

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        c = config.objective.feature_distill
        proxy = config.copy_and_resolve_references()
        with proxy.unlocked():  # the parent validates the teacher keys from the 'distill' group
            proxy.objective.distill = {k: c[k] for k in DistillObjective.defaults}
        super().__init__(proxy, model)
        self.config = config
        self.hint_weight, self.at_weight, self.at_p = (config_number(f"{KEY}.{k}", c[k])
                                                       for k in ("hint_weight", "at_weight", "at_p"))
        if not isinstance(c.logit_kd, bool):
            raise ValueError(f"{KEY}.logit_kd must be true or false, got {c.logit_kd!r}")
        self.logit_kd = c.logit_kd
        self.student_layer, self.teacher_layer = str(c.student_layer), str(c.teacher_layer)

    def teacher_outputs(self, aux: PyTree, batch: Batch) -> tuple[jax.Array, jax.Array]:
        t = aux["teacher"]
        variables = {"params": t["params"], **({"batch_stats": t["batch_stats"]} if t.get("batch_stats") else {})}
        logits, feats, _ = layer_outputs(self.teacher_model, variables, batch, self.teacher_layer, train=False)
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(feats)

    def init_extra(self, rng, params, batch_stats):
        extra, aux = super().init_extra(rng, params, batch_stats)
        if self.hint_weight > 0:
            d_s = self._width(self.model_params(params), self.student_layer, "student_layer")
            d_t = self._width(aux["teacher"]["params"], self.teacher_layer, "teacher_layer")
            extra = {**extra, "projection": projection(d_t).init(rng, jnp.zeros((1, d_s)))["params"]}
        return extra, aux

    @staticmethod
    def _width(params: PyTree, layer: str, key: str) -> int:
        """Size of the last axis of ``layer``'s output: the head's input size for 'features', else the
        last axis of that module's ``kernel`` (a Dense or Conv)."""
        if layer == "features":
            dims = head_dims(params.get("head", {}))
            if dims is None:
                raise ValueError(f"{KEY}.{key}='features': the model has no head/kernel to read the width from")
            return dims[0]
        node = params
        for k in layer.split("/"):
            if not isinstance(node, dict) or k not in node:
                raise ValueError(f"{KEY}.{key}={layer!r} is not a module path of the model's params")
            node = node[k]
        if "kernel" not in node:
            raise ValueError(f"{KEY}.{key}={layer!r} has no kernel to read its output width from (use a Dense "
                             f"or Conv layer, or 'features')")
        return int(np.shape(node["kernel"])[-1])

    def objective_loss(self, params, batch_stats, aux, batch, rng, step):
        variables = {"params": self.model_params(params), **({"batch_stats": batch_stats} if batch_stats else {})}
        student, fs, batch_stats = layer_outputs(self.model, variables, batch, self.student_layer, train=True,
                                                 rng=rng)
        teacher, ft = self.teacher_outputs(aux, batch)
        if self.logit_kd:
            per_example, parts = distillation_loss(student, teacher, batch["label"], alpha=self.alpha,
                                                   temperature=self.temperature)
            base, kd = per_example.mean(), parts["kd"].mean()
        else:
            base = cross_entropy(student, batch["label"]).mean()
            kd = jnp.zeros(())
        hint = at = jnp.zeros((), jnp.float32)
        if self.hint_weight > 0:
            proj = params["projection"]
            hint = hint_loss(projection(proj["kernel"].shape[-1]).apply({"params": proj}, fs), ft)
        if self.at_weight > 0:
            at = attention_transfer_loss(fs, ft, self.at_p)
        loss = base + self.hint_weight * hint + self.at_weight * at
        metrics = {"train/loss": loss, "train/ce": cross_entropy(student, batch["label"]).mean(), "train/kd": kd,
                   "train/hint": hint, "train/at": at, "train/accuracy": accuracy(student, batch["label"]).mean(),
                   "train/teacher_accuracy": accuracy(teacher, batch["label"]).mean()}
        return loss, (batch_stats, metrics)
