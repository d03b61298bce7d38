"""Residual adaptation ``P_target = P_source + α·P_diff``, at the output or at the parameters.

``residual_output`` (config group ``config.objective.residual_output``)::

    z(x) = sg(f_source(x; θ_source)) + α · f_diff(x; φ)          z: [B, C] logits

* θ_source: a frozen source classifier, loaded from ``source`` (a workdir or
  checkpoint; '' = ``config.init_from``) into ``state.aux['source']`` (its
  ``params``/``batch_stats``: no gradient, no optimizer state). Its
  architecture is read from the source workdir's ``config.json`` (else
  ``config.model``); it must output the target's C classes. It runs in
  inference mode (BatchNorm running averages, no dropout).
* φ: the *difference branch*, the run's own model ``config.model``, i.e. the
  ``backbone``/``head`` params of ``state.params``, initialised like any run
  (fresh, or from ``config.init_from``) and covered by ``config.param_rules``:
  ``[["backbone/.*", null], [".*", 1.0]]`` makes it a linear head on copied
  source features, ``[[".*", 1.0]]`` a whole second network. With
  ``zero_init_head`` its head (an MLP head's last layer, ``head/logits``)
  starts at 0, so training starts exactly at P_source.

``residual_params`` (config group ``config.objective.residual_params``)::

    θ = sg(θ_source) + α·Δ,   Δ_ℓ dense [shape of θ_ℓ]  or  LoRA Δ_ℓ = A_ℓ B_ℓ (rank r)

* θ_source: the model's own params ``backbone``/``head`` in ``state.params``,
  loaded from ``config.init_from`` as in any run (set ``config.dont_load=[]``
  to keep the source head), and frozen by this objective's fixed rule (so they
  hold no optimizer state: the same cost as a copy in ``state.aux``, and the
  summary table shows them as the ``frozen`` group);
* Δ: trainable params under the top-level key ``delta`` (same nesting as the
  params it adapts): dense zeros for leaves matching ``dense_rules``, LoRA
  ``{'a': A, 'b': B}`` (A ~ N(0, 1/fan_in), B = 0) for the 2-D/4-D kernels
  matching ``lora_rules`` (regexes over '/'-joined paths, ``re.fullmatch``);
  Δ = 0 at the start, so training starts exactly at θ_source;
* α: ``alpha``, or the trainable scalar ``params['alpha']`` (``learn_alpha``).

For inference Δ is folded back into plain params (:func:`merged_params`,
:func:`write_merged_checkpoint`): the result is a plain ``config.model``
checkpoint that any run can ``init_from``, with logits identical to the
residual model's.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.losses.classification import accuracy, cross_entropy
from tl_jax.losses.residual import apply_delta, init_lora, merge, residual_logits
from tl_jax.models.heads import LOGITS, logits_layer
from tl_jax.objectives.base import Batch, Objective, PyTree, apply_model, hparam, model_inputs, register

# Freezes every param outside the objective's own top-level keys ``delta`` and ``alpha``.
SOURCE_RULE = r"(?!(?:delta|alpha)(?:/|$)).*"


def _alpha_value(cfg: ml_collections.ConfigDict, where: str) -> float:
    alpha = cfg.alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ValueError(f"{where}.alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def _classification(logits: jax.Array, batch: Batch, smoothing: float) -> tuple[jax.Array, dict]:
    loss = cross_entropy(logits, batch["label"], label_smoothing=smoothing).mean()
    return loss, {"train/loss": loss, "train/accuracy": accuracy(logits, batch["label"]).mean()}


def _eval_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "accuracy": jnp.sum(accuracy(logits, batch["label"]) * mask), "count": jnp.sum(mask)}


def source_model_for(path: str, config: ml_collections.ConfigDict, num_classes: int):
    """The source classifier: the architecture in ``path``'s ``config.json`` (searched in the
    path and up to two parents, i.e. a workdir, its checkpoints/ or a step dir), else ``config.model``."""
    from tl_jax.models import model_from_config
    from tl_jax.train.checkpoint import parse_step_spec  # lazy: tl_jax.train imports the objectives

    p = pathlib.Path(parse_step_spec(path)[0]).expanduser().absolute()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.json").is_file():
            return model_from_config(json.loads((d / "config.json").read_text())["model"], num_classes,
                                     dropout_rate=0.0)
    return model_from_config(config.model, num_classes, dropout_rate=0.0)


@register
class ResidualOutput(Objective):
    """``z = sg(z_source) + α·z_diff`` with a frozen source model in ``state.aux`` (module docstring)."""

    name: ClassVar[str] = "residual_output"
    defaults: ClassVar[dict] = dict(source="", alpha=1.0, learn_alpha=False, zero_init_head=True)
    extra_keys: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        where = "config.objective.residual_output"
        cfg = config.objective.residual_output
        self.alpha = _alpha_value(cfg, where)
        self.learn_alpha = bool(cfg.learn_alpha)
        self.source = cfg.source or config.init_from
        if not self.source:
            raise ValueError(f"{where}.source (or config.init_from) must name the source run's workdir")
        self.source_model = source_model_for(self.source, config, model.num_classes)

    def init_params(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> PyTree:
        if not self.config.objective.residual_output.zero_init_head:
            return params
        head = params.get("head")
        if head is None or logits_layer(head) is None:
            raise ValueError("config.objective.residual_output.zero_init_head needs a model with a 'head' "
                             "(head/kernel or head/logits/kernel)")
        if "kernel" in head:  # linear head: all of it
            return {**params, "head": jax.tree.map(jnp.zeros_like, head)}
        # MLP head: only its last layer, so z_diff = 0 while the hidden layers keep their random init
        return {**params, "head": {**head, LOGITS: jax.tree.map(jnp.zeros_like, head[LOGITS])}}

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        from tl_jax.train.checkpoint import load_variables

        source = load_variables(self.source)
        last = logits_layer(source["params"].get("head", {}))
        head = None if last is None else last.get("kernel")
        if head is None or head.shape[-1] != self.model.num_classes:
            got = None if head is None else head.shape[-1]
            raise ValueError(f"config.objective.residual_output.source {self.source!r}: the source head has {got} "
                             f"classes, the target model {self.model.num_classes}")
        extra = {"alpha": jnp.asarray(self.alpha, jnp.float32)} if self.learn_alpha else {}
        return extra, {"source": source}

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return () if config.objective[cls.name].learn_alpha else (f"objective.{cls.name}.alpha",)

    def alpha_of(self, params: PyTree, aux: PyTree | None = None) -> jax.Array | float:
        """The learned ``params['alpha']``, else the config's α (traced in a vectorised sweep)."""
        if self.learn_alpha:
            return params["alpha"]
        return hparam(aux, f"objective.{self.name}.alpha", self.alpha) if aux is not None else self.alpha

    def logits(self, params: PyTree, batch_stats: PyTree, aux: PyTree, batch: Batch, *, train: bool,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, PyTree]:
        """``(z, z_source, z_diff, new_batch_stats)``, each logits ``[B, C]``."""
        args, kw = model_inputs(batch)
        z_src = jax.lax.stop_gradient(self.source_model.apply(aux["source"], *args, train=False, **kw))
        z_diff, batch_stats = apply_model(self.model, self.model_params(params), batch_stats, batch, train=train,
                                          rng=rng)
        return residual_logits(z_src, z_diff, self.alpha_of(params, aux)), z_src, z_diff, batch_stats

    def loss(self, params, batch_stats, aux, batch, rng, step):
        z, z_src, z_diff, batch_stats = self.logits(params, batch_stats, aux, batch, train=True, rng=rng)
        loss, metrics = _classification(z, batch, self.label_smoothing)
        metrics.update({"train/residual/alpha": jnp.asarray(self.alpha_of(params, aux), jnp.float32),
                        "train/residual/source_accuracy": accuracy(z_src, batch["label"]).mean(),
                        "train/residual/diff_abs": jnp.mean(jnp.abs(z_diff))})
        return loss, (batch_stats, metrics)

    def eval_sums(self, params, batch_stats, aux, batch):
        z, *_ = self.logits(params, batch_stats, aux, batch, train=False)
        return _eval_sums(z, batch)


def _compile(rules: Any, where: str) -> list[re.Pattern]:
    if isinstance(rules, str) or not isinstance(rules, (list, tuple)):
        raise ValueError(f"{where} must be a list of regexes, got {rules!r}")
    try:
        return [re.compile(r) for r in rules]
    except (re.error, TypeError) as e:
        raise ValueError(f"{where} has an invalid regex: {e}") from None


def _set(tree: dict, keys: tuple, value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


@register
class ResidualParams(Objective):
    """``θ = sg(θ_source) + α·Δ`` with Δ dense or LoRA under ``params['delta']`` (module docstring)."""

    name: ClassVar[str] = "residual_params"
    defaults: ClassVar[dict] = dict(alpha=1.0, learn_alpha=False, dense_rules=["head/.*"], lora_rules=[],
                                    lora_rank=4)
    extra_keys: ClassVar[tuple[str, ...]] = ("delta", "alpha")

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = "config.objective.residual_params"
        cfg = config.objective.residual_params
        self.alpha = _alpha_value(cfg, self.where)
        self.learn_alpha = bool(cfg.learn_alpha)
        self.dense_rules = list(cfg.dense_rules)
        self.lora_rules = list(cfg.lora_rules)
        self.rank = cfg.lora_rank
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{self.where}.lora_rank must be an int >= 1, got {self.rank!r}")
        if not self.dense_rules and not self.lora_rules:
            raise ValueError(f"{self.where}.dense_rules and .lora_rules are both empty: nothing to adapt")

    def fixed_rules(self) -> list[list]:
        return [[SOURCE_RULE, None]]

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        """``delta``: dense zeros on ``dense_rules`` leaves, LoRA on the other ``lora_rules`` kernels."""
        from tl_jax.params.param_rules import path_str

        dense_rx = _compile(self.dense_rules, f"{self.where}.dense_rules")
        used = [False] * len(dense_rx)
        delta: dict = {}
        rest: dict = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path, keys = path_str(key_path), tuple(k.key for k in key_path)
            hits = [i for i, rx in enumerate(dense_rx) if rx.fullmatch(path)]
            for i in hits:
                used[i] = True
            if hits:
                _set(delta, keys, jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)))
            else:
                _set(rest, keys, leaf)
        dead = [r for r, ok in zip(self.dense_rules, used) if not ok]
        if dead:
            raise ValueError(f"{self.where}.dense_rules {dead} match no param (paths look like "
                             f"{path_str(jax.tree_util.tree_flatten_with_path(params)[0][0][0])!r})")
        if self.lora_rules:
            _compile(self.lora_rules, f"{self.where}.lora_rules")
            try:
                lora = init_lora(rest, self.lora_rules, self.rank, rng)
            except ValueError as e:
                raise ValueError(f"{self.where}.lora_rules: {e} (leaves taken by dense_rules excluded)") from None
            for key_path, node in jax.tree_util.tree_flatten_with_path(
                    lora, is_leaf=lambda n: isinstance(n, dict) and set(n) == {"a", "b"})[0]:
                _set(delta, tuple(k.key for k in key_path), node)
        extra = {"delta": delta}
        if self.learn_alpha:
            extra["alpha"] = jnp.asarray(self.alpha, jnp.float32)
        return extra, {}

    @classmethod
    def traced_keys(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return () if config.objective[cls.name].learn_alpha else (f"objective.{cls.name}.alpha",)

    def alpha_of(self, params: PyTree, aux: PyTree | None = None) -> jax.Array | float:
        """The learned ``params['alpha']``, else the config's α (traced in a vectorised sweep)."""
        if self.learn_alpha:
            return params["alpha"]
        return hparam(aux, f"objective.{self.name}.alpha", self.alpha) if aux is not None else self.alpha

    def adapted_params(self, params: PyTree, aux: PyTree | None = None) -> PyTree:
        """θ_source + α·Δ (differentiable in Δ and α only): what the model runs with."""
        return apply_delta(self.model_params(params), params["delta"], self.alpha_of(params, aux))

    def loss(self, params, batch_stats, aux, batch, rng, step):
        logits, batch_stats = apply_model(self.model, self.adapted_params(params, aux), batch_stats, batch,
                                          train=True, rng=rng)
        loss, metrics = _classification(logits, batch, self.label_smoothing)
        sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params["delta"]))
        metrics.update({"train/residual/alpha": jnp.asarray(self.alpha_of(params, aux), jnp.float32),
                        "train/residual/delta_norm": jnp.sqrt(sq)})
        return loss, (batch_stats, metrics)

    def eval_sums(self, params, batch_stats, aux, batch):
        logits, _ = apply_model(self.model, self.adapted_params(params, aux), batch_stats, batch, train=False)
        return _eval_sums(logits, batch)


def merged_params(params: PyTree, alpha: float | None = None) -> PyTree:
    """Plain model params θ_source + α·dense(Δ) from a ``residual_params`` run's params.

    ``params``: ``{backbone, head, delta[, alpha]}``; α is ``params['alpha']``
    when learned, else the given ``alpha`` (the run's config value). Returns
    ``{backbone, head}`` (numpy-convertible arrays), loadable by the plain model.
    """
    if "delta" not in params:
        raise ValueError("params have no 'delta': not a residual_params run")
    if "alpha" in params:
        alpha = params["alpha"]
    elif alpha is None:
        raise ValueError("alpha is fixed in the config (not a param): pass it")
    source = {k: v for k, v in params.items() if k not in ResidualParams.extra_keys}
    return merge(source, params["delta"], alpha)


def write_merged_checkpoint(workdir: str, out_dir: str) -> dict:
    """Fold a finished ``residual_params`` run into a plain checkpoint; returns the merged variables.

    Reads ``workdir``'s newest checkpoint and ``config.json`` (for a fixed α) and
    writes ``out_dir/state`` (``{'params', 'batch_stats'}``), which
    ``config.init_from=out_dir`` and :func:`tl_jax.train.checkpoint.load_variables`
    accept like any run's checkpoint.
    """
    import orbax.checkpoint as ocp

    from tl_jax.train.checkpoint import load_variables  # lazy: tl_jax.train imports the objectives

    cfg_file = pathlib.Path(workdir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{workdir!r} has no config.json: not a tl_jax workdir")
    objective = json.loads(cfg_file.read_text()).get("objective", {})
    if objective.get("name") != ResidualParams.name:
        raise ValueError(f"{workdir!r} is a {objective.get('name')!r} run, not {ResidualParams.name!r}")
    alpha = objective.get(ResidualParams.name, {}).get("alpha", ResidualParams.defaults["alpha"])
    variables = load_variables(workdir)
    merged = {"params": jax.tree.map(np.asarray, merged_params(variables["params"], alpha))}
    if variables.get("batch_stats"):
        merged["batch_stats"] = variables["batch_stats"]
    out = pathlib.Path(out_dir).expanduser().absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "state", merged)
    return merged
