"""PCGrad, gradient surgery for multi-task learning (Yu et al. 2020), and the per-task gradients it needs.

Used by ``multitask`` and ``joint`` with ``weighting='pcgrad'``: the per-task
gradients g_i come from ONE ``jax.jacrev`` pass (:func:`per_task_grads`, leaves
``[T, ...]``), conflicting components are projected away (:func:`pcgrad`) and the
update uses G = Σ_i g_i^PC.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _num_tasks(task_grads: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(task_grads)
    if not leaves:
        raise ValueError("task_grads must have at least one leaf")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"task_grads leaves must share a leading task axis [T, ...], got sizes {sizes}")
    return sizes.pop()


def pcgrad(task_grads: PyTree, *, rng: jax.Array | None = None) -> PyTree:
    """PCGrad: project away conflicting gradient components, then sum (Yu et al. 2020).

    For every task i (vectorised with ``vmap``), g_i^PC ← g_i, then for each other
    task j in order π_i (a random permutation per i if ``rng`` is given, else
    0, 1, …, T−1):

        if g_i^PC · g_j < 0:   g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j

    and the result is G = Σ_i g_i^PC. Dot products are over the full flattened
    parameter vector (all leaves). Implementation: every g_i^PC is a linear
    combination Σ_k c_{i,k} g_k of the original gradients, so the loop runs on the
    T×T Gram matrix M_{k,j} = g_k · g_j (``lax.scan`` over j) and the output is
    G = Σ_k (Σ_i c_{i,k}) g_k per leaf — no concatenated copy of the parameters.
    Tasks with ‖g_j‖ = 0 never trigger a projection.

    Args:
      task_grads: pytree whose leaves have shape [T, ...] (e.g. :func:`per_task_grads`).
      rng: optional PRNG key for the random projection order.

    Returns:
      pytree like ``task_grads`` without the task axis.
    """
    num_tasks = _num_tasks(task_grads)
    leaves = jax.tree_util.tree_leaves(task_grads)
    dtype = jnp.result_type(*leaves, jnp.float32)
    gram = sum(jnp.einsum("tp,sp->ts", x.reshape(num_tasks, -1).astype(dtype),
                          x.reshape(num_tasks, -1).astype(dtype)) for x in leaves)
    sq_norm = jnp.diagonal(gram)
    eye = jnp.eye(num_tasks, dtype=dtype)
    if rng is None:
        orders = jnp.tile(jnp.arange(num_tasks), (num_tasks, 1))
    else:
        keys = jax.random.split(rng, num_tasks)
        orders = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)

    def project_one(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(c: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            dot = c @ gram[:, j]                          # g_i^PC · g_j
            norm = sq_norm[j]
            conflict = (dot < 0) & (norm > 0) & (j != i)
            coef = jnp.where(conflict, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
            return c - coef * eye[j], None

        c, _ = jax.lax.scan(step, eye[i], order)
        return c

    coeffs = jax.vmap(project_one)(jnp.arange(num_tasks), orders)   # [T, T]: c_{i,k}
    weights = jnp.sum(coeffs, axis=0)                                # Σ_i c_{i,k}
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), task_grads)


def per_task_grads(loss_vector_fn: Callable[..., jax.Array], params: PyTree, *args: Any) -> PyTree:
    """Per-task gradients ∂L_t/∂θ for t = 1..T from ONE vectorised backward pass.

    J_t = ∇_θ L_t(θ, *args),   [L_1, …, L_T] = loss_vector_fn(θ, *args)

    Uses ``jax.jacrev``: one forward pass, then the VJP is ``vmap``-ed over the T
    one-hot cotangents, i.e. a single backward computation batched over tasks,
    not T separate ``jax.grad`` calls (and not T forward passes).

    Args:
      loss_vector_fn: ``(params, *args) -> [T]`` task losses.
      params: pytree of parameters.
      *args: extra arguments passed through (not differentiated).

    Returns:
      pytree like ``params`` whose leaves have a leading task axis [T, ...].
    """
    out = jax.eval_shape(loss_vector_fn, params, *args)
    if not hasattr(out, "shape") or len(out.shape) != 1:
        raise ValueError(f"loss_vector_fn must return a [T] vector of task losses, got {out}")
    return jax.jacrev(loss_vector_fn)(params, *args)
