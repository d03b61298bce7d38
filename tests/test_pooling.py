"""max_pool_2x2: bit-identical values and gradients to flax's reduce_window max pool."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.models.pooling import max_pool_2x2


def _reference(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 9, 3), (1, 2, 2, 1)])
def test_values_and_grads_equal_reduce_window_with_ties(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape) * 2) / 2, 0), jnp.float32)  # many ties
    out_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    g = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    np.testing.assert_array_equal(max_pool_2x2(x), _reference(x))
    ours = jax.jit(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0])(x, g)
    ref = jax.jit(lambda x, g: jax.vjp(_reference, x)[1](g)[0])(x, g)
    np.testing.assert_array_equal(ours, ref)


def test_forward_mode_and_vmap():
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
    t = jnp.ones_like(x)
    _, tangent = jax.jvp(max_pool_2x2, (x,), (t,))
    np.testing.assert_array_equal(tangent, jnp.ones((2, 2, 2, 2)))
    batched = jax.vmap(max_pool_2x2)(x[None])
    np.testing.assert_array_equal(batched[0], _reference(x))


def test_rejects_non_4d():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        max_pool_2x2(jnp.zeros((4, 4, 2)))
