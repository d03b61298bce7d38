"""2x2 / stride-2 max pooling that is fast to differentiate on XLA:CPU.

``flax.linen.max_pool`` lowers to ``reduce_window``, whose gradient is XLA's
``select_and_scatter``, which is slow on the CPU: a large share of a small
CNN's train step (``BENCHMARKS.md``, "CPU convolution gap"). :func:`max_pool_2x2` computes the same forward values with a reshape and
a max, and defines its derivative with ``jax.custom_jvp`` as "the tangent of the
first maximum of each window, in row-major window order": exactly the choice
``select_and_scatter`` makes (it keeps the earlier element on ties), so values
*and* gradients are bit-identical to ``nn.max_pool(x, (2, 2), strides=(2, 2))``,
ties included. The JVP is linear in the tangent, so reverse mode (``grad``),
forward mode (``jvp``) and ``vmap`` all work.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _windows(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` (H, W even) -> ``[B, H/2, 2, W/2, 2, C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def _pool_even(x: jax.Array) -> jax.Array:
    return _windows(x).max(axis=(2, 4))


@_pool_even.defjvp
def _pool_even_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    xw, tw = _windows(x), _windows(t)
    y = xw.max(axis=(2, 4))
    taken = None
    out = None
    for i in range(2):
        for j in range(2):  # row-major window order, as select_and_scatter visits it
            hit = xw[:, :, i, :, j, :] == y
            first = hit if taken is None else hit & ~taken
            taken = hit if taken is None else taken | hit
            term = jnp.where(first, tw[:, :, i, :, j, :], jnp.zeros((), t.dtype))
            out = term if out is None else out + term
    return y, out


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))`` (VALID) for ``[B, H, W, C]`` inputs.

    Odd trailing rows/columns are dropped, as VALID pooling does. Same values and
    same gradients as the ``reduce_window`` version, several times faster to
    differentiate on XLA:CPU.
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool_2x2 expects [B, H, W, C], got shape {x.shape}")
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    if (h, w) != x.shape[1:3]:
        x = x[:, :h, :w, :]
    return _pool_even(x)
