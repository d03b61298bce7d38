"""Residual adaptation: θ = θ_source + α·Δ at the parameters (dense or low-rank
LoRA Δ), or source + α·diff at the logits.

A delta is a nested dict with the same nesting as the (dict) params but covering
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

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tl_jax.losses._checks import check_scalar, check_shape, path_str

PyTree = Any


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


def residual_logits(source_logits: jax.Array, diff_logits: jax.Array, alpha: float | jax.Array = 1.0
                    ) -> jax.Array:
    """Residual adaptation at the output: z = z_source + α·z_diff.

    Shapes: [..., C] and the same shape -> same shape. No ``stop_gradient`` is
    applied: freezing the source branch is the caller's choice.
    """
    check_shape("diff_logits", diff_logits, jnp.shape(source_logits))
    check_scalar("alpha", alpha, low=None)
    return source_logits + alpha * diff_logits
