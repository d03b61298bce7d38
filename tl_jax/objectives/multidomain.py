"""Weighted multi-domain objective: one model trained on a mixture of tfds domains.

Domain 0 is ``config.data`` (name, splits, train/eval preprocessing, shots); the
others are listed in ``config.objective.multidomain.domains`` as dicts with keys
``name`` (required), ``train_split``/``test_split`` (default train/test),
``train_pp``/``eval_pp`` (default: config.data's), ``shots``/``shots_seed``
(default: all examples). E.g. mnist5k + optdigits mapped onto the 28x28 frame::

    c.objective.name = "multidomain"
    c.objective.multidomain.domains = [{"name": "optdigits", "train_pp": DIGITS_PP, "eval_pp": DIGITS_PP}]
    c.objective.multidomain.proportions = [0.5, 0.5]   # of each train batch
    c.objective.multidomain.weights = [1.0, 2.0]       # λ_d

**Batches.** Each domain is its own grain chain (shard -> shuffle -> repeat ->
its preprocessing, adding ``domain`` = d), and ``grain.MapDataset.mix`` interleaves
them deterministically with the configured ``proportions`` before batching, so
every batch holds ≈ p_d·B examples of domain d and the pipeline stays one
``MapDataset`` (exact resume). A domain with proportion 0 is not trained on but
still evaluated (a "train on the others alone" baseline).

**Loss** (:func:`multi_domain_loss`, per-example CE L_i):

* ``'domain_mean'``: ``L = Σ_d λ_d · mean_{i∈d} L_i`` (a domain absent from the batch adds 0);
* ``'global_mean'``: ``L = Σ_d λ_d Σ_{i∈d} L_i / B``.

With ``config.data.mixup`` on, each batch is mixed within each domain
(:func:`tl_jax.data.mixing.partners`) and ``L_i`` is the soft cross-entropy against
``label_soft`` (label smoothing on top, as ``classification``).

**Eval** runs over the concatenation of every domain's test split; ``test/accuracy/<d>``
and ``test/loss/<d>`` are per domain, ``test/accuracy``/``test/loss`` their
unweighted mean over domains (macro average).
"""
from __future__ import annotations

from typing import Any, ClassVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.data import DataSplit, build_preprocess, load_split, sample_shots
from tl_jax.data.pipeline import _Subset
from tl_jax.objectives._checks import check_shape, check_spec, check_weights, is_concrete
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, register
from tl_jax.objectives.classification import accuracy, cross_entropy, soft_cross_entropy
from tl_jax.objectives.joint_spec import Domain
from tl_jax.objectives.multitask import number_list

NORMALIZATIONS = ("domain_mean", "global_mean")
KEY = "config.objective.multidomain"
DOMAIN_KEYS = ("name", "train_split", "test_split", "train_pp", "eval_pp", "shots", "shots_seed")


def multi_domain_loss(per_example_loss: jax.Array, domain_ids: jax.Array, domain_weights: jax.Array, *,
                      example_weights: jax.Array | None = None, mask: jax.Array | None = None,
                      normalization: str = "domain_mean") -> tuple[jax.Array, jax.Array]:
    """Domain- and example-weighted loss over a mixed-domain batch.

    With λ_{d,i} = λ_d · w_i, padding mask m_i ∈ {0, 1} and d(i) the domain of example i:

    'domain_mean' (each domain averaged on its own, then weighted):
        per_domain[d] = λ_d · Σ_{i: d(i)=d} w_i m_i L_i / Σ_{i: d(i)=d} w_i m_i
        (0 when the denominator is 0, e.g. the domain is absent from the batch)

    'global_mean' (weighted examples, one global normaliser = number of real examples):
        per_domain[d] = Σ_{i: d(i)=d} λ_d w_i m_i L_i / max(Σ_i m_i, 1)

    and in both cases L = Σ_d per_domain[d]. Examples with w_i m_i = 0 (padding)
    are zeroed before multiplying, so NaN/inf there never reaches L or its gradient.
    Domain ids outside [0, D) are rejected when concrete; under ``jit`` they are
    silently dropped (their one-hot row is all zero).

    Args:
      per_example_loss: [B] losses L_i.
      domain_ids: [B] integer domain of each example.
      domain_weights: [D] λ_d >= 0.
      example_weights: [B] w_i >= 0, or None (all 1).
      mask: [B] bool/0-1 padding mask m_i, or None (all 1).
      normalization: 'domain_mean' or 'global_mean'.

    Returns:
      (total scalar L, per_domain [D] contributions with Σ_d per_domain[d] = L).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if jnp.ndim(per_example_loss) != 1:
        raise ValueError(f"per_example_loss must have shape [B], got {jnp.shape(per_example_loss)}")
    batch = jnp.shape(per_example_loss)[0]
    check_shape("domain_ids", domain_ids, (batch,))
    if isinstance(domain_weights, (list, tuple)):
        domain_weights = np.asarray(domain_weights, np.float32)
    if jnp.ndim(domain_weights) != 1:
        raise ValueError(f"domain_weights must have shape [D], got {jnp.shape(domain_weights)}")
    num_domains = jnp.shape(domain_weights)[0]
    check_weights("domain_weights", domain_weights)
    if example_weights is not None:
        check_shape("example_weights", example_weights, (batch,))
        check_weights("example_weights", example_weights)
    if mask is not None:
        check_shape("mask", mask, (batch,))
    if is_concrete(domain_ids) and batch:
        ids = np.asarray(domain_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"domain_ids must be integers, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_domains:
            raise ValueError(f"domain_ids must be in [0, {num_domains}), got range [{lo}, {hi}]")

    dtype = jnp.result_type(per_example_loss, jnp.float32)
    m = jnp.ones((batch,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    w = jnp.ones((batch,), dtype) if example_weights is None else jnp.asarray(example_weights, dtype)
    wm = w * m
    safe_loss = jnp.where(wm != 0, per_example_loss, 0.0)
    onehot = jax.nn.one_hot(domain_ids, num_domains, dtype=dtype)      # [B, D]
    lam = jnp.asarray(domain_weights, dtype)
    num = onehot.T @ (wm * safe_loss)                                  # [D] Σ_{i∈d} w m L
    if normalization == "domain_mean":
        den = onehot.T @ wm                                            # [D] Σ_{i∈d} w m
        per_domain = lam * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    else:
        per_domain = lam * num / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.sum(per_domain), per_domain


class WithDomain:
    """Preprocess one domain's example and tag it: ``{"image", "label", "domain": i32 d}`` (picklable)."""

    def __init__(self, preprocess: Any, domain: int):
        self.preprocess = preprocess
        self.domain = domain

    @property
    def is_random(self) -> bool:
        return self.preprocess.is_random

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        return {**self.preprocess(example, rng), "domain": np.int32(self.domain)}


def shot_indices(dom: Any, split: DataSplit) -> np.ndarray:
    """A domain's train indices into ``split``: all, or ``dom.shots`` per class (``dom.shots_seed``)."""
    if dom.shots is None:
        return np.arange(len(split), dtype=np.int64)
    return sample_shots(split.labels(), dom.shots, dom.shots_seed, name=f"{dom.dataset}:{dom.train_split}")


def check_shapes(domains: list, splits: list[DataSplit], pps: list, which: str) -> None:
    """Every domain's preprocessing ``pps[d]`` (``which``: 'train'/'eval') must give domain 0's image shape."""
    shapes = [pp(s.source[0])["image"].shape if not pp.is_random else
              pp(s.source[0], np.random.default_rng(0))["image"].shape for s, pp in zip(splits, pps)]
    for dom, shape in zip(domains, shapes):
        if shape != shapes[0]:
            raise ValueError(f"{dom.where}.{which}_pp gives {dom.name} images of shape {shape} but "
                             f"{domains[0].name} gives {shapes[0]}: map every domain to one shape")


def mixed_batches(domains: list, splits: list[DataSplit], sources: list, fns: list, proportions: list[float], *,
                  batch_size: int, seed: int, process_index: int, process_count: int) -> grain.MapDataset:
    """Batches of one grain chain per domain d with ``proportions[d] > 0`` (``sources[d]`` at
    :func:`shot_indices`, sharded by process, shuffled with a seed drawn from ``(seed, d)``, repeated,
    mapped by ``fns[d]``) mixed with ``grain.MapDataset.mix`` in those proportions."""
    parts, props = [], []
    for d, dom in enumerate(domains):
        if proportions[d] == 0:
            continue
        idx = shot_indices(dom, splits[d])[process_index::process_count]
        if idx.size == 0:
            raise ValueError(f"{dom.where}: process {process_index}/{process_count} has no {dom.name} examples")
        domain_seed = int(np.random.SeedSequence([int(seed), d]).generate_state(1)[0])
        ds = grain.MapDataset.source(_Subset(sources[d], idx)).seed(domain_seed).shuffle().repeat()
        parts.append(ds.random_map(fns[d]) if fns[d].is_random else ds.map(fns[d]))
        props.append(proportions[d])
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=props)
    return mixed.batch(batch_size, drop_remainder=True)


def domain_scales(counts: Any) -> np.ndarray:
    """``[D]`` float32 eval weights N/N_d (N_d: test examples of domain d, N = Σ_d N_d): a sum of
    weighted values divided by N is then the mean over each domain's own examples."""
    counts = np.asarray(counts, np.float64)
    return (counts.sum() / np.maximum(counts, 1.0)).astype(np.float32)


class DomainPreprocess:
    """Eval preprocessing of a concatenated split: dispatch on ``example["domain"]``; with ``scales``
    ([D], :func:`domain_scales`) every example also carries its domain's ``domain_scale``."""

    def __init__(self, preprocesses: list, scales: np.ndarray | None = None):
        self.preprocesses = preprocesses
        self.scales = scales
        self.where = " / ".join(p.where for p in preprocesses)

    @property
    def is_random(self) -> bool:
        return any(p.is_random for p in self.preprocesses)

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(name for p in self.preprocesses for name in p.op_names)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        d = int(example["domain"])
        out = {**self.preprocesses[d](example, rng), "domain": np.int32(d)}
        return out if self.scales is None else {**out, "domain_scale": self.scales[d]}


class ConcatSource:
    """``sources[0] + sources[1] + ...`` with random access; examples gain ``domain``."""

    def __init__(self, sources: list):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if not 0 <= d < len(self.sources):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return {**self.sources[d][index - int(self.offsets[d])], "domain": d}


@register
class MultiDomainObjective(Objective):
    """Cross-entropy over mixed-domain batches, weighted per domain (see module doc)."""

    name: ClassVar[str] = "multidomain"
    defaults: ClassVar[dict] = {"domains": [], "proportions": [], "weights": [], "normalization": "domain_mean"}

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        super().__init__(config, model)
        c, dc = config.objective.multidomain, config.data
        self.data_dir = dc.data_dir
        domains = [Domain(dc.name, dc.name, dc.train_split, dc.test_split, list(dc.train_pp), list(dc.eval_pp),
                          dc.shots, dc.shots_seed, "config.data")]
        for i, raw in enumerate(c.domains):
            where, spec = f"{KEY}.domains[{i}]", raw.to_dict() if hasattr(raw, "to_dict") else raw
            check_spec(where, spec, DOMAIN_KEYS)
            if not isinstance(spec.get("name"), str) or not spec["name"]:
                raise ValueError(f"{where}.name must name a dataset (e.g. 'optdigits'), got {spec.get('name')!r}")
            domains.append(Domain(spec["name"], spec["name"], spec.get("train_split", "train"),
                                  spec.get("test_split", "test"), list(spec.get("train_pp", dc.train_pp)),
                                  list(spec.get("eval_pp", dc.eval_pp)), spec.get("shots") or None,  # 0 = all
                                  int(spec.get("shots_seed", 0)), where))
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError(f"{KEY}.domains: domain names must differ from each other and from "
                             f"config.data.name, got {names}")
        if c.normalization not in NORMALIZATIONS:
            raise ValueError(f"{KEY}.normalization must be one of {NORMALIZATIONS}, got {c.normalization!r}")
        self.domains = domains
        self.names = names
        self.normalization = c.normalization
        self.weights = np.asarray(number_list(c.weights, f"{KEY}.weights", len(domains), default=1.0), np.float32)
        self.proportions = number_list(c.proportions, f"{KEY}.proportions", len(domains), default=1.0)
        self.train_pps = [build_preprocess(d.train_pp, where=f"{d.where}.train_pp") for d in domains]
        self.eval_pps = [build_preprocess(d.eval_pp, where=f"{d.where}.eval_pp") for d in domains]

    # -- data -------------------------------------------------------------------------------
    def _split(self, d: int, which: str) -> DataSplit:
        dom = self.domains[d]
        split = load_split(dom.name, dom.train_split if which == "train" else dom.test_split, self.data_dir)
        if split.num_classes > self.model.num_classes:
            raise ValueError(f"{dom.where}: {dom.name} has {split.num_classes} classes but the model has "
                             f"{self.model.num_classes} (config.model.num_classes)")
        return split

    def train_dataset(self, standard: Any, *, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.MapDataset:
        """Mixed batches ``{"image", "label", "domain": i32 [B]}`` (``standard`` is not used)."""
        splits = [self._split(d, "train") for d in range(len(self.domains))]
        check_shapes(self.domains, splits, self.train_pps, "train")
        return mixed_batches(self.domains, splits, [s.source for s in splits],
                             [WithDomain(pp, d) for d, pp in enumerate(self.train_pps)], self.proportions,
                             batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)

    def eval_data(self, split: Any, preprocess: Any) -> tuple[DataSplit, DomainPreprocess]:
        """Every domain's test split, concatenated (domain 0 = ``split``), with per-domain preprocessing."""
        splits = [split] + [self._split(d, "test") for d in range(1, len(self.domains))]
        pps = [preprocess] + self.eval_pps[1:]
        check_shapes(self.domains, splits, pps, "eval")
        source = ConcatSource([s.source for s in splits])
        image_shape = tuple(pps[0](split.source[0])["image"].shape)
        return (DataSplit("+".join(self.names), "+".join(d.test_split for d in self.domains), source,
                          max(s.num_classes for s in splits), image_shape),
                DomainPreprocess(pps, domain_scales([len(s) for s in splits])))

    # -- the maths ----------------------------------------------------------------------------
    def objective_loss(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, rng: jax.Array,
                       step: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        logits, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=True,
                                          rng=rng)
        if "label_soft" in batch:  # config.data.mixup, mixed within each domain (tl_jax/data/mixing.py)
            ce = soft_cross_entropy(logits, batch["label_soft"], label_smoothing=self.label_smoothing)
        else:
            ce = cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)  # [B]
        total, per_domain = multi_domain_loss(ce, batch["domain"], self.weights, normalization=self.normalization)
        correct = accuracy(logits, batch["label"])                                          # [B]
        onehot = jax.nn.one_hot(batch["domain"], len(self.domains), dtype=jnp.float32)      # [B, D]
        n_d = onehot.sum(0)
        acc_d = (onehot.T @ correct) / jnp.maximum(n_d, 1.0)
        metrics = {"train/loss": total, "train/accuracy": correct.mean()}
        for d, name in enumerate(self.names):
            metrics[f"train/loss/{name}"] = per_domain[d]
            metrics[f"train/accuracy/{name}"] = acc_d[d]
            metrics[f"train/share/{name}"] = n_d[d] / ce.shape[0]
        return total, (batch_stats, metrics)

    def eval_sums(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Sums the loop divides by the total count N = Σ_d N_d (N_d: test examples of domain d).

        To make that division give per-domain means, example i of domain d enters
        ``accuracy/<d>`` with weight N/N_d: Σ_{i∈d} (N/N_d) a_i / N = mean_{i∈d} a_i. The
        macro mean over D domains uses weight N/(D·N_d). Same for ``loss``.
        """
        scale = eval_scale(batch, type(self).__name__)                                         # [B] N/N_d
        logits, _ = apply_model(self.model, self.model_params(params), batch_stats, batch, train=False)
        mask = batch["mask"].astype(jnp.float32)
        num = len(self.domains)
        w = jax.nn.one_hot(batch["domain"], num, dtype=jnp.float32) * (mask * scale)[:, None]   # [B, D]
        correct = accuracy(logits, batch["label"])
        ce = cross_entropy(logits, batch["label"])
        acc_d, loss_d = w.T @ correct, w.T @ ce                                                # [D]
        sums = {"count": jnp.sum(mask), "accuracy": acc_d.sum() / num, "loss": loss_d.sum() / num}
        for d, name in enumerate(self.names):
            sums[f"accuracy/{name}"] = acc_d[d]
            sums[f"loss/{name}"] = loss_d[d]
        return sums


def eval_scale(batch: Batch, owner: str) -> jax.Array:
    """The eval batch's ``domain_scale`` [B] (set by the eval preprocessing of ``owner.eval_data``)."""
    if "domain_scale" not in batch:
        raise KeyError(f"{owner}.eval_sums: the batch has no 'domain_scale' (keys {sorted(batch)}); eval batches "
                       f"come from {owner}.eval_data")
    return batch["domain_scale"].astype(jnp.float32)


def domain_share(dataset: grain.MapDataset, num_domains: int, batches: int) -> np.ndarray:
    """Fraction of examples of each domain in the first ``batches`` batches (for checks)."""
    counts = np.zeros(num_domains)
    for b in range(batches):
        counts += np.bincount(np.asarray(dataset[b]["domain"]), minlength=num_domains)
    return counts / counts.sum()
