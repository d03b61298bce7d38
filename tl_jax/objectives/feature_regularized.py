"""Fine-tuning regularisers that look at features, not params: the shared part of ``bss``, ``delta``, ``co_tuning``.

Each is the plain classification objective (``CE`` = mean cross-entropy on the
labelled batch) plus a weighted term, w = ``config.objective.<name>.weight``;
f = the backbone features [B, D] of the batch (one forward pass,
``return_features=True``)::

    L = CE + w·term(f)

:class:`FeatureRegularized` is that loss; the methods (:mod:`.bss`, :mod:`.delta`,
:mod:`.co_tuning`) define ``term``. :func:`training_outputs` maps the run's
training examples once at build time (DELTA's channel attention, Co-Tuning's
category relationship). Logged: ``train/ce``, ``train/<name>`` (the unweighted
term), ``train/loss``.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from tl_jax.objectives._checks import config_number
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, hparam
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.transferability.extract import target_arrays


class FeatureRegularized(Objective):
    """CE + w·term(features); subclasses define ``term``."""

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = f"config.objective.{self.name}"
        self.cfg = config.objective[self.name]
        self.weight = config_number(f"{self.where}.weight", self.cfg.weight)

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (f"objective.{cls.name}.weight",)

    def term(self, params: PyTree, aux: PyTree, batch: Batch, features: jax.Array, rng: jax.Array
             ) -> jax.Array:
        raise NotImplementedError

    def objective_loss(self, params, batch_stats, aux, batch, rng, step):
        (z, f), batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                          rng=rng, return_features=True)
        ce = cross_entropy(z, batch["label"], label_smoothing=self.label_smoothing).mean()
        term = self.term(params, aux, batch, f, rng)
        total = ce + hparam(aux, f"objective.{self.name}.weight", self.weight) * term
        metrics = {"train/loss": total, "train/ce": ce, "train/accuracy": accuracy(z, batch["label"]).mean(),
                   f"train/{self.name}": term}
        return total, (batch_stats, metrics)


def training_outputs(config: ml_collections.ConfigDict, fn, variables: PyTree, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(fn(variables, batch) [N, ...], labels [N])`` over the run's training examples, in batches of
    ``batch_size``.

    The examples are those the run trains on (``config.data``: ``val_fraction``
    carved out, then ``shots`` drawn), after ``config.data.eval_pp``
    (deterministic), held in memory once (:func:`tl_jax.transferability.extract.target_arrays`);
    ``fn`` (jitted; ``variables`` an argument, not baked-in constants) maps them and a batch dict
    (``image`` or ``input_ids``/``attention_mask``) to an array.
    """
    arrays = target_arrays(config)
    labels = np.asarray(arrays.pop("label"), np.int32)
    fwd = jax.jit(fn)
    out = [np.asarray(fwd(variables, {k: v[i:i + batch_size] for k, v in arrays.items()}))
           for i in range(0, len(labels), batch_size)]
    return np.concatenate(out), labels
