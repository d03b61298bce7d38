"""Multitask objective: one shared backbone, one head per task, ``L = Σ_i λ_i L_i``.

Config group ``config.objective.multitask`` (select with ``config.objective.name='multitask'``):

* ``tasks``: task names from :data:`TASKS`, each a label function of the
  dataset label ``y`` (for digits: ``digit`` = y with C classes, ``parity`` =
  y mod 2, ``ge5`` = [y >= 5]). The first task is the *main* task: its test
  accuracy is reported as ``test/accuracy``.
* ``weighting``: how the task losses L_i (mean softmax CE of head i) combine:

  - ``'fixed'``: ``L = Σ_i λ_i L_i`` (:func:`weighted_sum`);
  - ``'uncertainty'``: ``L = Σ_i exp(−s_i) L_i + s_i`` with trainable log-variances
    ``s_i`` at ``task_log_vars/<task>`` (scalars, init ``init_log_var``), Kendall et
    al. 2018 (:func:`uncertainty_weighted`); ``weights`` must
    be left empty;
  - ``'pcgrad'``: the per-task gradients g_i = ∇_θ λ_i L_i come from ONE
    ``jax.jacrev`` pass (leaves ``[T, ...]``), conflicting components are projected
    away (:func:`~tl_jax.objectives.pcgrad.pcgrad`, random order per step if
    ``pcgrad_random_order``) and the update uses G = Σ_i g_i^PC. The logged
    ``train/loss`` is Σ_i λ_i L_i.
* ``weights``: λ_i, one finite number >= 0 per task ([] = all 1). λ_i = 0 removes
  task i's gradient exactly (it is left out of the sum / the Jacobian).

Params: the base model's ``backbone/...`` and ``head/<task>/{kernel,bias}`` (Dense to
the task's classes; with ``config.model.head.hidden`` one MLP per task,
``head/<task>/hidden_<i>/...`` and ``head/<task>/logits/...``), so ``param_rules``
such as ``backbone/.*`` keep working and
``dont_load=['head/.*']`` drops a pretrained single head.

Logged: ``train/loss`` (total), ``train/loss/<task>`` (L_i), ``train/weight/<task>`` (λ_i
or exp(−s_i)), ``train/weighted/<task>``, ``train/accuracy/<task>``; test:
``accuracy/<task>``, ``loss/<task>`` and ``accuracy``/``loss`` of the main task.

Task losses are passed to the loss functions as ``{task_name: scalar}`` dicts;
their ``terms`` dicts use '/'-separated logging keys: ``loss/<task>`` (raw L_i),
``weighted/<task>`` (λ_i L_i) and ``weight/<task>`` (λ_i).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.models.heads import call_head, make_head
from tl_jax.models.layers import BACKBONE, Classifier, sub_paths
from tl_jax.objectives._checks import check_same_keys, check_scalar, config_number
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, hparam, register
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.objectives.pcgrad import pcgrad

WEIGHTINGS = ("fixed", "uncertainty", "pcgrad")
KEY = "config.objective.multitask"


def _check_losses(losses: Mapping[str, Any]) -> None:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(f"losses must be a non-empty dict of task -> scalar loss, got {losses!r}")
    for name, value in losses.items():
        if jnp.ndim(value) != 0:
            raise ValueError(f"losses[{name!r}] must be a scalar, got shape {jnp.shape(value)}")


def weighted_sum(losses: Mapping[str, jax.Array], weights: Mapping[str, float]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fixed-weight multi-task loss.

    L = Σ_i λ_i L_i

    A task whose weight is the Python number 0 is left out of the sum entirely,
    so it contributes exactly zero gradient (even if its L_i is inf/NaN).

    Args:
      losses: {task: scalar L_i}.
      weights: {task: λ_i >= 0, finite}; same keys as ``losses``.

    Returns:
      (total scalar L, terms) with ``loss/<t>``, ``weighted/<t>``, ``weight/<t>``.
    """
    _check_losses(losses)
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a dict of task -> float, got {type(weights).__name__}")
    check_same_keys("weights", weights, "losses", losses)
    for name, lam in weights.items():
        check_scalar(f"weights[{name!r}]", lam, low=0.0)
    total = jnp.zeros((), jnp.result_type(*losses.values(), jnp.float32))
    terms: dict[str, jax.Array] = {}
    for name, loss in losses.items():
        lam = weights[name]
        weighted = lam * loss
        if not (isinstance(lam, (int, float)) and lam == 0):
            total = total + weighted
        terms[f"loss/{name}"] = loss
        terms[f"weighted/{name}"] = weighted
        terms[f"weight/{name}"] = jnp.asarray(lam, jnp.float32)
    return total, terms


def uncertainty_weighted(losses: Mapping[str, jax.Array], log_vars: Mapping[str, jax.Array]
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla, 2018).

    L = Σ_i exp(−s_i)·L_i + s_i,     s_i = log σ_i²  (trainable, one scalar per task)

    Convention: the same form is used for every task, classification included.
    With factor convention λ_i = exp(−s_i) = 1/σ_i² on the loss and +s_i = log σ_i²
    as regulariser, this is 2× Kendall's Gaussian (regression) objective
    (1/(2σ²))L + log σ, and it is NOT Kendall's classification variant
    (1/σ²)L + log σ = exp(−s)L + s/2. The common simplified form is used so that
    all tasks share one optimum: ∂L/∂s_i = −exp(−s_i)L_i + 1 = 0 ⇒ s_i* = log L_i,
    i.e. effective weight 1/L_i. Initialise s_i = 0 (weight 1).

    Args:
      losses: {task: scalar L_i}.
      log_vars: {task: scalar s_i}; same keys as ``losses``.

    Returns:
      (total scalar L, terms) with ``loss/<t>``, ``weighted/<t>`` (exp(−s_i)L_i),
      ``weight/<t>`` (exp(−s_i), gradient-stopped, for logging) and ``log_var/<t>``.
    """
    _check_losses(losses)
    if not isinstance(log_vars, Mapping):
        raise ValueError(f"log_vars must be a dict of task -> scalar, got {type(log_vars).__name__}")
    check_same_keys("log_vars", log_vars, "losses", losses)
    for name, s in log_vars.items():
        if jnp.ndim(s) != 0:
            raise ValueError(f"log_vars[{name!r}] must be a scalar, got shape {jnp.shape(s)}")
        check_scalar(f"log_vars[{name!r}]", s, low=None)
    total = jnp.zeros((), jnp.result_type(*losses.values(), *log_vars.values(), jnp.float32))
    terms: dict[str, jax.Array] = {}
    for name, loss in losses.items():
        s = log_vars[name]
        precision = jnp.exp(-s)
        weighted = precision * loss
        total = total + weighted + s
        terms[f"loss/{name}"] = loss
        terms[f"weighted/{name}"] = weighted
        terms[f"weight/{name}"] = jax.lax.stop_gradient(precision)
        terms[f"log_var/{name}"] = jax.lax.stop_gradient(s)
    return total, terms


TASKS: dict[str, tuple[int | None, Callable[[jax.Array], jax.Array]]] = {
    "digit": (None, lambda y: y),
    "parity": (2, lambda y: y % 2),
    "ge5": (2, lambda y: (y >= 5).astype(jnp.int32)),
}


class TaskHeads(nn.Module):
    """One head per task: features ``[B, D]`` -> ``{task: logits [B, C_task]}`` (float32).

    Each head is what the base model's head options build
    (:func:`tl_jax.models.heads.make_head`): a Dense at ``head/<task>/{kernel,bias}``,
    or with ``hidden`` an MLP at ``head/<task>/hidden_<i>/...``, ``head/<task>/logits/...``.
    """

    tasks: tuple[tuple[str, int], ...]
    dtype: Any = jnp.float32
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        heads = {name: make_head(n, self.hidden, self.activation, self.dropout, dtype=self.dtype, name=name)
                 for name, n in self.tasks}
        return {name: call_head(head, x, train=train).astype(jnp.float32) for name, head in heads.items()}


def _multi_head_setup(self) -> None:
    known = set(self.norm_module_paths())
    unknown = [p for p in self.frozen_norms if p not in known]
    if unknown:
        raise ValueError(f"{type(self).__name__}: unknown BatchNorm path(s) in frozen_norms: {unknown}")
    self.backbone = self.make_backbone(sub_paths(tuple(self.frozen_norms), BACKBONE))
    self.dropout = nn.Dropout(rate=self.dropout_rate)
    self.head = TaskHeads(tuple(self.tasks), dtype=self.dtype, hidden=tuple(self.head_hidden),
                          activation=self.head_activation, dropout=self.head_dropout)


def _multi_head_call(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    feats = self.backbone(x, train=train)
    out = self.head(self.dropout(feats, deterministic=not train), train=train)
    return (out, feats.astype(jnp.float32)) if return_features else out


@functools.cache
def _multi_head_class(cls: type[Classifier]) -> type[Classifier]:
    """``cls`` with its single Dense head replaced by :class:`TaskHeads` (a new field ``tasks``).

    Subclassing (rather than wrapping) keeps the backbone at ``backbone/...``, its
    ``make_backbone``/``norm_module_paths`` and ``clone(frozen_norms=...)`` as they are.
    """
    return type(f"MultiHead{cls.__name__}", (cls,), {
        "__annotations__": {"tasks": tuple}, "tasks": (), "setup": _multi_head_setup,
        "__call__": _multi_head_call, "__module__": __name__,
        "__doc__": f"{cls.__name__} backbone with one head per task: x -> {{task: logits [B, C_task]}}."})


def multi_head_model(base: Classifier, tasks: tuple[tuple[str, int], ...]) -> Classifier:
    """The model ``base`` (same backbone config) with heads ``head/<task>`` of the given classes."""
    if not isinstance(base, Classifier):
        raise ValueError(f"objective 'multitask' needs a tl_jax Classifier model, got {type(base).__name__}")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.init and f.name not in ("parent", "name")}
    return _multi_head_class(type(base))(**fields, tasks=tuple(tasks))


def number_list(values: Any, key: str, n: int, *, default: float) -> list[float]:
    """Validate a config list of weights: one finite number >= 0 per entry, not all 0 ([] = all ``default``)."""
    values = list(values)
    if not values:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"{key} has {len(values)} values for {n} tasks/domains; give one per entry or []")
    out = [config_number(f"{key}[{i}]", v) for i, v in enumerate(values)]
    if not any(out):
        raise ValueError(f"{key} are all 0: at least one must be > 0")
    return out


@register
class MultitaskObjective(Objective):
    """Shared backbone + one head per task, weighted by config (see module doc)."""

    name: ClassVar[str] = "multitask"
    defaults: ClassVar[dict] = {"tasks": ["digit", "parity", "ge5"], "weights": [], "weighting": "fixed",
                                "init_log_var": 0.0, "pcgrad_random_order": True}
    extra_keys: ClassVar[tuple[str, ...]] = ("task_log_vars",)

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module):
        super().__init__(config, model)
        c = config.objective.multitask
        tasks = list(c.tasks)
        if not tasks:
            raise ValueError(f"{KEY}.tasks is empty; known tasks: {sorted(TASKS)}")
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"{KEY}.tasks: unknown task {t!r}; known tasks: {sorted(TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{KEY}.tasks has duplicates: {tasks}")
        if c.weighting not in WEIGHTINGS:
            raise ValueError(f"{KEY}.weighting must be one of {WEIGHTINGS}, got {c.weighting!r}")
        if c.weighting == "uncertainty" and list(c.weights):
            raise ValueError(f"{KEY}.weights is not used by weighting='uncertainty' (the weights are learned); "
                             "set it to []")
        if not math.isfinite(c.init_log_var):
            raise ValueError(f"{KEY}.init_log_var must be finite, got {c.init_log_var!r}")
        self.tasks = tasks
        self.weighting = c.weighting
        self.weights = dict(zip(tasks, number_list(c.weights, f"{KEY}.weights", len(tasks), default=1.0)))
        self.init_log_var = float(c.init_log_var)
        self.random_order = bool(c.pcgrad_random_order)
        classes = {t: TASKS[t][0] or model.num_classes for t in tasks}
        self.model = multi_head_model(model, tuple((t, classes[t]) for t in tasks))
        if self.weighting == "pcgrad":
            self.objective_value_and_grad = self._pcgrad_value_and_grad

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """λ of ``weighting='fixed'`` may vary in one vectorised sweep (pcgrad drops λ=0 tasks statically)."""
        return ("objective.multitask.weights",) if config.objective.multitask.weighting == "fixed" else ()

    # -- construction -------------------------------------------------------------------------
    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        if self.weighting != "uncertainty":
            return {}, {}
        return {"task_log_vars": {t: jnp.full((), self.init_log_var, jnp.float32) for t in self.tasks}}, {}

    # -- the maths ----------------------------------------------------------------------------
    def task_labels(self, labels: jax.Array) -> dict[str, jax.Array]:
        """``{task: [B] int labels}`` derived from the dataset labels ``[B]``."""
        return {t: TASKS[t][1](labels).astype(jnp.int32) for t in self.tasks}

    def task_losses(self, params: PyTree, batch_stats: PyTree, batch: Batch, rng: jax.Array
                    ) -> tuple[dict[str, jax.Array], PyTree, dict[str, jax.Array]]:
        """One forward pass: ``({task: L_i = mean_b CE}, new_batch_stats, {task: mean accuracy})``."""
        outputs, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                           rng=rng)
        labels = self.task_labels(batch["label"])
        losses = {t: cross_entropy(outputs[t], labels[t], label_smoothing=self.label_smoothing).mean()
                  for t in self.tasks}
        accs = {t: accuracy(outputs[t], labels[t]).mean() for t in self.tasks}
        return losses, batch_stats, accs

    def _metrics(self, total: jax.Array, terms: dict, accs: dict) -> dict[str, jax.Array]:
        metrics = {"train/loss": total, "train/accuracy": accs[self.tasks[0]]}
        metrics.update({f"train/{k}": v for k, v in terms.items()})
        metrics.update({f"train/accuracy/{t}": a for t, a in accs.items()})
        return metrics

    def objective_loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
                       step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        losses, batch_stats, accs = self.task_losses(params, batch_stats, batch, rng)
        if self.weighting == "uncertainty":
            total, terms = uncertainty_weighted(losses, params["task_log_vars"])
        else:  # 'fixed'; for 'pcgrad' this is the scalar reported (its update comes from value_and_grad)
            lam = hparam(aux, "objective.multitask.weights", None)  # traced λ of a vectorised sweep
            weights = self.weights if lam is None else {t: lam[i] for i, t in enumerate(self.tasks)}
            total, terms = weighted_sum(losses, weights)
        return total, (batch_stats, self._metrics(total, terms, accs))

    def _pcgrad_value_and_grad(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch,
                               rng: jax.Array, step: jax.Array) -> tuple[tuple[jax.Array, tuple[PyTree, dict]], PyTree]:
        """PCGrad update direction; same output structure as ``jax.value_and_grad(loss, has_aux=True)``.

        J = ∂[λ_1 L_1, …, λ_T L_T]/∂θ from one ``jax.jacrev`` (one forward pass, the
        VJP vmapped over the T one-hot cotangents; tasks with λ_i = 0 are left out),
        then G = pcgrad(J).
        """
        dropout_rng, order_rng = jax.random.split(rng)
        active = [t for t in self.tasks if self.weights[t] > 0]

        def task_vector(p: PyTree) -> tuple[jax.Array, tuple]:
            losses, new_stats, accs = self.task_losses(p, batch_stats, batch, dropout_rng)
            return jnp.stack([self.weights[t] * losses[t] for t in active]), (losses, new_stats, accs)

        jac, (losses, new_stats, accs) = jax.jacrev(task_vector, has_aux=True)(params)
        grads = pcgrad(jac, rng=order_rng if self.random_order else None)
        total, terms = weighted_sum(losses, self.weights)
        return (total, (new_stats, self._metrics(total, terms, accs))), grads

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Masked sums per task (``accuracy/<t>``, ``loss/<t>``); ``accuracy``/``loss`` = the main task."""
        outputs, _ = apply_model(self.model, self.model_params(params), batch_stats, batch, train=False)
        mask = batch["mask"].astype(jnp.float32)
        labels = self.task_labels(batch["label"])
        sums = {"count": jnp.sum(mask)}
        for t in self.tasks:
            sums[f"accuracy/{t}"] = jnp.sum(accuracy(outputs[t], labels[t]) * mask)
            sums[f"loss/{t}"] = jnp.sum(cross_entropy(outputs[t], labels[t]) * mask)
        sums["accuracy"] = sums[f"accuracy/{self.tasks[0]}"]
        sums["loss"] = sums[f"loss/{self.tasks[0]}"]
        return sums
