"""Residual adaptation at the output ``P_target = P_source + α·P_diff`` (``residual_output``).

``residual_output`` (config group ``config.objective.residual_output``)::

    z(x) = sg(f_source(x; θ_source)) + α · f_diff(x; φ)          z: [B, C] logits

* θ_source: a frozen source classifier, loaded from ``source`` (a workdir or
  checkpoint; '' = ``config.init_from``) into ``state.aux['source']`` (its
  ``params``/``batch_stats``: no gradient, no optimizer state). Its
  architecture is read from the source workdir's ``config.json`` (else
  ``config.model``); it must output the target's C classes. It runs in
  inference mode (BatchNorm running averages, no dropout).
* φ: the *difference branch*, the run's own model ``config.model``, i.e. the
  ``backbone``/``head`` params of ``state.params``, initialised like any run
  (fresh, or from ``config.init_from``) and covered by ``config.param_rules``:
  ``[["backbone/.*", null], [".*", 1.0]]`` makes it a linear head on copied
  source features, ``[[".*", 1.0]]`` a whole second network. With
  ``zero_init_head`` its head (an MLP head's last layer, ``head/logits``)
  starts at 0, so training starts exactly at P_source.

The parameter form is :mod:`tl_jax.objectives.residual_params`.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.models import model_from_config
from tl_jax.models.heads import LOGITS, logits_layer
from tl_jax.objectives._checks import check_scalar, check_shape, config_number
from tl_jax.objectives.base import (Batch, Objective, PyTree, apply_model, classification_sums, hparam, model_inputs,
                                   register)
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.peft.merge_run import folded
from tl_jax.train.checkpoint import load_variables, saved_model_config


def residual_logits(source_logits: jax.Array, diff_logits: jax.Array, alpha: float | jax.Array = 1.0
                    ) -> jax.Array:
    """Residual adaptation at the output: z = z_source + α·z_diff.

    Shapes: [..., C] and the same shape -> same shape. No ``stop_gradient`` is
    applied: freezing the source branch is the caller's choice.
    """
    check_shape("diff_logits", diff_logits, jnp.shape(source_logits))
    check_scalar("alpha", alpha, low=None)
    return source_logits + alpha * diff_logits


def _classification(logits: jax.Array, batch: Batch, smoothing: float) -> tuple[jax.Array, dict]:
    loss = cross_entropy(logits, batch["label"], label_smoothing=smoothing).mean()
    return loss, {"train/loss": loss, "train/accuracy": accuracy(logits, batch["label"]).mean()}


def source_model_for(path: str, config: ml_collections.ConfigDict, num_classes: int):
    """The source classifier: the architecture in ``path``'s ``config.json`` (searched in the
    path and up to two parents, i.e. a workdir, its checkpoints/ or a step dir), else ``config.model``."""
    saved = saved_model_config(path)
    return model_from_config(config.model if saved is None else saved, num_classes, dropout_rate=0.0)


class ResidualAlpha:
    """The α of both residual objectives: config ``alpha``, or the trainable ``params['alpha']`` (``learn_alpha``)."""

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return () if config.objective[cls.name].learn_alpha else (f"objective.{cls.name}.alpha",)

    def alpha_of(self, params: PyTree, aux: PyTree | None = None) -> jax.Array | float:
        """The learned ``params['alpha']``, else the config's α (traced in a vectorised sweep)."""
        if self.learn_alpha:
            return params["alpha"]
        return hparam(aux, f"objective.{self.name}.alpha", self.alpha) if aux is not None else self.alpha


@register
class ResidualOutput(ResidualAlpha, Objective):
    """``z = sg(z_source) + α·z_diff`` with a frozen source model in ``state.aux`` (module docstring)."""

    name: ClassVar[str] = "residual_output"
    defaults: ClassVar[dict] = dict(source="", alpha=1.0, learn_alpha=False, zero_init_head=True)
    extra_keys: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        where = "config.objective.residual_output"
        cfg = config.objective.residual_output
        self.alpha = config_number(f"{where}.alpha", cfg.alpha, low=None)
        self.learn_alpha = bool(cfg.learn_alpha)
        self.source = cfg.source or config.init_from
        if not self.source:
            raise ValueError(f"{where}.source (or config.init_from) must name the source run's workdir")
        self.source_model = source_model_for(self.source, config, model.num_classes)

    def init_params(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> PyTree:
        if not self.config.objective.residual_output.zero_init_head:
            return params
        head = params.get("head")
        if head is None or logits_layer(head) is None:
            raise ValueError("config.objective.residual_output.zero_init_head needs a model with a 'head' "
                             "(head/kernel or head/logits/kernel)")
        if "kernel" in head:  # linear head: all of it
            return {**params, "head": jax.tree.map(jnp.zeros_like, head)}
        # MLP head: only its last layer, so z_diff = 0 while the hidden layers keep their random init
        return {**params, "head": {**head, LOGITS: jax.tree.map(jnp.zeros_like, head[LOGITS])}}

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        source = folded(load_variables(self.source), self.source, "the residual source")  # LoRA folded in
        last = logits_layer(source["params"].get("head", {}))
        head = None if last is None else last.get("kernel")
        if head is None or head.shape[-1] != self.model.num_classes:
            got = None if head is None else head.shape[-1]
            raise ValueError(f"config.objective.residual_output.source {self.source!r}: the source head has {got} "
                             f"classes, the target model {self.model.num_classes}")
        extra = {"alpha": jnp.asarray(self.alpha, jnp.float32)} if self.learn_alpha else {}
        return extra, {"source": source}

    def logits(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, *, train: bool,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, PyTree]:
        """``(z, z_source, z_diff, new_batch_stats)``, each logits ``[B, C]``."""
        args, kw = model_inputs(batch)
        z_src = jax.lax.stop_gradient(self.source_model.apply(aux["source"], *args, train=False, **kw))
        z_diff, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=train,
                                          rng=rng)
        return residual_logits(z_src, z_diff, self.alpha_of(params, aux)), z_src, z_diff, batch_stats

    def objective_loss(self, params, batch_stats, aux, batch, rng, step):
        z, z_src, z_diff, batch_stats = self.logits(params, batch_stats, aux, batch, train=True, rng=rng)
        loss, metrics = _classification(z, batch, self.label_smoothing)
        metrics.update({"train/residual/alpha": jnp.asarray(self.alpha_of(params, aux), jnp.float32),
                        "train/residual/source_accuracy": accuracy(z_src, batch["label"]).mean(),
                        "train/residual/diff_abs": jnp.mean(jnp.abs(z_diff))})
        return loss, (batch_stats, metrics)

    def eval_sums(self, params, batch_stats, aux, batch):
        z, *_ = self.logits(params, batch_stats, aux, batch, train=False)
        return classification_sums(z, batch)
