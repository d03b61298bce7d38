"""Fine-tuning regularisers that look at features, not params: ``bss``, ``delta``, ``co_tuning``.

Each is the plain classification objective (``CE`` = mean cross-entropy on the
labelled batch) plus a weighted term, w = ``config.objective.<name>.weight``;
f = the backbone features [B, D] of the batch (one forward pass,
``return_features=True``)::

    bss:        L = CE + w·Σ_{i≤k} σ²_{−i}(f)                      (Chen et al. 2019; w = 0.001, k = 1)
    delta:      L = CE + w·(1/B) Σ_b ‖f_b − f*_b‖²                 (Li et al. 2019, unweighted "L2-FE" form)
    co_tuning:  L = CE + w·(1/B) Σ_b −Σ_k M[y_b, k] log softmax(h_s(f_b))_k   (You et al. 2020; w = 2.3)

* ``delta``: f* = the features of the run's STARTING model (``init_from``
  merged: the pretrained backbone) on the same batch, in inference mode; its
  variables are copied once into ``state.aux['delta_pretrained']`` (constants,
  saved with checkpoints, so a resumed run keeps them). The forward pass of
  the pretrained copy costs about one extra forward per step. DELTA's
  supervised channel attention (:func:`~tl_jax.losses.finetune_methods.delta_attention`)
  needs a head already trained on the target task to measure the loss
  increase per channel; it is not wired here (uniform weights).
* ``co_tuning``: the source head h_s (``params['source_head']``, trainable,
  initialised from the head of checkpoint ``source``, '' = ``config.init_from``)
  is trained on soft targets from the relationship M = p(y_s | y_t)
  [C_t, K_s]: the mean of the pretrained model's source-class softmax over the
  target TRAINING examples of each class (those the run trains on: shots /
  validation carve-out applied), computed ONCE at build time (one inference
  pass over the training examples with ``config.data.eval_pp``: a one-off cost
  of about one epoch of forward passes, then nothing per step beyond the extra
  head) and stored in ``state.aux['co_tuning_relationship']``.

Logged: ``train/ce``, ``train/<name>`` (the unweighted term), ``train/loss``.
Formulas: :mod:`tl_jax.losses.finetune_methods`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.losses.classification import accuracy, cross_entropy
from tl_jax.losses.finetune_methods import bss_loss, category_relationship, co_tuning_loss, delta_loss
from tl_jax.models.heads import head_dims
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, hparam, register


class _FeatureRegularized(Objective):
    """CE + w·term(features); subclasses define ``term``."""

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = f"config.objective.{self.name}"
        self.cfg = config.objective[self.name]
        w = self.cfg.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise ValueError(f"{self.where}.weight must be a finite number >= 0, got {w!r}")
        self.weight = float(w)

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (f"objective.{cls.name}.weight",)

    def term(self, params: PyTree, aux: PyTree, batch: Batch, features: jax.Array, rng: jax.Array
             ) -> jax.Array:
        raise NotImplementedError

    def loss(self, params, batch_stats, aux, batch, rng, step):
        (z, f), batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                          rng=rng, return_features=True)
        ce = cross_entropy(z, batch["label"], label_smoothing=self.label_smoothing).mean()
        term = self.term(params, aux, batch, f, rng)
        total = ce + hparam(aux, f"objective.{self.name}.weight", self.weight) * term
        metrics = {"train/loss": total, "train/ce": ce, "train/accuracy": accuracy(z, batch["label"]).mean(),
                   f"train/{self.name}": term}
        return total, (batch_stats, metrics)


@register
class BSS(_FeatureRegularized):
    """Batch spectral shrinkage of the backbone features (see the module docstring)."""

    name: ClassVar[str] = "bss"
    defaults: ClassVar[dict] = {"weight": 0.001, "k": 1}

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        k, b = self.cfg.k, int(config.data.batch_size)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= b:
            raise ValueError(f"{self.where}.k must be an int in [1, config.data.batch_size = {b}], got {k!r}")
        self.k = k

    def term(self, params, aux, batch, features, rng):
        return bss_loss(features, min(self.k, *features.shape))


@register
class DELTA(_FeatureRegularized):
    """Feature distance to the pretrained (starting) model on the same batch (see the module docstring)."""

    name: ClassVar[str] = "delta"
    defaults: ClassVar[dict] = {"weight": 0.01}
    AUX: ClassVar[str] = "delta_pretrained"

    def init_extra(self, rng, params, batch_stats):
        copy = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), t)  # noqa: E731
        return {}, {self.AUX: {"params": copy(self.model_params(params)), "batch_stats": copy(batch_stats)}}

    def term(self, params, aux, batch, features, rng):
        pre = aux[self.AUX]
        (_, f0), _ = apply_model(self.model, pre["params"], pre["batch_stats"], batch, train=False,
                                 return_features=True)
        return delta_loss(features, jax.lax.stop_gradient(f0))


@register
class CoTuning(_FeatureRegularized):
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
        self.source_model: Any = None

    def _source_model(self, num_source: int):
        from tl_jax.models import model_from_config

        return model_from_config(self.config.model, num_source)

    def _training_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images [N, H, W, C], labels [N])`` of the run's training examples, ``config.data.eval_pp``."""
        from tl_jax.data import build_preprocess, load_split
        from tl_jax.data.validation import train_and_val_indices

        dc = self.config.data
        split = load_split(dc.name, dc.train_split, dc.data_dir)
        idx = None
        if dc.shots is not None or dc.val_fraction is not None:
            idx, _ = train_and_val_indices(split.labels(), val_fraction=dc.val_fraction, val_seed=dc.val_seed,
                                           shots=dc.shots, shots_seed=dc.shots_seed, name=f"{dc.name}:{dc.train_split}")
        idx = np.arange(len(split)) if idx is None else np.asarray(idx)
        pp = build_preprocess(list(dc.eval_pp), where="config.data.eval_pp")
        examples = [pp(split.source[int(i)]) for i in idx]
        return np.stack([e["image"] for e in examples]), np.asarray([e["label"] for e in examples], np.int32)

    def init_extra(self, rng, params, batch_stats):
        from tl_jax.train.checkpoint import load_variables  # lazy: tl_jax.train imports the objectives

        loaded = load_variables(self.source, where=f"{self.where}.source")
        dims = head_dims(loaded["params"].get("head", {}))
        if dims is None:
            raise ValueError(f"{self.where}.source={self.source!r} has no head/kernel (or head/logits/kernel)")
        self.source_model = self._source_model(dims[1])
        source_head = jax.tree.map(lambda x: np.array(x, copy=True), loaded["params"]["head"])
        images, labels = self._training_examples()
        variables = {"params": {**self.model_params(params), "head": source_head}}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        fwd = jax.jit(lambda v, x: jax.nn.softmax(self.source_model.apply(v, x, train=False)))
        bs = int(self.cfg.batch_size)
        probs = np.concatenate([np.asarray(fwd(variables, images[i:i + bs])) for i in range(0, len(images), bs)])
        rel = category_relationship(jnp.asarray(probs), jnp.asarray(labels), self.model.num_classes)
        return {"source_head": source_head}, {self.AUX: np.asarray(rel)}

    def term(self, params, aux, batch, features, rng):
        if self.source_model is None:
            raise RuntimeError("co_tuning: init_extra was not called (the train loop builds it)")
        s = self.source_model.apply({"params": {"head": params["source_head"]}}, features, train=True,
                                    rngs={"dropout": rng} if rng is not None else {}, method="head_logits")
        return co_tuning_loss(s, batch["label"], aux[self.AUX])
