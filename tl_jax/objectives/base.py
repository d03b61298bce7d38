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
* define its loss and eval sums.

The loss signature, shared with :func:`tl_jax.train.step.make_train_step`::

    loss(params, batch_stats, aux, batch, rng, step) -> (L, (new_batch_stats, metrics))

An objective whose update is not the gradient of one scalar (e.g. PCGrad) also
defines ``value_and_grad`` with the same arguments, returning
``((L, (new_batch_stats, metrics)), grads)`` like ``jax.value_and_grad(loss,
has_aux=True)``; the train step then uses it instead.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.objectives.classification import accuracy, cross_entropy

PyTree = Any
Batch = dict[str, jax.Array]
HPARAMS = "hparams"  # aux key of the traced hyperparameters of a vectorised sweep (tl_jax/sweep/vectorized.py)


def hparam(aux: PyTree, key: str, default: Any) -> Any:
    """Config value ``key`` (dotted, e.g. ``'loss.l2'``) as a traced input when a vectorised
    sweep passes it in ``aux['hparams']``; otherwise ``default`` (the run's own constant)."""
    hp = aux.get(HPARAMS) if isinstance(aux, dict) else None
    return default if not hp or key not in hp else hp[key]


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
    """Positional and keyword model inputs of a batch (images, or token ids + mask)."""
    if "image" in batch:
        return (batch["image"],), {}
    if "input_ids" in batch:
        return (batch["input_ids"],), {"attention_mask": batch.get("attention_mask")}
    raise KeyError(f"batch has no model input ('image' or 'input_ids'); keys: {sorted(batch)}")


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


class Objective:
    """Plain supervised classification: mean (label-smoothed) softmax cross-entropy.

    ``L = -(1/B) Σ_b Σ_c ỹ_bc log softmax(z_b)_c`` with ``ỹ = (1-ε)·onehot(y) + ε/C``.
    Test metrics: ``accuracy`` and ``loss`` (unsmoothed CE) over the whole split.
    """

    name: ClassVar[str] = "classification"
    defaults: ClassVar[dict] = {}  # this objective's config group: config.objective.<name>
    extra_keys: ClassVar[tuple[str, ...]] = ()  # top-level params keys owned by the objective
    # The run's param_rules resolved against its params (tl_jax.params.param_rules.ParamGroups), set once
    # by tl_jax.train.build.build_model_and_state; the step, optimizer and logs read it.
    param_groups: Any = None

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module):
        self.config = config
        self.model = model
        self.label_smoothing = float(config.loss.label_smoothing)

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
        logits, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                          rng=rng)
        loss = cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing).mean()
        metrics = {"train/loss": loss, "train/accuracy": accuracy(logits, batch["label"]).mean()}
        return loss, (batch_stats, metrics)

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Masked sums over the batch; the loop reports ``test/<k> = Σ sums[k] / Σ count``."""
        logits, _ = apply_model(self.model, self.model_params(params), batch_stats, batch, train=False)
        mask = batch["mask"].astype(jnp.float32)
        return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
                "accuracy": jnp.sum(accuracy(logits, batch["label"]) * mask),
                "count": jnp.sum(mask)}


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


def build_objective(config: ml_collections.ConfigDict, model: nn.Module) -> Objective:
    name = config.objective.name
    if name not in _REGISTRY:
        raise ValueError(f"config.objective.name={name!r} is unknown; known objectives: {sorted(_REGISTRY)}")
    return _REGISTRY[name](config, model)
