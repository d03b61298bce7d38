"""Train a head on backbone features computed once (``config.train.feature_cache``).

A linear probe (``param_rules`` freezing ``backbone/.*``) with deterministic
training preprocessing feeds the same images through the same frozen backbone
every epoch. When that holds, :func:`maybe_enable` computes the backbone
features of this process's training examples once, and the run trains on
batches of ``{"features": [B, D], "label": [B]}`` with an objective whose loss
runs only what follows the backbone:

* a zoo :class:`~tl_jax.models.layers.Classifier`: ``dropout -> head``
  (:meth:`Classifier.head_logits`, the same code the whole model runs after its
  backbone, so an MLP head works too);
* any other linen or NNX model with a ``backbone``/``head`` split (the own-model
  contract, docs/models.md): the model's own ``__call__`` on a zero input with
  the ``backbone`` submodule's output replaced by the cached features
  (:func:`tl_jax.models.contract.apply_split`), so pooling or dropout between
  backbone and head still run; that this equals the model on real inputs is
  checked on a sample before the cache is used.

Either way:

* same batches: the feature batches come from the same grain chain as the
  image batches (:func:`tl_jax.data.cache.array_dataset`, same seed, same
  order, same ``{"next_index": k}`` iterator state), so checkpoints and
  resumes work unchanged;
* same params: the frozen backbone's updates are zero either way, and the
  head sees the same features (up to float rounding of a different XLA
  program), so params and test metrics equal the uncached probe's to float
  tolerance (``tests/test_feature_cache.py``);
* evaluation still runs the whole model on the test images.

Eligible (``'auto'`` turns it on, ``True`` raises with the reason otherwise):
the plain ``classification`` objective without regularisers, a
Classifier or a model with ``backbone`` and ``head`` params, every ``backbone/...`` param
frozen, no random op in ``config.data.train_pp``, and backbone outputs that do
not depend on train mode or rngs (frozen BatchNorm runs in inference mode; a
backbone with active dropout is not cached). The features must fit in
``config.data.cache_max_mb``.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax.data import cache as data_cache
from tl_jax.data.pipeline import _Subset
from tl_jax.data.preprocess import RANDOM_OPS
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.models import contract
from tl_jax.models.layers import Classifier
from tl_jax.models.precision import unwrap
from tl_jax.objectives.base import Objective
from tl_jax.train.build import param_groups

log = logging.getLogger("tl_jax")
PyTree = Any
FEATURES = "features"


class CachedFeaturesObjective(Objective):
    """Plain classification whose train batches hold backbone ``features`` instead of images."""

    def loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: dict, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        if _is_classifier(self.model):
            logits = self.model.apply({"params": self.model_params(params)}, batch[FEATURES], rngs={"dropout": rng},
                                      method=_head_logits)
        else:
            logits, batch_stats = _split_head_logits(self.model, self.model_params(params), batch_stats,
                                                     batch[FEATURES], rng, train=True)
        loss = cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing).mean()
        metrics = {"train/loss": loss, "train/accuracy": accuracy(logits, batch["label"]).mean()}
        return loss, (batch_stats, metrics)


def _head_logits(model: Classifier, features: jax.Array) -> jax.Array:
    """What ``Classifier.__call__(x, train=True)`` does after the backbone (linear or MLP head)."""
    return model.head_logits(features, train=True)


def _backbone(model: Classifier, x: jax.Array, train: bool) -> jax.Array:
    return model.backbone(x, train=train)


def _split_head_logits(model: Any, params: PyTree, batch_stats: PyTree, features: jax.Array, rng: jax.Array, *,
                       train: bool) -> tuple[jax.Array, PyTree]:
    """``(logits, batch_stats)`` of a split model's ``__call__`` with the backbone's output replaced by
    ``features`` ``[B, ...]``. The features are also its input: the backbone, the only reader of the input
    (checked by :func:`_split_matches`), never sees it, so no image-sized placeholder is needed."""
    update = bool(batch_stats) and train
    out, _ = contract.apply_split(model, _variables(params, batch_stats), features, features=features, train=train,
                                  rngs={"dropout": rng}, mutable=["batch_stats"] if update else False)
    if not update:
        return out, batch_stats
    return out[0], out[1].get("batch_stats", batch_stats)


def _is_classifier(model: Any) -> bool:
    return isinstance(unwrap(model), Classifier)  # config.precision may wrap it (models/precision.py)


def ineligible_reason(config: ml_collections.ConfigDict, objective: Any, params: PyTree, train_pp: Any) -> str | None:
    """Why the run cannot train on cached features, or ``None`` when it can (static checks)."""
    if getattr(objective.model, "adapts_backbone", False):  # config.peft (tl_jax/peft): LoRA in the backbone
        return "config.peft adapts the backbone (its features change in training)"
    if type(objective) is not Objective or objective.penalties is not None:
        return f"objective {getattr(objective, 'name', type(objective).__name__)!r} (or config.loss regularisers)"
    if not _is_classifier(objective.model) and not contract.has_split(objective.model_params(params)):
        return (f"model {contract.module_class(objective.model).__name__} has no `backbone` and `head` submodules "
                f"({contract.CONTRACT})")
    if train_pp.is_random:
        return f"config.data.train_pp has random ops {[o for o in train_pp.op_names if o in RANDOM_OPS]}"
    mults = param_groups(config, objective, params).multipliers
    trainable_backbone = [p for p, m in mults.items() if p.startswith("backbone/") and m is not None]
    if trainable_backbone:
        return f"backbone params train ({trainable_backbone[0]}, ...)"
    if not any(m is not None for p, m in mults.items() if not p.startswith("backbone/")):
        return "no trainable head params"
    return None


def _embed_fns(model: Any):
    """``(variables, x, rng) -> backbone(x)`` in eval mode and in train mode (updates discarded), jitted.

    A hashable model (linen modules are, by their fields) is a static argument of module-level jitted
    functions, so the runs of one process (the points of a sweep task) with equal models share their
    compiled programs instead of tracing and compiling them again."""
    try:
        hash(model)
    except TypeError:
        return jax.jit(functools.partial(_embed, model)), jax.jit(functools.partial(_embed_train, model))
    return functools.partial(_embed_static, model), functools.partial(_embed_train_static, model)


def _embed(model: Any, variables: PyTree, x: jax.Array, rng: jax.Array) -> jax.Array:
    if _is_classifier(model):
        return model.apply(variables, x, False, method=_backbone, rngs={"dropout": rng})
    return contract.apply_split(model, variables, x, train=False, rngs={"dropout": rng})[1]


def _embed_train(model: Any, variables: PyTree, x: jax.Array, rng: jax.Array) -> jax.Array:
    if _is_classifier(model):
        return model.apply(variables, x, True, method=_backbone, rngs={"dropout": rng}, mutable=["batch_stats"])[0]
    return contract.apply_split(model, variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])[1]


_embed_static = jax.jit(_embed, static_argnums=0)
_embed_train_static = jax.jit(_embed_train, static_argnums=0)


def _variables(params: PyTree, batch_stats: PyTree) -> dict:
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def compute_features(model: Any, params: PyTree, batch_stats: PyTree, images: np.ndarray,
                     batch_size: int) -> np.ndarray:
    """Backbone outputs of ``images`` ``[N, ...]`` in batches of ``batch_size`` (last one padded)."""
    embed, _ = _embed_fns(model)
    variables = _variables(params, batch_stats)
    rng = jax.random.PRNGKey(0)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(embed(variables, chunk, rng))[:batch_size - pad])
    return np.concatenate(out)


def _deterministic(model: Any, params: PyTree, batch_stats: PyTree, sample: np.ndarray) -> bool:
    """Backbone outputs equal in eval mode and in train mode under two rngs (frozen BN, no dropout)."""
    embed, embed_train = _embed_fns(model)
    variables = _variables(params, batch_stats)
    ref = np.asarray(embed(variables, sample, jax.random.PRNGKey(1)), np.float32)
    for seed in (1, 2):
        out = np.asarray(embed_train(variables, sample, jax.random.PRNGKey(seed)), np.float32)
        if not np.allclose(out, ref, rtol=1e-5, atol=1e-6):
            return False
    return True


def _split_matches(model: Any, params: PyTree, batch_stats: PyTree, sample: np.ndarray) -> bool:
    """Eval-mode logits of a split model on ``sample`` equal those of the cached path (its backbone's output
    given, the input never read: :func:`_split_head_logits`), so nothing but the backbone reads the input."""
    variables = _variables(params, batch_stats)
    logits, feats = contract.apply_split(model, variables, sample, train=False)
    try:
        replaced, _ = _split_head_logits(model, params, batch_stats, feats, jax.random.PRNGKey(0), train=False)
    except Exception:  # noqa: BLE001 - the model reshaped or indexed its input before the backbone: not cacheable
        return False
    return bool(np.allclose(np.asarray(replaced, np.float32), np.asarray(logits, np.float32), rtol=1e-5, atol=1e-6))


def maybe_enable(config: ml_collections.ConfigDict, objective: Any, state: Any, train_split: Any, train_pp: Any,
                 indices: np.ndarray | None, shard: Any, batch_size: int, seed: int) -> tuple[Objective, Any] | None:
    """``(objective, dataset)`` training the head on cached features, or ``None`` (train as usual).

    ``indices``/``shard``/``batch_size``/``seed`` are those the loop gave
    :func:`tl_jax.data.pipeline.train_dataset`, so the feature batches come in
    the same order as the image batches would.
    """
    mode = config.train.feature_cache
    data_cache.check_mode(mode, "config.train.feature_cache")
    if mode is False:
        return None
    params = jax.device_get(state.params)
    batch_stats = jax.device_get(state.batch_stats)
    reason = ineligible_reason(config, objective, params, train_pp)
    model = objective.model if reason is None else None
    t0 = time.perf_counter()
    images = None
    if reason is None:
        kw = shard.kwargs
        idx = np.arange(len(train_split), dtype=np.int64) if indices is None else np.asarray(indices)
        idx = idx[kw["process_index"]::kw["process_count"]]
        max_bytes = int(config.data.cache_max_mb * 2**20)
        images = data_cache.materialize(_Subset(train_split.source, idx), train_pp, max_bytes=max_bytes)
        if images is None or "image" not in images.arrays:
            reason = "the preprocessed training images do not fit config.data.cache_max_mb (or are not images)"
        elif not _deterministic(model, objective.model_params(params), batch_stats,
                                images.arrays["image"][:min(8, len(images))]):
            reason = "the backbone's outputs depend on train mode or rngs (dropout, unfrozen BatchNorm)"
        elif not _is_classifier(model) and not _split_matches(model, objective.model_params(params), batch_stats,
                                                              images.arrays["image"][:min(8, len(images))]):
            reason = (f"the model's __call__ reads its input outside the `backbone` submodule, so the head cannot "
                      f"run on cached features ({contract.CONTRACT})")
    if reason is not None:
        if mode is True:
            raise ValueError(f"config.train.feature_cache=true but the run cannot use cached features: {reason}")
        log.info("config.train.feature_cache: off (%s)", reason)
        return None
    features = compute_features(model, objective.model_params(params), batch_stats, images.arrays["image"],
                                int(config.data.eval_batch_size))
    arrays = {FEATURES: features, "label": np.asarray(images.arrays["label"], np.int32)}
    dataset = shard.select(data_cache.array_dataset(arrays, batch_size=batch_size, seed=seed))
    log.info("config.train.feature_cache: training the head on %d cached %s features (%.1f MiB, %.2f s)",
             len(features), features.shape[1:], features.nbytes / 2**20, time.perf_counter() - t0)
    cached = CachedFeaturesObjective(objective.config, objective.model)
    return cached, dataset
