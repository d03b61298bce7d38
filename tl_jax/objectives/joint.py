"""Joint multi-domain multi-task objective: ``L = Σ_d Σ_i λ_{d,i} L_{d,i}``.

Config group ``config.objective.joint`` (select with ``config.objective.name='joint'``):

* ``domains``: list of dicts ``{name, dataset, train_split, test_split, train_pp,
  eval_pp, shots, shots_seed}``. ``name`` is the domain's own name (used in logs);
  ``dataset`` defaults to ``name``, splits to train/test, preprocessing to
  config.data's, shots to all examples. Domain 0 is ``config.data`` (named
  ``config.data.name``) and is omitted from the list, unless ``domains[0]`` is
  ``{"name": ..., "dataset": "config.data"}`` (which only renames it). One dataset
  may be several domains (e.g. CIFAR-10 with flip + random crop as ``source`` and
  centre-cropped as ``target``); names must be unique.
* ``tasks``: each a string — a built-in label function of the dataset label
  (``digit`` = y, with the model's classes; ``parity`` = y mod 2; ``ge5`` = [y >= 5]),
  an import reference ``module:function`` / ``file.py:function`` mapping the label
  array ``[N]`` int to task labels ``[N]`` int (task name = the function's name), or
  any other string = a label *field* of the dataset (cifar100's ``coarse_label``, an
  integer column of an in-memory dataset) — or a dict ``{name, field | fn,
  num_classes}``. Classes not given: the tfds ClassLabel's ``num_classes``, else
  max + 1 over the train splits of the domains that have the task.
* ``weights``: the λ matrix ``[D][T]`` (list of lists; ``None`` or 0 = task absent
  from that domain: no labels needed there, no term, no gradient); ``[]`` = all 1.
* ``proportions``: per-domain share of each train batch (as ``multidomain``; [] = equal).
* ``normalization`` (:func:`joint_loss`): ``'domain_mean'``
  (default, recommended: λ alone sets how much a domain counts)
  ``L = Σ_d Σ_i λ_{d,i} · mean_{b∈d} CE_i(b)`` (a domain absent from a batch adds 0), or
  ``'global_mean'``: ``L = Σ_d Σ_i λ_{d,i} Σ_{b∈d} CE_i(b) / B``.
* ``weighting``: ``'fixed'`` (the λ matrix); ``'uncertainty'``: one learned log-variance
  per active (domain, task) pair, ``task_log_vars/<domain>/<task>``,
  ``L = Σ_{d,i} exp(−s_{d,i})·T_{d,i} + s_{d,i}`` with T_{d,i} the fixed term above
  (:func:`~tl_jax.objectives.multitask.uncertainty_weighted`; per pair because the same
  task can be noisier in one domain); ``'pcgrad'``: the gradients of the active terms
  T_{d,i} from ONE ``jax.jacrev``, projected by :func:`~tl_jax.objectives.pcgrad.pcgrad`.

**Data.** Task labels are computed once per split (label functions on the whole
label array, fields read from the examples) and checked against ``[0, C)``; the
examples then carry ``label/<task>`` int32 (−1 where the task is absent) and
``domain``. One domain: config.data's own pipeline (the batches of the
``multitask`` objective); several: one grain chain per domain mixed with
``grain.MapDataset.mix`` (the batches of ``multidomain``); both resume exactly. With
``config.data.mixup`` the images are mixed within each domain and each task's term is
``λ CE(z, y) + (1 − λ) CE(z, y_partner)`` (the CE of the mixed one-hots; :mod:`tl_jax.data.mixing`).

**Model.** Several tasks: the backbone plus ``head/<task>`` (as ``multitask``).
One task: the base model with its single head at ``head/...`` (as ``multidomain``),
with the task's classes.

**Logs.** ``train/loss`` (L), ``train/loss/<domain>/<task>`` (mean CE of the pair),
``train/weighted/<domain>/<task>`` (its term), ``train/accuracy/<domain>/<task>``,
``train/accuracy`` (macro mean over active pairs), ``train/share/<domain>``.
Eval runs over every domain's test split: ``test/accuracy/<domain>/<task>``,
``test/loss/<domain>/<task>`` (active pairs) and ``test/accuracy`` / ``test/loss``, the
unweighted (macro) mean over the active (domain, task) pairs (λ_{d,i} > 0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.data import DataSplit, build_preprocess, load_split, train_dataset
from tl_jax.data.mixing import PARTNER
from tl_jax.data.sources import ExampleSource
from tl_jax.objectives._checks import check_shape, is_concrete
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, register
from tl_jax.objectives.classification import accuracy, cross_entropy
from tl_jax.objectives.joint_spec import (KEY, TaskExample, TaskSource, check_range, parse_domains, parse_tasks,
                                          parse_weights, task_values)
from tl_jax.objectives.multidomain import (NORMALIZATIONS, ConcatSource, DomainPreprocess, check_shapes, domain_scales,
                                           eval_scale, mixed_batches, shot_indices)
from tl_jax.objectives.multitask import TASKS, WEIGHTINGS, multi_head_model, number_list, uncertainty_weighted
from tl_jax.objectives.pcgrad import pcgrad


def joint_loss(per_example_losses: jax.Array, domain_ids: jax.Array, weights: jax.Array, *,
               mask: jax.Array | None = None, normalization: str = "domain_mean"
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Domain × task weighted loss over a mixed-domain batch.

    With padding mask m_b ∈ {0, 1}, d(b) the domain of example b and
    ``active[d, i] = λ_{d,i} > 0``:

        mean_{d,i} = Σ_{b: d(b)=d} m_b CE_i(b) / Σ_{b: d(b)=d} m_b     (0 if domain d is absent)

    'domain_mean' (recommended: each domain averaged on its own, so λ alone sets
    how much a domain counts, whatever its share of the batch):
        L = Σ_d Σ_i λ_{d,i} · mean_{d,i}

    'global_mean' (one normaliser, the number of real examples B' = Σ_b m_b):
        L = Σ_d Σ_i λ_{d,i} Σ_{b: d(b)=d} m_b CE_i(b) / max(B', 1)

    Entries CE_i(b) of inactive pairs (λ_{d(b),i} = 0) and of padding rows are
    replaced by 0 before any sum, so they reach neither L nor its gradient.

    Args:
      per_example_losses: [T, B] per-example losses CE_i(b).
      domain_ids: [B] integer domain of each example, in [0, D).
      weights: [D, T] λ >= 0 (numpy or a jax array).
      mask: [B] 0/1 padding mask, or None (all real).
      normalization: 'domain_mean' or 'global_mean'.

    Returns:
      ``(L, weighted [D, T], means [D, T])`` with ``weighted[d, i]`` the term
      λ_{d,i}·(normalised sum) so that ``L = Σ weighted``, and ``means[d, i]`` the
      raw per-domain mean mean_{d,i} (for logging; 0 for inactive pairs).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if jnp.ndim(per_example_losses) != 2:
        raise ValueError(f"per_example_losses must have shape [T, B], got {jnp.shape(per_example_losses)}")
    num_tasks, batch = jnp.shape(per_example_losses)
    check_shape("domain_ids", domain_ids, (batch,))
    if isinstance(weights, (list, tuple)):
        weights = np.asarray(weights, np.float32)
    if jnp.ndim(weights) != 2 or jnp.shape(weights)[1] != num_tasks:
        raise ValueError(f"weights must have shape [D, {num_tasks}] (domains x tasks), got {jnp.shape(weights)}")
    num_domains = jnp.shape(weights)[0]
    if is_concrete(weights):
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if mask is not None:
        check_shape("mask", mask, (batch,))
    if is_concrete(domain_ids) and batch:
        ids = np.asarray(domain_ids)
        if ids.min() < 0 or ids.max() >= num_domains:
            raise ValueError(f"domain_ids must be in [0, {num_domains}), got range [{ids.min()}, {ids.max()}]")

    dtype = jnp.result_type(per_example_losses, jnp.float32)
    m = jnp.ones((batch,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    lam = jnp.asarray(weights, dtype)                                       # [D, T]
    onehot = jax.nn.one_hot(domain_ids, num_domains, dtype=dtype) * m[:, None]   # [B, D]
    example_active = (onehot @ (lam > 0).astype(dtype)).T > 0               # [T, B]
    safe = jnp.where(example_active, per_example_losses, 0.0)               # [T, B]
    sums = onehot.T @ safe.T                                                # [D, T]
    counts = jnp.sum(onehot, axis=0)[:, None]                               # [D, 1]
    means = jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1.0), 0.0)
    if normalization == "domain_mean":
        weighted = lam * means
    else:
        weighted = lam * sums / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.sum(weighted), weighted, means


@register
class JointObjective(Objective):
    """Domains × tasks with a λ matrix (see module doc)."""

    name: ClassVar[str] = "joint"
    defaults: ClassVar[dict] = {"domains": [], "tasks": ["digit"], "weights": [], "proportions": [],
                                "normalization": "domain_mean", "weighting": "fixed", "init_log_var": 0.0,
                                "pcgrad_random_order": True}
    extra_keys: ClassVar[tuple[str, ...]] = ("task_log_vars",)

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        super().__init__(config, model)
        c = config.objective.joint
        if c.normalization not in NORMALIZATIONS:
            raise ValueError(f"{KEY}.normalization must be one of {NORMALIZATIONS}, got {c.normalization!r}")
        if c.weighting not in WEIGHTINGS:
            raise ValueError(f"{KEY}.weighting must be one of {WEIGHTINGS}, got {c.weighting!r}")
        if not math.isfinite(c.init_log_var):
            raise ValueError(f"{KEY}.init_log_var must be finite, got {c.init_log_var!r}")
        self.domains = parse_domains(config)
        self.tasks = parse_tasks(c.tasks)
        self.weights = parse_weights(c.weights, len(self.domains), len(self.tasks))
        self.proportions = number_list(c.proportions, f"{KEY}.proportions", len(self.domains), default=1.0)
        self.normalization, self.weighting = c.normalization, c.weighting
        self.init_log_var, self.random_order = float(c.init_log_var), bool(c.pcgrad_random_order)
        self.data_dir = config.data.data_dir
        self.active = [(d, i) for d in range(len(self.domains)) for i in range(len(self.tasks))
                       if self.weights[d, i] > 0]
        self.train_pps = [build_preprocess(d.train_pp, where=f"{d.where}.train_pp") for d in self.domains]
        self.eval_pps = [build_preprocess(d.eval_pp, where=f"{d.where}.eval_pp") for d in self.domains]
        self.train_splits = [load_split(d.dataset, d.train_split, self.data_dir) for d in self.domains]
        raw = {(d, i): task_values(t, self.train_splits[d], self._where(d, i, "train"))
               for d, i in self.active for t in [self.tasks[i]]}
        self.num_classes = [self._classes(i, raw) for i in range(len(self.tasks))]
        self.train_labels = self._labels(self.train_splits, raw, "train")
        names = tuple(t.name for t in self.tasks)
        if len(names) == 1 and self.num_classes[0] == getattr(model, "num_classes", None):
            pass  # the base model as it is (its head at head/...)
        elif len(names) == 1:  # the base model, its head at head/... with the task's classes
            fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                      if f.init and f.name not in ("parent", "name")}
            self.model = type(model)(**{**fields, "num_classes": self.num_classes[0]})
        else:
            self.model = multi_head_model(model, tuple(zip(names, self.num_classes)))
        if self.weighting == "pcgrad":
            self.objective_value_and_grad = self._pcgrad_value_and_grad

    # -- labels ---------------------------------------------------------------------------------
    def _where(self, d: int, i: int, which: str) -> str:
        dom = self.domains[d]
        return f"{self.tasks[i].where} ({self.tasks[i].name}) on domain {dom.name!r} ({dom.dataset}:{which})"

    def _classes(self, i: int, raw: dict) -> int:
        t = self.tasks[i]
        if t.num_classes is not None:
            return t.num_classes
        if t.fn in TASKS:
            return TASKS[t.fn][0] or self.model.num_classes
        found = [s.source.field_num_classes(t.field) for d, s in enumerate(self.train_splits)
                 if (d, i) in raw and t.field is not None and isinstance(s.source, ExampleSource)]
        if found and all(found):
            return max(found)
        return int(max(int(v.max()) for (d, j), v in raw.items() if j == i and v.size) + 1)

    def _labels(self, splits: list[DataSplit], raw: dict, which: str) -> list[dict[str, np.ndarray]]:
        """Per domain ``{"label/<task>": int32 [N]}`` (−1 for absent tasks), range-checked."""
        out = []
        for d, split in enumerate(splits):
            labels = {}
            for i, t in enumerate(self.tasks):
                if (d, i) in raw:
                    values = raw[(d, i)]
                    check_range(values, self.num_classes[i], self._where(d, i, which))
                else:
                    values = np.full((len(split),), -1, np.int64)
                labels[f"label/{t.name}"] = values.astype(np.int32)
            out.append(labels)
        return out

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(f"label/{t.name}" for t in self.tasks)

    # -- data -------------------------------------------------------------------------------
    def train_dataset(self, standard: Any, *, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.MapDataset:
        """Batches ``{"image", "label", "domain", "label/<task>"}`` (``standard`` is not used)."""
        check_shapes(self.domains, self.train_splits, self.train_pps, "train")
        sources = [TaskSource(s.source, labels) for s, labels in zip(self.train_splits, self.train_labels)]
        if len(self.domains) == 1:  # config.data's own chain: the batches of 'multitask' / 'classification'
            s = self.train_splits[0]
            split = DataSplit(s.name, s.split, sources[0], s.num_classes, s.image_shape)
            idx = None if self.domains[0].shots is None else shot_indices(self.domains[0], s)
            return train_dataset(split, TaskExample(self.train_pps[0], 0, self.label_keys), batch_size=batch_size,
                                 seed=seed, indices=idx, process_index=process_index, process_count=process_count)
        fns = [TaskExample(pp, d, self.label_keys) for d, pp in enumerate(self.train_pps)]
        return mixed_batches(self.domains, self.train_splits, sources, fns, self.proportions,  # 'multidomain' chains
                             batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)

    def eval_data(self, split: Any, preprocess: Any) -> tuple[DataSplit, DomainPreprocess]:
        """Every domain's test split concatenated, examples tagged with ``domain`` and ``label/<task>``."""
        splits = [split] + [load_split(d.dataset, d.test_split, self.data_dir) for d in self.domains[1:]]
        raw = {(d, i): task_values(self.tasks[i], splits[d], self._where(d, i, "test")) for d, i in self.active}
        labels = self._labels(splits, raw, "test")
        pps = [preprocess] + self.eval_pps[1:]
        check_shapes(self.domains, splits, pps, "eval")
        source = ConcatSource([TaskSource(s.source, lab) for s, lab in zip(splits, labels)])
        image_shape = tuple(pps[0](splits[0].source[0])["image"].shape)
        names = "+".join(d.name for d in self.domains)
        return (DataSplit(names, "+".join(d.test_split for d in self.domains), source,
                          max(self.num_classes), image_shape),
                DomainPreprocess([TaskExample(pp, d, self.label_keys) for d, pp in enumerate(pps)],
                                 domain_scales([len(s) for s in splits])))

    # -- the maths ----------------------------------------------------------------------------
    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        if self.weighting != "uncertainty":
            return {}, {}
        log_vars: dict[str, dict] = {}
        for d, i in self.active:
            log_vars.setdefault(self.domains[d].name, {})[self.tasks[i].name] = jnp.full((), self.init_log_var,
                                                                                          jnp.float32)
        return {"task_log_vars": log_vars}, {}

    def _outputs(self, params: PyTree, batch_stats: PyTree, batch: Batch, *, train: bool, rng=None):
        out, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=train, rng=rng)
        return (out if len(self.tasks) > 1 else {self.tasks[0].name: out}), batch_stats

    def _ce(self, logits: jax.Array, y: jax.Array, batch: Batch, key: str) -> jax.Array:
        """Per-example CE ``[B]``; mixed batches (``config.data.mixup``, within each domain):
        ``λ CE(z, y) + (1 − λ) CE(z, y_partner)``, the CE of the mixed one-hots (tl_jax/data/mixing.py)."""
        ce = cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if "mix_lam" not in batch:
            return ce
        lam, y_partner = batch["mix_lam"], jnp.maximum(batch[f"{PARTNER}{key}"], 0)
        return lam * ce + (1.0 - lam) * cross_entropy(logits, y_partner, label_smoothing=self.label_smoothing)

    def terms(self, params: PyTree, batch_stats: PyTree, batch: Batch, rng: jax.Array):
        """One forward pass: ``(L_fixed, weighted [D,T], means [D,T], acc [D,T], new_batch_stats)``."""
        outputs, batch_stats = self._outputs(params, batch_stats, batch, train=True, rng=rng)
        labels = [jnp.maximum(batch[k], 0) for k in self.label_keys]   # −1 (absent) is masked out anyway
        ce = jnp.stack([self._ce(outputs[t.name], y, batch, k) for t, y, k in zip(self.tasks, labels, self.label_keys)])
        total, weighted, means = joint_loss(ce, batch["domain"], self.weights.astype(np.float32),
                                            normalization=self.normalization)
        correct = jnp.stack([accuracy(outputs[t.name], y) for t, y in zip(self.tasks, labels)])   # [T, B]
        _, _, acc = joint_loss(correct, batch["domain"], self.weights.astype(np.float32))
        return total, weighted, means, acc, batch_stats

    def _metrics(self, total, weighted, means, acc, batch, extra=None) -> dict[str, jax.Array]:
        metrics = {"train/loss": total,
                   "train/accuracy": sum(acc[d, i] for d, i in self.active) / len(self.active)}
        onehot = jax.nn.one_hot(batch["domain"], len(self.domains), dtype=jnp.float32)
        for d, dom in enumerate(self.domains):
            metrics[f"train/share/{dom.name}"] = onehot[:, d].sum() / onehot.shape[0]
        for d, i in self.active:
            pair = f"{self.domains[d].name}/{self.tasks[i].name}"
            metrics[f"train/loss/{pair}"] = means[d, i]
            metrics[f"train/weighted/{pair}"] = weighted[d, i]
            metrics[f"train/accuracy/{pair}"] = acc[d, i]
        metrics.update(extra or {})
        return metrics

    def _pair_names(self) -> list[str]:
        return [f"{self.domains[d].name}/{self.tasks[i].name}" for d, i in self.active]

    def objective_loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
                       step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        total, weighted, means, acc, batch_stats = self.terms(params, batch_stats, batch, rng)
        extra = {}
        if self.weighting == "uncertainty":
            lv = params["task_log_vars"]
            pair_terms = {p: weighted[d, i] for p, (d, i) in zip(self._pair_names(), self.active)}
            log_vars = {p: lv[self.domains[d].name][self.tasks[i].name] for p, (d, i) in
                        zip(self._pair_names(), self.active)}
            total, terms = uncertainty_weighted(pair_terms, log_vars)
            extra = {f"train/{k}": v for k, v in terms.items() if k.startswith(("weight/", "log_var/"))}
        return total, (batch_stats, self._metrics(total, weighted, means, acc, batch, extra))

    def _pcgrad_value_and_grad(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch,
                               rng: jax.Array, step: jax.Array):
        """PCGrad over the active terms T_{d,i}: J = ∂[T_{d,i}]/∂θ from one ``jax.jacrev``, G = pcgrad(J)."""
        dropout_rng, order_rng = jax.random.split(rng)

        def term_vector(p: PyTree):
            total, weighted, means, acc, new_stats = self.terms(p, batch_stats, batch, dropout_rng)
            return jnp.stack([weighted[d, i] for d, i in self.active]), (total, weighted, means, acc, new_stats)

        jac, (total, weighted, means, acc, new_stats) = jax.jacrev(term_vector, has_aux=True)(params)
        grads = pcgrad(jac, rng=order_rng if self.random_order else None)
        return (total, (new_stats, self._metrics(total, weighted, means, acc, batch))), grads

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Sums the loop divides by N = Σ_d N_d: example b of domain d enters with weight N/N_d, so
        ``accuracy/<d>/<t>`` is the mean over domain d's test split; ``accuracy``/``loss`` = the macro
        mean over the active pairs."""
        scale = eval_scale(batch, type(self).__name__)                                         # [B] N/N_d
        outputs, _ = self._outputs(params, batch_stats, batch, train=False)
        mask = batch["mask"].astype(jnp.float32)
        w = jax.nn.one_hot(batch["domain"], len(self.domains), dtype=jnp.float32) * (mask * scale)[:, None]
        sums = {"count": jnp.sum(mask)}
        for i, t in enumerate(self.tasks):
            y = jnp.maximum(batch[f"label/{t.name}"], 0)
            acc_d, loss_d = w.T @ accuracy(outputs[t.name], y), w.T @ cross_entropy(outputs[t.name], y)   # [D]
            for d in range(len(self.domains)):
                if (d, i) in self.active:
                    sums[f"accuracy/{self.domains[d].name}/{t.name}"] = acc_d[d]
                    sums[f"loss/{self.domains[d].name}/{t.name}"] = loss_d[d]
        pairs = self._pair_names()
        sums["accuracy"] = sum(sums[f"accuracy/{p}"] for p in pairs) / len(pairs)
        sums["loss"] = sum(sums[f"loss/{p}"] for p in pairs) / len(pairs)
        return sums
