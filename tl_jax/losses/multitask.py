"""Multi-task objectives ``L = Σ_i λ_i L_i``: fixed weights, learned uncertainty
weights (Kendall et al. 2018) and gradient surgery (PCGrad, Yu et al. 2020).

Task losses are passed as ``{task_name: scalar}`` dicts. ``terms`` dicts use
'/'-separated logging keys: ``loss/<task>`` (raw L_i), ``weighted/<task>``
(λ_i L_i) and ``weight/<task>`` (λ_i).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tl_jax.losses._checks import check_same_keys, check_scalar

PyTree = Any


def _check_losses(losses: Mapping[str, Any]) -> None:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(f"losses must be a non-empty dict of task -> scalar loss, got {losses!r}")
    for name, value in losses.items():
        if jnp.ndim(value) != 0:
            raise ValueError(f"losses[{name!r}] must be a scalar, got shape {jnp.shape(value)}")


def weighted_sum(losses: Mapping[str, jax.Array], weights: Mapping[str, float]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fixed-weight multi-task loss.

    L = Σ_i λ_i L_i

    A task whose weight is the Python number 0 is left out of the sum entirely,
    so it contributes exactly zero gradient (even if its L_i is inf/NaN).

    Args:
      losses: {task: scalar L_i}.
      weights: {task: λ_i >= 0, finite}; same keys as ``losses``.

    Returns:
      (total scalar L, terms) with ``loss/<t>``, ``weighted/<t>``, ``weight/<t>``.
    """
    _check_losses(losses)
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a dict of task -> float, got {type(weights).__name__}")
    check_same_keys("weights", weights, "losses", losses)
    for name, lam in weights.items():
        check_scalar(f"weights[{name!r}]", lam, low=0.0)
    total = jnp.zeros((), jnp.result_type(*losses.values(), jnp.float32))
    terms: dict[str, jax.Array] = {}
    for name, loss in losses.items():
        lam = weights[name]
        weighted = lam * loss
        if not (isinstance(lam, (int, float)) and lam == 0):
            total = total + weighted
        terms[f"loss/{name}"] = loss
        terms[f"weighted/{name}"] = weighted
        terms[f"weight/{name}"] = jnp.asarray(lam, jnp.float32)
    return total, terms


def uncertainty_weighted(losses: Mapping[str, jax.Array], log_vars: Mapping[str, jax.Array]
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla, 2018).

    L = Σ_i exp(−s_i)·L_i + s_i,     s_i = log σ_i²  (trainable, one scalar per task)

    Convention: the same form is used for every task, classification included.
    With factor convention λ_i = exp(−s_i) = 1/σ_i² on the loss and +s_i = log σ_i²
    as regulariser, this is 2× Kendall's Gaussian (regression) objective
    (1/(2σ²))L + log σ, and it is NOT Kendall's classification variant
    (1/σ²)L + log σ = exp(−s)L + s/2. The common simplified form is used so that
    all tasks share one optimum: ∂L/∂s_i = −exp(−s_i)L_i + 1 = 0 ⇒ s_i* = log L_i,
    i.e. effective weight 1/L_i. Initialise s_i = 0 (weight 1).

    Args:
      losses: {task: scalar L_i}.
      log_vars: {task: scalar s_i}; same keys as ``losses``.

    Returns:
      (total scalar L, terms) with ``loss/<t>``, ``weighted/<t>`` (exp(−s_i)L_i),
      ``weight/<t>`` (exp(−s_i), gradient-stopped, for logging) and ``log_var/<t>``.
    """
    _check_losses(losses)
    if not isinstance(log_vars, Mapping):
        raise ValueError(f"log_vars must be a dict of task -> scalar, got {type(log_vars).__name__}")
    check_same_keys("log_vars", log_vars, "losses", losses)
    for name, s in log_vars.items():
        if jnp.ndim(s) != 0:
            raise ValueError(f"log_vars[{name!r}] must be a scalar, got shape {jnp.shape(s)}")
        check_scalar(f"log_vars[{name!r}]", s, low=None)
    total = jnp.zeros((), jnp.result_type(*losses.values(), *log_vars.values(), jnp.float32))
    terms: dict[str, jax.Array] = {}
    for name, loss in losses.items():
        s = log_vars[name]
        precision = jnp.exp(-s)
        weighted = precision * loss
        total = total + weighted + s
        terms[f"loss/{name}"] = loss
        terms[f"weighted/{name}"] = weighted
        terms[f"weight/{name}"] = jax.lax.stop_gradient(precision)
        terms[f"log_var/{name}"] = jax.lax.stop_gradient(s)
    return total, terms


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
