"""Parameter-norm regularisers: L1, L2 (toward zero) and L2-SP (toward the
pretrained starting point, Li, Grandvalet & Davoine, 2018).

``mask`` is an optional pytree with the same structure as ``params`` whose leaves
are bools (True = trainable, counted; False = frozen, skipped). A Python-bool
leaf selects the whole parameter (a False leaf is left out of the computation,
so its gradient is exactly zero); a bool array leaf of the parameter's shape
selects elements (a 0-d bool array, e.g. a traced Python bool, selects the
whole leaf via ``where``; its gradient is still exactly zero). A mask of another structure raises ``ValueError``.
The sums are accumulated in at least float32.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.losses._checks import path_str

PyTree = Any


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
