"""Residual adaptation at the parameters ``θ = sg(θ_source) + α·Δ`` (``residual_params``).

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

**Deltas.** A delta is a nested dict with the same nesting as the (dict) params but covering
only the adapted leaves. Each delta leaf is either a dense array of the
parameter's shape, or a LoRA node ``{'a': A, 'b': B}`` with Δ = A @ B:

* 2-D kernel [in, out]:         A [in, r],         B [r, out]
* conv kernel [kh, kw, in, out]: A [kh, kw, in, r], B [r, out]

The conv A is the [kh·kw·in, r] factor of the kernel reshaped to [kh·kw·in, out],
stored with the kernel's leading axes so that Δ = A @ B (contracting r) already
has the kernel's shape and :func:`lora_dense_delta` needs no params. A node is
recognised as LoRA when it is a dict with exactly the keys 'a' and 'b' holding
arrays with a.shape[-1] == b.shape[0] and b 2-D.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.objectives._checks import check_scalar, check_shape, config_int, config_number, path_str
from tl_jax.objectives.base import Objective, PyTree, apply_model, classification_sums, register
from tl_jax.objectives.residual_output import ResidualAlpha, _classification
from tl_jax.train.checkpoint import load_variables

SOURCE_RULE = r"(?!(?:delta|alpha)(?:/|$)).*"


def _is_lora(node: Any) -> bool:
    if not isinstance(node, Mapping) or set(node) != {"a", "b"}:
        return False
    a, b = node["a"], node["b"]
    return (hasattr(a, "shape") and hasattr(b, "shape") and len(b.shape) == 2
            and len(a.shape) >= 2 and a.shape[-1] == b.shape[0])


def _lora_product(node: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.tensordot(node["a"], node["b"], axes=1)


def lora_dense_delta(delta: PyTree) -> PyTree:
    """Replace every LoRA node {'a': A, 'b': B} of a delta by its dense Δ.

    Δ = A @ B  (contracting the rank axis r):  [in, r]·[r, out] -> [in, out],
    [kh, kw, in, r]·[r, out] -> [kh, kw, in, out]. Dense leaves pass through.

    Returns:
      the delta with the same nesting and dense array leaves.
    """
    if _is_lora(delta):
        return _lora_product(delta)
    if isinstance(delta, Mapping):
        return {k: lora_dense_delta(v) for k, v in delta.items()}
    return delta


def _apply(source: PyTree, delta: PyTree, alpha: Any, path: str) -> PyTree:
    if isinstance(source, Mapping):
        if not isinstance(delta, Mapping) or _is_lora(delta):
            raise ValueError(f"delta at {path or '<root>'!r} must be a dict mirroring the params subtree")
        unknown = sorted(set(delta) - set(source), key=str)
        if unknown:
            raise ValueError(f"delta has keys not in source_params at {path or '<root>'!r}: {unknown}")
        return {k: (_apply(v, delta[k], alpha, f"{path}/{k}" if path else str(k)) if k in delta else v)
                for k, v in source.items()}
    dense = _lora_product(delta) if _is_lora(delta) else delta
    check_shape(f"delta {path!r}", dense, jnp.shape(source))
    return (source + alpha * dense).astype(jnp.result_type(source))


def apply_delta(source_params: PyTree, delta: PyTree, alpha: float | jax.Array = 1.0) -> PyTree:
    """Residual parameters for training: θ = θ_source + α·Δ on the leaves in ``delta``.

    θ_ℓ = sg(θ_source,ℓ) + α·Δ_ℓ  for adapted leaves ℓ,   θ_ℓ = sg(θ_source,ℓ) otherwise

    sg = ``stop_gradient``: the source is frozen, gradients reach only Δ (and α).
    Δ_ℓ is a dense array of θ_ℓ's shape or a LoRA node (Δ = A @ B). Results keep the
    source leaf dtype. Params and delta are nested dicts (Mappings); the result is
    plain nested dicts.

    Args:
      source_params: nested dict θ_source.
      delta: nested dict covering a subset of the leaves (see module docstring).
      alpha: finite scalar α.

    Returns:
      params with the structure of ``source_params``.
    """
    check_scalar("alpha", alpha, low=None)
    source_params = jax.lax.stop_gradient(source_params)
    return _apply(source_params, delta, alpha, "")


def merge(source_params: PyTree, delta: PyTree, alpha: float | jax.Array = 1.0) -> PyTree:
    """Fold a (dense or LoRA) delta into plain parameters for inference.

    θ = θ_source + α·dense(Δ)   with dense(Δ) = :func:`lora_dense_delta` (Δ)

    Same value as :func:`apply_delta`; the result carries no gradient (all inputs
    are ``stop_gradient``-ed) and no LoRA factors: a params tree that the base
    model can ``apply`` directly.
    """
    check_scalar("alpha", alpha, low=None)
    delta = jax.lax.stop_gradient(lora_dense_delta(delta))
    return _apply(jax.lax.stop_gradient(source_params), delta, jax.lax.stop_gradient(alpha), "")


def init_lora(params: PyTree, rules: Sequence[str], rank: int, rng: jax.Array) -> PyTree:
    """LoRA deltas for the 2-D / 4-D kernels whose '/'-joined path matches a rule.

    For each matched kernel W with fan-in n = in (2-D [in, out]) or kh·kw·in
    (conv [kh, kw, in, out]):  A ~ N(0, 1/n) (std 1/√n),  B = 0,  so Δ = A @ B = 0
    and θ = θ_source at initialisation. Rules are regexes applied with
    ``re.fullmatch`` to paths like ``backbone/conv1/kernel``; leaves of other ranks
    (biases, scales) are skipped. Every rule must match at least one 2-D/4-D
    leaf, else ``ValueError`` naming the rule. A/B take the kernel's dtype; the
    key for a leaf is ``fold_in(rng, its index among the matched leaves)``.

    Args:
      params: nested dict of parameters.
      rules: list of regexes over '/'-joined paths.
      rank: r >= 1.
      rng: PRNG key.

    Returns:
      nested dict delta with {'a': A, 'b': B} at every matched kernel.
    """
    if isinstance(rules, str) or not isinstance(rules, Sequence) or not rules:
        raise ValueError(f"rules must be a non-empty list of regex strings, got {rules!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    try:
        patterns = [re.compile(r) for r in rules]
    except (re.error, TypeError) as e:
        raise ValueError(f"rules contains an invalid regex: {e}") from None
    used = [False] * len(patterns)
    delta: dict = {}
    count = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key_path)
        if jnp.ndim(leaf) not in (2, 4):
            continue
        hits = [i for i, rx in enumerate(patterns) if rx.fullmatch(path)]
        if not hits:
            continue
        for i in hits:
            used[i] = True
        shape = jnp.shape(leaf)
        fan_in = 1
        for s in shape[:-1]:
            fan_in *= s
        key = jax.random.fold_in(rng, count)
        count += 1
        dtype = jnp.result_type(leaf)
        a = jax.random.normal(key, (*shape[:-1], rank), dtype) * jnp.asarray(1.0 / math.sqrt(fan_in), dtype)
        b = jnp.zeros((rank, shape[-1]), dtype)
        if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
            raise ValueError(f"params must be nested dicts; leaf {path!r} is not reached by dict keys")
        node = delta
        keys = [k.key for k in key_path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = {"a": a, "b": b}
    for rule, ok in zip(rules, used):
        if not ok:
            raise ValueError(f"rule {rule!r} matches no 2-D/4-D kernel in params")
    return delta


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
class ResidualParams(ResidualAlpha, Objective):
    """``θ = sg(θ_source) + α·Δ`` with Δ dense or LoRA under ``params['delta']`` (module docstring)."""

    name: ClassVar[str] = "residual_params"
    defaults: ClassVar[dict] = dict(alpha=1.0, learn_alpha=False, dense_rules=["head/.*"], lora_rules=[],
                                    lora_rank=4)
    extra_keys: ClassVar[tuple[str, ...]] = ("delta", "alpha")

    def __init__(self, config: ml_collections.ConfigDict, model):
        super().__init__(config, model)
        self.where = "config.objective.residual_params"
        cfg = config.objective.residual_params
        self.alpha = config_number(f"{self.where}.alpha", cfg.alpha, low=None)
        self.learn_alpha = bool(cfg.learn_alpha)
        self.dense_rules = list(cfg.dense_rules)
        self.lora_rules = list(cfg.lora_rules)
        self.rank = config_int(f"{self.where}.lora_rank", cfg.lora_rank, low=1)
        if not self.dense_rules and not self.lora_rules:
            raise ValueError(f"{self.where}.dense_rules and .lora_rules are both empty: nothing to adapt")

    def fixed_rules(self) -> list[list]:
        return [[SOURCE_RULE, None]]

    def init_extra(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> tuple[dict, dict]:
        """``delta``: dense zeros on ``dense_rules`` leaves, LoRA on the other ``lora_rules`` kernels."""

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

    def adapted_params(self, params: PyTree, aux: PyTree | None = None) -> PyTree:
        """θ_source + α·Δ (differentiable in Δ and α only): what the model runs with."""
        return apply_delta(self.model_params(params), params["delta"], self.alpha_of(params, aux))

    def objective_loss(self, params, batch_stats, aux, batch, rng, step):
        logits, batch_stats = apply_model(self.model, self.adapted_params(params, aux), batch_stats, batch,
                                          train=True, rng=rng)
        loss, metrics = _classification(logits, batch, self.label_smoothing)
        sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params["delta"]))
        metrics.update({"train/residual/alpha": jnp.asarray(self.alpha_of(params, aux), jnp.float32),
                        "train/residual/delta_norm": jnp.sqrt(sq)})
        return loss, (batch_stats, metrics)

    def eval_sums(self, params, batch_stats, aux, batch):
        logits, _ = apply_model(self.model, self.adapted_params(params, aux), batch_stats, batch, train=False)
        return classification_sums(logits, batch)


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
    import orbax.checkpoint as ocp  # deferred: orbax is only needed to write this one checkpoint


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
