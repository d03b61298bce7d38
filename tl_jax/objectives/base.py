"""Objectives: how a run turns params and a batch into a loss and test metrics.

An :class:`Objective` is chosen by ``config.objective.name`` and plugs into the
one train loop. It may

* wrap or replace the model (``self.model``: the module whose params are the
  ``backbone``/``head`` part of ``state.params``);
* add trainable params of its own under new top-level keys of
  ``state.params`` (``init_extra``: e.g. uncertainty log-variances, a domain
  discriminator, a LoRA delta), covered by ``config.param_rules`` like any
  other param;
* add constants to ``state.aux`` (``init_extra``: e.g. a frozen teacher, the
  pretrained anchor of L2-SP, a frozen source model): no gradient, no
  optimizer state, saved in checkpoints;
* prepend fixed rules (``fixed_rules``, e.g. freezing a residual source);
* define its loss (``objective_loss``) and eval sums.

The loss signature, shared with :func:`tl_jax.train.step.make_train_step`::

    loss(params, batch_stats, aux, batch, rng, step) -> (L, (new_batch_stats, metrics))

A method defines ``objective_loss``; :meth:`Objective.loss`, what the train step
differentiates, composes it with what the run adds, in this order: the running
statistics of frozen BatchNorm layers kept (``frozen_stats``, for a user's module
that cannot switch them to inference mode) and the named penalty terms of
``config.loss`` (``penalties``: L1, L2, L2-SP, :mod:`tl_jax.objectives.regularizers`)
added. A method whose update is not the gradient of one scalar (e.g. PCGrad)
sets ``objective_value_and_grad`` (same arguments, returning
``((L, (new_batch_stats, metrics)), grads)`` like ``jax.value_and_grad(loss,
has_aux=True)``); :attr:`Objective.value_and_grad` composes it the same way and
the train step then uses it instead.

**Immutable once built.** The train setup (:func:`tl_jax.train.build.build_model_and_state`)
finishes the model first and then builds the objective with it, its resolved
``param_groups``, ``penalties`` and ``frozen_stats`` (keyword arguments of the
constructor, handled by the metaclass so a method's ``__init__(config, model)``
does not see them). After construction every attribute assignment raises;
:meth:`Objective.replace` returns a changed copy instead.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.models.inputs import model_inputs
from tl_jax.objectives.classification import accuracy, cross_entropy, soft_cross_entropy
from tl_jax.util.tree_paths import path_str

PyTree = Any
Batch = dict[str, jax.Array]
HPARAMS = "hparams"  # aux key of the traced hyperparameters of a vectorised sweep (tl_jax/sweep/vectorized.py)


def hparam(aux: PyTree, key: str, default: Any) -> Any:
    """Config value ``key`` (dotted, e.g. ``'loss.l2'``) as a traced input when a vectorised
    sweep passes it in ``aux['hparams']``; otherwise ``default`` (the run's own constant)."""
    hp = aux.get(HPARAMS) if isinstance(aux, dict) else None
    return default if not hp or key not in hp else hp[key]


def apply_model(model: nn.Module, params: PyTree, batch_stats: PyTree, batch: Batch, *, train: bool,
                rng: jax.Array | None = None, **kwargs) -> tuple[Any, PyTree]:
    """``model.apply`` on a batch; returns ``(outputs, new_batch_stats)``.

    In train mode BatchNorm statistics are updated (except ``frozen_norms``)
    and dropout draws from ``rng``; in eval mode the statistics are returned
    unchanged.
    """
    args, kw = model_inputs(batch)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    rngs = {"dropout": rng} if rng is not None else {}
    if train and batch_stats:
        out, new_vars = model.apply(variables, *args, train=True, rngs=rngs, mutable=["batch_stats"], **kw, **kwargs)
        return out, new_vars["batch_stats"]
    return model.apply(variables, *args, train=train, rngs=rngs, **kw, **kwargs), batch_stats


def keep_stats(new_stats: PyTree, old_stats: PyTree, frozen_stats: tuple[str, ...]) -> PyTree:
    """``new_stats`` with the old values under the module paths ``frozen_stats`` (prefixes of '/'-joined paths)."""
    prefixes = tuple(p + "/" for p in frozen_stats)
    return jax.tree_util.tree_map_with_path(
        lambda path, new, old: old if path_str(path).startswith(prefixes) else new, new_stats, old_stats)


def classification_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Masked sums ``loss`` (cross-entropy), ``accuracy`` and ``count`` of logits ``[B, C]`` (``batch['mask']``)."""
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "accuracy": jnp.sum(accuracy(logits, batch["label"]) * mask), "count": jnp.sum(mask)}


class Sealed(type):
    """Metaclass of :class:`Objective`: the run's settings as keyword arguments, then no more assignments.

    ``cls(config, model, *, param_groups=None, penalties=None, frozen_stats=())`` sets those
    three fields, runs ``__init__(config, model)`` and seals the instance.
    """

    def __call__(cls, config: ml_collections.ConfigDict, model: Any, *, param_groups: Any = None,
                 penalties: Any = None, frozen_stats: tuple[str, ...] = ()) -> Any:
        obj = cls.__new__(cls)
        for key, value in (("param_groups", param_groups), ("penalties", penalties),
                           ("frozen_stats", tuple(frozen_stats))):
            object.__setattr__(obj, key, value)
        obj.__init__(config, model)
        object.__setattr__(obj, "_sealed", True)
        return obj


class Objective(metaclass=Sealed):
    """Plain supervised classification: mean (label-smoothed) softmax cross-entropy.

    ``L = -(1/B) Σ_b Σ_c ỹ_bc log softmax(z_b)_c`` with ``ỹ = (1-ε)·onehot(y) + ε/C``.
    Test metrics: ``accuracy`` and ``loss`` (unsmoothed CE) over the whole split.
    """

    name: ClassVar[str] = "classification"
    defaults: ClassVar[dict] = {}  # this objective's config group: config.objective.<name>
    extra_keys: ClassVar[tuple[str, ...]] = ()  # top-level params keys owned by the objective
    # Set at construction (see Sealed): the run's param_rules resolved against its params
    # (tl_jax.params.param_rules.ParamGroups; the step, optimizer and logs read it), the config.loss
    # penalty terms (tl_jax.objectives.regularizers.Penalties) and the module paths of frozen BatchNorm
    # statistics kept by the loss.
    param_groups: Any = None
    penalties: Any = None
    frozen_stats: tuple[str, ...] = ()
    objective_value_and_grad: Any = None  # a method's own update (PCGrad); None: the gradient of its loss
    _sealed: bool = False

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module):
        self.config = config
        self.model = model
        self.label_smoothing = float(config.loss.label_smoothing)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._sealed:
            raise AttributeError(f"objective {self.name!r} is immutable once built: cannot set {name!r} "
                                 f"(objective.replace({name}=...) returns a changed copy)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"objective {self.name!r} is immutable once built: cannot delete {name!r}")

    def replace(self, **changes: Any) -> "Objective":
        """A copy with ``changes`` to ``model``, ``param_groups``, ``penalties`` or ``frozen_stats``
        (``__init__`` is not run again; this objective is unchanged)."""
        unknown = sorted(set(changes) - {"model", "param_groups", "penalties", "frozen_stats"})
        if unknown:
            raise ValueError(f"Objective.replace: {unknown} cannot be replaced (model, param_groups, penalties, "
                             f"frozen_stats can)")
        new = copy.copy(self)
        for key, value in changes.items():
            object.__setattr__(new, key, tuple(value) if key == "frozen_stats" else value)
        return new

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Config keys whose values this objective's loss reads with :func:`hparam`, so a
        vectorised sweep may vary them as traced numbers (default: none)."""
        return ()

    # -- construction -------------------------------------------------------------------------
    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        """``(extra_params, aux)``: trainable additions to params, and constants."""
        return {}, {}

    def init_params(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> PyTree:
        """The model's starting params, after ``init_from`` was merged in and
        before ``init_extra`` (default: unchanged; e.g. a zero residual head)."""
        return params

    def fixed_rules(self) -> list[list]:
        """Rules put before ``config.param_rules`` (first match wins)."""
        return []

    def model_params(self, params: PyTree) -> PyTree:
        """The part of ``state.params`` that belongs to ``self.model``."""
        return {k: v for k, v in params.items() if k not in self.extra_keys}

    # -- data -------------------------------------------------------------------------------
    def train_dataset(self, standard: Any, *, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> Any:
        """The grain dataset of train batches. ``standard`` is the one built from
        ``config.data``; objectives with more streams (an unlabelled target domain,
        a mixture of domains) return a dataset combining it with theirs. It must
        be a grain ``MapDataset`` whose iterator has ``get_state``/``set_state``
        (exact resume)."""
        return standard

    def eval_data(self, split: Any, preprocess: Any) -> tuple[Any, Any]:
        """``(split, preprocess)`` evaluated for ``test/*`` metrics (default: config.data's test split)."""
        return split, preprocess

    # -- the maths ----------------------------------------------------------------------------
    def loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        """What the train step differentiates: :meth:`objective_loss`, frozen statistics kept, penalties added.

        ``L = L_objective + Σ_k λ_k R_k`` (the penalties' terms); logged besides the method's metrics:
        ``train/reg/<k>``, ``train/objective_loss`` and ``train/loss`` = L (only when there are penalties).
        """
        value, (new_stats, metrics) = self.objective_loss(params, batch_stats, aux, batch, rng, step)
        if self.frozen_stats:
            new_stats = keep_stats(new_stats, batch_stats, self.frozen_stats)
        if self.penalties is None:
            return value, (new_stats, metrics)
        reg, reg_metrics = self.penalties(params, aux)
        total = value + reg
        return total, (new_stats, {**metrics, **reg_metrics, "train/objective_loss": value, "train/loss": total})

    @property
    def value_and_grad(self) -> Any:
        """The method's own update (``objective_value_and_grad``, e.g. PCGrad) with frozen statistics kept
        and the penalties' gradient added; ``None`` when the method has none (the step differentiates
        :meth:`loss`)."""
        inner = self.objective_value_and_grad
        if inner is None or (self.penalties is None and not self.frozen_stats):
            return inner

        def value_and_grad(params, batch_stats, aux, batch, rng, step):
            (value, (new_stats, metrics)), grads = inner(params, batch_stats, aux, batch, rng, step)
            if self.frozen_stats:
                new_stats = keep_stats(new_stats, batch_stats, self.frozen_stats)
            if self.penalties is None:
                return (value, (new_stats, metrics)), grads
            (reg, reg_metrics), reg_grads = jax.value_and_grad(self.penalties, has_aux=True)(params, aux)
            metrics = {**metrics, **reg_metrics, "train/objective_loss": value, "train/loss": value + reg}
            return (value + reg, (new_stats, metrics)), jax.tree.map(jnp.add, grads, reg_grads)

        return value_and_grad

    def objective_loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
                       step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        """The method's own loss (here: mean label-smoothed cross-entropy; soft targets when mixed)."""
        logits, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                          rng=rng)
        if "label_soft" in batch:  # config.data.mixup (tl_jax/data/mixing.py)
            loss = soft_cross_entropy(logits, batch["label_soft"], label_smoothing=self.label_smoothing).mean()
        else:
            loss = cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing).mean()
        metrics = {"train/loss": loss, "train/accuracy": accuracy(logits, batch["label"]).mean()}
        return loss, (batch_stats, metrics)

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Masked sums over the batch; the loop reports ``test/<k> = Σ sums[k] / Σ count``."""
        logits, _ = apply_model(self.model, self.model_params(params), batch_stats, batch, train=False)
        return classification_sums(logits, batch)


_REGISTRY: dict[str, type[Objective]] = {"classification": Objective}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable as ``config.objective.name = cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def default_configs() -> dict[str, dict]:
    """``{name: defaults}`` of every registered objective that has a config group."""
    return {name: dict(cls.defaults) for name, cls in _REGISTRY.items() if cls.defaults}


def traced_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The objective-specific config keys a vectorised sweep may trace (see ``Objective.traced_keys``)."""
    cls = _REGISTRY.get(config.objective.name)
    return cls.traced_keys(config) if cls is not None else ()


def objective_class(config: ml_collections.ConfigDict) -> type[Objective]:
    """The registered class of ``config.objective.name``; ValueError naming the known ones otherwise."""
    name = config.objective.name
    if name not in _REGISTRY:
        raise ValueError(f"config.objective.name={name!r} is unknown; known objectives: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_objective(config: ml_collections.ConfigDict, model: nn.Module, **run: Any) -> Objective:
    """The objective of ``config.objective.name`` on ``model``; ``run``: ``param_groups``, ``penalties``,
    ``frozen_stats`` (see :class:`Sealed`). Immutable once returned."""
    return objective_class(config)(config, model, **run)
