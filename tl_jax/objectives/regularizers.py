"""Regularisers while fine-tuning: L1, L2 and L2-SP on the trainable params, for ANY objective.

Weights come from ``config.loss`` (all default 0 = off)::

    L_total = L_objective + λ₁·Σ_ℓ Σ_j |θ_ℓj| + λ₂·Σ_ℓ Σ_j θ_ℓj² + λ_sp·Σ_ℓ Σ_j (θ_ℓj − θ₀_ℓj)²
              (λ₁ = config.loss.l1, λ₂ = config.loss.l2, λ_sp = config.loss.l2_sp)

* the sums run over the *trainable* leaves ℓ only: the params whose
  ``config.param_rules`` (after the objective's ``fixed_rules``) group is not
  ``frozen``, objective extras included (a discriminator, a LoRA delta, ...);
  frozen params get no term (and no gradient: they are left out);
* θ₀ (L2-SP, Li, Grandvalet & Davoine 2018) is the starting point of the run:
  the pretrained value for params loaded from ``config.init_from``, the fresh
  initialisation for the others (a new head, a zero residual delta). It is held
  in ``state.aux['reg_anchor']`` (trainable leaves only, a constant: no gradient,
  no optimizer state, saved in checkpoints so a resumed run keeps its anchor);
* no ½ factor: ∂/∂θ = λ₁·sign(θ) + 2λ₂·θ + 2λ_sp·(θ − θ₀).

Logged per step: ``train/reg/<term>`` = the weighted term (λ·R, what it adds to
the loss), ``train/objective_loss`` = the objective's own loss, and
``train/loss`` = the total that is differentiated.

:func:`penalties` builds the named terms (a :class:`Penalties`, or ``None`` with
all weights 0) once in the train setup (``build_model_and_state``); every
objective receives them at construction and :meth:`Objective.loss
<tl_jax.objectives.base.Objective.loss>` adds them to its own loss.

The norms themselves (:func:`l1`, :func:`l2`, :func:`l2_sp`) take an optional
``mask``: a pytree with the structure of ``params`` whose leaves are bools
(True = trainable, counted; False = frozen, skipped). A Python-bool leaf
selects the whole parameter (a False leaf is left out of the computation, so
its gradient is exactly zero); a bool array leaf of the parameter's shape
selects elements (a 0-d bool array, e.g. a traced Python bool, selects the
whole leaf via ``where``; its gradient is still exactly zero). A mask of
another structure raises ``ValueError``. The sums are accumulated in at least float32.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax.objectives._checks import config_number, path_str
from tl_jax.objectives.base import hparam
from tl_jax.params import param_rules as rules_lib

PyTree = Any
TERMS = ("l1", "l2", "l2_sp")
ANCHOR_KEY = "reg_anchor"


def _check_structure(name: str, tree: PyTree, params: PyTree) -> None:
    got, want = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(params)
    if got != want:
        raise ValueError(f"{name} structure does not match params: {got} vs {want}")


def _masked_sum(fn: Callable[..., jax.Array], params: PyTree, others: tuple[PyTree, ...],
                mask: PyTree | None) -> jax.Array:
    """Σ over leaves (and, where masked, selected elements) of fn(θ, *others)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]
    other_leaves = [jax.tree_util.tree_leaves(o) for o in others]
    if mask is None:
        mask_leaves = [True] * len(leaves)
    else:
        _check_structure("mask", mask, params)
        mask_leaves = jax.tree_util.tree_leaves(mask)
    total = jnp.zeros((), jnp.float32)
    for k, (theta, m) in enumerate(zip(leaves, mask_leaves)):
        if isinstance(m, (bool, np.bool_)):
            if not m:
                continue
            sel = None
        else:
            if jnp.shape(m) not in ((), jnp.shape(theta)):
                raise ValueError(f"mask leaf {paths[k]!r} must be a bool or have the param's shape "
                                 f"{jnp.shape(theta)}, got {jnp.shape(m)}")
            sel = jnp.asarray(m).astype(bool)
        dtype = jnp.result_type(theta, jnp.float32)
        value = fn(jnp.asarray(theta, dtype), *(jnp.asarray(o[k], dtype) for o in other_leaves))
        if sel is not None:
            value = jnp.where(sel, value, 0.0)
        total = total + jnp.sum(value)
    return total


def l1(params: PyTree, mask: PyTree | None = None) -> jax.Array:
    """L1 norm of the (trainable) parameters.

    R(θ) = Σ_{leaves ℓ} Σ_j m_{ℓ,j} |θ_{ℓ,j}|

    Args:
      params: pytree of arrays; mask: optional bool pytree of the same structure.

    Returns:
      scalar (float32 or wider).
    """
    return _masked_sum(jnp.abs, params, (), mask)


def l2(params: PyTree, mask: PyTree | None = None) -> jax.Array:
    """Squared L2 norm of the (trainable) parameters, WITHOUT a ½ factor.

    R(θ) = Σ_{leaves ℓ} Σ_j m_{ℓ,j} θ_{ℓ,j}²      (∂R/∂θ = 2θ on trainable entries)

    Args:
      params: pytree of arrays; mask: optional bool pytree of the same structure.

    Returns:
      scalar (float32 or wider).
    """
    return _masked_sum(jnp.square, params, (), mask)


def l2_sp(params: PyTree, anchor: PyTree, mask: PyTree | None = None) -> jax.Array:
    """L2-SP: squared distance to the pretrained starting point θ₀, WITHOUT ½.

    R(θ) = Σ_{leaves ℓ} Σ_j m_{ℓ,j} (θ_{ℓ,j} − θ₀_{ℓ,j})²      (∂R/∂θ = 2(θ − θ₀))

    The anchor is constant (``stop_gradient``). Li et al. (2018) apply this to the
    transferred backbone and a plain L2 to the new head: use two masks for that.

    Args:
      params: pytree θ; anchor: pytree θ₀ with the same structure and leaf shapes;
      mask: optional bool pytree of the same structure.

    Returns:
      scalar (float32 or wider).
    """
    _check_structure("anchor", anchor, params)
    for (kp, p), a in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(anchor)):
        if jnp.shape(a) != jnp.shape(p):
            raise ValueError(f"anchor leaf {path_str(kp)!r} must have the param's shape {jnp.shape(p)}, "
                             f"got {jnp.shape(a)}")
    anchor = jax.lax.stop_gradient(anchor)
    return _masked_sum(lambda t, t0: jnp.square(t - t0), params, (anchor,), mask)


def regularizer_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{term: λ}`` for the terms with λ > 0; ValueError naming ``config.loss.<term>`` otherwise."""
    out = {}
    for term in TERMS:
        value = config_number(f"config.loss.{term}", config.loss.get(term, 0.0))
        if value > 0:
            out[term] = value
    return out


def trainable_paths(params: PyTree, rules: list, groups: Any = None) -> list[tuple]:
    """Key tuples (``('backbone', 'conv1', 'kernel')``) of the trainable leaves, in tree order
    (``groups``: the run's resolved :class:`~tl_jax.params.param_rules.ParamGroups`, if any)."""
    mask = groups.trainable() if groups is not None else rules_lib.trainable_mask(params, rules)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    out = []
    for key_path, trainable in flat:
        if trainable:
            out.append(tuple(k.key for k in key_path))
    return out


def subset(tree: PyTree, paths: list[tuple]) -> dict:
    """Nested dict holding only the leaves at ``paths`` (same nesting as ``tree``)."""
    out: dict = {}
    for path in paths:
        src, dst = tree, out
        for k in path[:-1]:
            src = src[k]
            dst = dst.setdefault(k, {})
        dst[path[-1]] = src[path[-1]]
    return out


@dataclasses.dataclass(frozen=True)
class Penalties:
    """The named penalty terms ``λ_k R_k(θ)`` of a run over its trainable leaves ``paths``.

    Called as ``penalties(params, aux) -> (Σ_k λ_k R_k, {'train/reg/<k>': λ_k R_k})``; λ_k are
    ``config.loss.<k>`` (traced in vectorised sweeps: :func:`~tl_jax.objectives.base.hparam`).
    """

    weights: tuple[tuple[str, float], ...]  # (term, λ > 0) in TERMS order
    paths: tuple[tuple, ...]   # key tuples of the trainable leaves, in tree order

    def __call__(self, params: PyTree, aux: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
        theta = subset(params, list(self.paths))
        w = {k: hparam(aux, f"loss.{k}", v) for k, v in self.weights}  # traced in vectorised sweeps
        terms = {}
        if "l1" in w:
            terms["l1"] = w["l1"] * l1(theta)
        if "l2" in w:
            terms["l2"] = w["l2"] * l2(theta)
        if "l2_sp" in w:
            terms["l2_sp"] = w["l2_sp"] * l2_sp(theta, aux[ANCHOR_KEY])
        total = sum(terms.values(), jnp.zeros((), jnp.float32))
        return total, {f"train/reg/{k}": v for k, v in terms.items()}


def penalties(config: ml_collections.ConfigDict, params: PyTree, groups: Any, aux: dict, objective_name: str
              ) -> tuple[Penalties | None, dict]:
    """``(Penalties or None, aux)`` of the ``config.loss`` regularisers.

    ``params`` are the run's starting params (model + extras, ``init_from`` merged
    in) and ``groups`` their resolved :class:`~tl_jax.params.param_rules.ParamGroups`;
    for L2-SP the trainable leaves become ``aux['reg_anchor']``. With every weight 0:
    ``(None, aux)`` unchanged.
    """
    weights = regularizer_weights(config)
    if not weights:
        return None, aux
    paths = trainable_paths(params, [], groups)
    if not paths:
        raise ValueError(f"config.loss.{'/'.join(weights)} > 0 but config.param_rules freezes every param")
    if "l2_sp" in weights:
        if ANCHOR_KEY in aux:
            raise ValueError(f"objective {objective_name!r} already uses state.aux[{ANCHOR_KEY!r}]; "
                             f"config.loss.l2_sp cannot add its anchor")
        anchor = jax.tree.map(lambda x: jnp.array(x, copy=True), subset(params, paths))
        aux = {**aux, ANCHOR_KEY: anchor}
    return Penalties(tuple(weights.items()), tuple(paths)), aux
