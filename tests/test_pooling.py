"""The CPU-fast CNN ops (max_pool_2x2, the im2col Conv3x3) and tl_jax's XLA:CPU default flags."""
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


@pytest.mark.parametrize("channels", [1, 3])
def test_im2col_conv1_matches_nn_conv_params_and_outputs(channels):
    from tl_jax.models.im2col import Conv3x3

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 7, channels)), jnp.float32)
    key = jax.random.PRNGKey(3)
    ref_vars = nn.Conv(8, (3, 3)).init(key, x)
    ours_vars = Conv3x3(8).init(key, x)
    for k in ("kernel", "bias"):  # same shapes and init values: checkpoints interchangeable
        np.testing.assert_array_equal(ours_vars["params"][k], ref_vars["params"][k])
    ref = nn.Conv(8, (3, 3)).apply(ref_vars, x)
    np.testing.assert_allclose(Conv3x3(8).apply(ref_vars, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Conv3x3(8, im2col=False).apply(ref_vars, x), ref, rtol=1e-6, atol=1e-6)
    g_ref = jax.grad(lambda v: (nn.Conv(8, (3, 3)).apply(v, x) ** 2).sum())(ref_vars)
    g_ours = jax.grad(lambda v: (Conv3x3(8).apply(v, x) ** 2).sum())(ref_vars)
    np.testing.assert_allclose(g_ours["params"]["kernel"], g_ref["params"]["kernel"], rtol=1e-4, atol=1e-4)


def test_xla_cpu_defaults_respect_user_flags_and_opt_out():
    from tl_jax.util import xla_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply(env) == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.apply(env) == []  # idempotent: the flag is named now
    assert xla_flags.cpu_defaults({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}) == []
    assert xla_flags.cpu_defaults({"TL_JAX_XLA_CPU_DEFAULTS": "0"}) == []
