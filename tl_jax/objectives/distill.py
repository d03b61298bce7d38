"""Knowledge distillation objective: a frozen teacher's soft targets train the student.

Config group ``config.objective.distill`` (``config.objective.name='distill'``):

* ``teacher``: the teacher's workdir, its ``checkpoints/`` dir or one step dir
  (loaded with :func:`tl_jax.train.checkpoint.load_variables`);
* ``teacher_model`` / ``teacher_kwargs``: the teacher's architecture (e.g. ``'cnn'`` and
  ``{'width': 4}``); ``''`` reads ``model.name``/``model.kwargs`` from the teacher's
  ``config.json`` (found in the given dir or up to two levels above it);
* ``alpha`` α ∈ [0, 1] and ``temperature`` T > 0 of Hinton's loss (mean over the batch of)

  ``L_i = α·CE(y_i, s_i) + (1 − α)·T²·KL(softmax(t_i/T) ‖ softmax(s_i/T))``

  (:func:`distillation_loss`; s, t: student/teacher logits [B, C]).

The teacher's variables live in ``state.aux['teacher']`` (``{'params', 'batch_stats'?}``):
constants of the jitted step (no gradient, no optimizer state, saved with the
checkpoint), and its forward pass (inference mode: BatchNorm running statistics,
no dropout) runs inside the same jitted step. Logged: ``train/loss``, ``train/ce``,
``train/kd``, ``train/accuracy``, ``train/teacher_accuracy``; test: the student's
``accuracy``/``loss`` and ``teacher_accuracy``.
The T² factor keeps the soft-target gradient magnitude independent of T
(soft-target gradients scale as 1/T²).
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.models import get_model, model_from_config
from tl_jax.models.heads import head_dims
from tl_jax.objectives._checks import check_2d, check_scalar, check_shape, config_number
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, register
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.peft.merge_run import folded
from tl_jax.train.checkpoint import load_variables, saved_model_config

KEY = "config.objective.distill"


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
    check_2d("student_logits", student_logits)
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


@register
class DistillObjective(Objective):
    """Hinton distillation from a frozen teacher loaded from a checkpoint (see module doc)."""

    name: ClassVar[str] = "distill"
    defaults: ClassVar[dict] = {"teacher": "", "teacher_model": "", "teacher_kwargs": {}, "alpha": 0.5,
                                "temperature": 4.0}

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        super().__init__(config, model)
        c = config.objective.distill
        if not c.teacher:
            raise ValueError(f"{KEY}.teacher is empty: name the teacher's workdir or checkpoint")
        alpha, temp = c.alpha, c.temperature
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{KEY}.alpha must be a number in [0, 1], got {alpha!r}")
        temp = config_number(f"{KEY}.temperature", temp, low_open=True)
        if self.label_smoothing:
            raise ValueError(f"config.loss.label_smoothing={self.label_smoothing} is not used by objective "
                             f"'distill' (the teacher gives the soft targets); set it to 0")
        self.teacher_path = str(c.teacher)
        self.alpha, self.temperature = float(alpha), temp
        if c.teacher_model:
            name, kwargs, classes = c.teacher_model, dict(c.teacher_kwargs), model.num_classes
        else:
            if dict(c.teacher_kwargs):
                raise ValueError(f"{KEY}.teacher_kwargs is set but {KEY}.teacher_model is empty; set both, or "
                                 f"neither to read them from the teacher's config.json")
            mc = saved_model_config(self.teacher_path)
            if mc is None:
                raise ValueError(f"{KEY}.teacher={self.teacher_path!r}: no config.json found there or above it; set "
                                 f"{KEY}.teacher_model (and {KEY}.teacher_kwargs) to the teacher's architecture")
            name, kwargs, classes = mc["name"], None, mc.get("num_classes") or model.num_classes
        if classes != model.num_classes:
            raise ValueError(f"{KEY}.teacher has {classes} classes but the student has {model.num_classes} "
                             f"(config.model.num_classes): their logits must match")
        try:  # the teacher's own model group (reference, kwargs, head) unless teacher_model names one
            self.teacher_model = (model_from_config(mc, classes) if kwargs is None else
                                  get_model(name, classes, **kwargs))
        except ValueError as e:
            raise ValueError(f"{KEY}.teacher_model/teacher_kwargs: {e}") from None

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        """No trainable additions; ``aux = {'teacher': {'params', 'batch_stats'?}}`` from the checkpoint."""

        teacher = folded(load_variables(self.teacher_path, where=f"{KEY}.teacher"), self.teacher_path,
                         f"{KEY}.teacher")  # a LoRA run: its adapters folded into the plain teacher (exact)
        dims = head_dims(teacher["params"].get("head", {}))  # (D, C) of a linear or MLP head
        if dims is not None and dims[1] != self.model.num_classes:
            raise ValueError(f"{KEY}.teacher={self.teacher_path!r} has a {dims[1]}-class head but the "
                             f"student has {self.model.num_classes} classes")
        return {}, {"teacher": jax.tree.map(np.asarray, teacher)}

    # -- the maths ----------------------------------------------------------------------------
    def teacher_logits(self, aux: PyTree, batch: Batch) -> jax.Array:
        """Teacher logits ``[B, C]`` in inference mode, gradient-stopped."""
        t = aux["teacher"]
        logits, _ = apply_model(self.teacher_model, t["params"], t.get("batch_stats", {}), batch, train=False)
        return jax.lax.stop_gradient(logits)

    def objective_loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
                       step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        student, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                           rng=rng)
        teacher = self.teacher_logits(aux, batch)
        per_example, parts = distillation_loss(student, teacher, batch["label"], alpha=self.alpha,
                                               temperature=self.temperature)
        loss = per_example.mean()
        metrics = {"train/loss": loss, "train/ce": parts["ce"].mean(), "train/kd": parts["kd"].mean(),
                   "train/accuracy": accuracy(student, batch["label"]).mean(),
                   "train/teacher_accuracy": accuracy(teacher, batch["label"]).mean()}
        return loss, (batch_stats, metrics)

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        sums = super().eval_sums(params, batch_stats, aux, batch)
        mask = batch["mask"].astype(jnp.float32)
        sums["teacher_accuracy"] = jnp.sum(accuracy(self.teacher_logits(aux, batch), batch["label"]) * mask)
        return sums
