"""Fine-tuning regularisers that look at features, not params: ``bss``, ``delta``, ``co_tuning``.

Each is the plain classification objective (``CE`` = mean cross-entropy on the
labelled batch) plus a weighted term, w = ``config.objective.<name>.weight``;
f = the backbone features [B, D] of the batch (one forward pass,
``return_features=True``)::

    bss:        L = CE + w·Σ_{i≤k} σ²_{−i}(f)                      (Chen et al. 2019; w = 0.001, k = 1)
    delta:      L = CE + w·(1/B) Σ_b Σ_c a_c (f_bc − f*_bc)²         (Li et al. 2019; w = 0.01)
    co_tuning:  L = CE + w·(1/B) Σ_b −Σ_k M[y_b, k] log softmax(h_s(f_b))_k   (You et al. 2020; w = 2.3)

* ``delta``: f* = the features of the run's STARTING model (``init_from``
  merged: the pretrained backbone) on the same batch, in inference mode; its
  variables are copied once into ``state.aux['delta_pretrained']`` (constants,
  saved with checkpoints, so a resumed run keeps them). The forward pass of
  the pretrained copy costs about one extra forward per step.
  a [D] is DELTA's supervised channel attention (``attention=true``, the
  paper's method; ``false``: a_c = 1, the unweighted "L2-FE" form). Not every
  pretrained channel matters for the target task: pinning the ones the task
  does not use only stops them from adapting, so the pull toward f* is
  weighted by how much the TARGET loss needs each channel. Measured once at
  build time, from the pretrained model on the run's training examples (shots /
  validation carve-out applied, ``config.data.eval_pp``, inference mode):

    1. f* [N, D] of those N examples, and a linear head (W [D, K], b) fitted on
       them by L2-regularised logistic regression (:func:`fit_probe`: the
       starting model's head is usually fresh, and ΔL needs a head that already
       solves the target task; TLlib's DELTA likewise trains a classifier on
       the pretrained backbone before measuring);
    2. ΔL_c = (1/N) Σ_n [CE(f*_n with channel c zeroed) − CE(f*_n)], all D
       channels at once (:func:`~tl_jax.losses.finetune_methods.channel_loss_increase`);
    3. a = D · softmax(ẑ / T), ẑ = (ΔL − mean ΔL) / std ΔL (``temperature`` T,
       default 5 as TLlib: :func:`~tl_jax.losses.finetune_methods.delta_attention`);
       the weights average 1, so w keeps the scale of the unweighted form.

  a is stored in ``state.aux['delta_attention']`` (saved with checkpoints: a
  resumed run uses the same weights). One-off cost: one inference pass over
  the training examples and a D·K-parameter convex fit.
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
import optax

from tl_jax.losses.classification import accuracy, cross_entropy
from tl_jax.losses.finetune_methods import (bss_loss, category_relationship, channel_loss_increase, co_tuning_loss,
                                           delta_attention, delta_loss)
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
    from tl_jax.transferability.extract import target_arrays  # lazy: it imports the objectives' base

    arrays = target_arrays(config)
    labels = np.asarray(arrays.pop("label"), np.int32)
    fwd = jax.jit(fn)
    out = [np.asarray(fwd(variables, {k: v[i:i + batch_size] for k, v in arrays.items()}))
           for i in range(0, len(labels), batch_size)]
    return np.concatenate(out), labels


def fit_probe(features: jax.Array, labels: jax.Array, num_classes: int, l2: float = 1e-3, steps: int = 200
              ) -> tuple[jax.Array, jax.Array]:
    """``(kernel [D, K], bias [K])`` minimising (1/N) Σ_n CE(f_n W + b, y_n) + (l2/2)‖W‖²: the
    L2-regularised multinomial logistic regression of frozen features [N, D], ``steps`` L-BFGS
    iterations from zero (convex: the start only affects how fast it gets there)."""
    f, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels)
    p0 = {"kernel": jnp.zeros((f.shape[1], num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}

    def objective(p):
        return cross_entropy(f @ p["kernel"] + p["bias"], y).mean() + 0.5 * l2 * jnp.sum(jnp.square(p["kernel"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(_, carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    p, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, opt.init(p))))(p0)
    return p["kernel"], p["bias"]


@register
class DELTA(_FeatureRegularized):
    """DELTA: attention-weighted feature distance to the pretrained (starting) model (see the module docstring)."""

    name: ClassVar[str] = "delta"
    defaults: ClassVar[dict] = {"weight": 0.01, "attention": True, "temperature": 5.0}
    AUX: ClassVar[str] = "delta_pretrained"
    ATTENTION: ClassVar[str] = "delta_attention"

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        a, t = self.cfg.attention, self.cfg.temperature
        if not isinstance(a, bool):
            raise ValueError(f"{self.where}.attention must be true or false, got {a!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
            raise ValueError(f"{self.where}.temperature must be a finite number > 0, got {t!r}")
        self.attention, self.temperature = a, float(t)

    def channel_attention(self, params: PyTree, batch_stats: PyTree) -> tuple[np.ndarray, np.ndarray]:
        """``(w [D], ΔL [D])`` of the starting model on the run's training examples (module docstring)."""
        def features(variables, batch):
            (_, f), _ = apply_model(self.model, *variables, batch, train=False, return_features=True)
            return f

        f, y = training_outputs(self.config, features, (params, batch_stats), int(self.config.data.eval_batch_size))
        kernel, bias = fit_probe(f, y, self.model.num_classes)
        increase = channel_loss_increase(f, y, kernel, bias)
        return np.asarray(delta_attention(increase, self.temperature, standardize=True)), np.asarray(increase)

    def init_extra(self, rng, params, batch_stats):
        copy = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), t)  # noqa: E731
        pre = {"params": copy(self.model_params(params)), "batch_stats": copy(batch_stats)}
        aux = {self.AUX: pre}
        if self.attention:
            aux[self.ATTENTION] = self.channel_attention(pre["params"], pre["batch_stats"])[0]
        return {}, aux

    def term(self, params, aux, batch, features, rng):
        pre = aux[self.AUX]
        (_, f0), _ = apply_model(self.model, pre["params"], pre["batch_stats"], batch, train=False,
                                 return_features=True)
        return delta_loss(features, jax.lax.stop_gradient(f0), aux[self.ATTENTION] if self.attention else None)


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

    def init_extra(self, rng, params, batch_stats):
        from tl_jax.train.checkpoint import load_variables  # lazy: tl_jax.train imports the objectives

        loaded = load_variables(self.source, where=f"{self.where}.source")
        dims = head_dims(loaded["params"].get("head", {}))
        if dims is None:
            raise ValueError(f"{self.where}.source={self.source!r} has no head/kernel (or head/logits/kernel)")
        self.source_model = self._source_model(dims[1])
        source_head = jax.tree.map(lambda x: np.array(x, copy=True), loaded["params"]["head"])
        source = ({**self.model_params(params), "head": source_head}, batch_stats)
        probs, labels = training_outputs(
            self.config, lambda v, b: jax.nn.softmax(apply_model(self.source_model, *v, b, train=False)[0]), source,
            int(self.cfg.batch_size))
        rel = category_relationship(jnp.asarray(probs), jnp.asarray(labels), self.model.num_classes)
        return {"source_head": source_head}, {self.AUX: np.asarray(rel)}

    def term(self, params, aux, batch, features, rng):
        if self.source_model is None:
            raise RuntimeError("co_tuning: init_extra was not called (the train loop builds it)")
        s = self.source_model.apply({"params": {"head": params["source_head"]}}, features, train=True,
                                    rngs={"dropout": rng} if rng is not None else {}, method="head_logits")
        return co_tuning_loss(s, batch["label"], aux[self.AUX])
