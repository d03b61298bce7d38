"""Residual adaptation: apply_delta / merge / LoRA init and densify / residual logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import apply_delta, init_lora, lora_dense_delta, merge, residual_logits

PARAMS = {
    "conv": {"kernel": jnp.arange(3 * 3 * 2 * 4, dtype=jnp.float32).reshape(3, 3, 2, 4) / 10, "bias": jnp.ones(4)},
    "dense": {"kernel": jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "bias": jnp.zeros(3)},
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
}


def test_apply_dense_subset_delta():
    delta = {"dense": {"kernel": jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])}, "head": {"bias": jnp.ones(2)}}
    out = apply_delta(PARAMS, delta, 0.5)
    np.testing.assert_allclose(out["dense"]["kernel"], [[1.5, 2.0, 2.5], [4.0, 6.0, 6.0]])
    np.testing.assert_allclose(out["head"]["bias"], [0.5, 0.5])
    for path in (("conv", "kernel"), ("conv", "bias"), ("dense", "bias"), ("head", "kernel")):
        np.testing.assert_array_equal(out[path[0]][path[1]], PARAMS[path[0]][path[1]])


def test_init_lora_shapes_zero_b_and_scale():
    delta = init_lora(PARAMS, ["conv/kernel", "dense/.*"], rank=2, rng=jax.random.PRNGKey(0))
    assert set(delta) == {"conv", "dense"} and set(delta["dense"]) == {"kernel"}      # bias skipped
    assert delta["conv"]["kernel"]["a"].shape == (3, 3, 2, 2) and delta["conv"]["kernel"]["b"].shape == (2, 4)
    assert delta["dense"]["kernel"]["a"].shape == (2, 2) and delta["dense"]["kernel"]["b"].shape == (2, 3)
    assert all(np.all(np.asarray(d["kernel"]["b"]) == 0) for d in delta.values())
    # θ starts at θ_source
    out = apply_delta(PARAMS, delta, 4.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, PARAMS)
    # a ~ N(0, 1/fan_in): fan_in = 3·3·2 = 18 for the conv kernel
    big = init_lora({"k": jnp.zeros((256, 8))}, ["k"], rank=64, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.var(np.asarray(big["k"]["a"])), 1 / 256, rtol=0.1)


def test_merge_equals_applying_dense_delta():
    key_a, key_b = jax.random.split(jax.random.PRNGKey(2))
    delta = init_lora(PARAMS, ["conv/kernel", "head/kernel"], rank=3, rng=key_a)
    delta["conv"]["kernel"]["b"] = jax.random.normal(key_b, (3, 4))
    delta["head"]["kernel"]["b"] = jnp.ones((3, 2))
    dense = lora_dense_delta(delta)
    a = np.asarray(delta["conv"]["kernel"]["a"], np.float64).reshape(18, 3)        # [kh·kw·in, r]
    want_conv = (a @ np.asarray(delta["conv"]["kernel"]["b"], np.float64)).reshape(3, 3, 2, 4)
    np.testing.assert_allclose(dense["conv"]["kernel"], want_conv, rtol=1e-5, atol=1e-6)
    merged = merge(PARAMS, delta, 0.3)
    via_dense = apply_delta(PARAMS, dense, 0.3)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), merged, via_dense)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), merged,
                           apply_delta(PARAMS, delta, 0.3))
    np.testing.assert_allclose(merged["conv"]["kernel"], np.asarray(PARAMS["conv"]["kernel"]) + 0.3 * want_conv,
                               rtol=1e-5)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(PARAMS)


def test_gradient_flows_only_into_delta():
    delta = init_lora(PARAMS, ["dense/kernel"], rank=1, rng=jax.random.PRNGKey(3))
    x = jnp.array([[1.0, -1.0]])

    def loss(source, delta):
        p = apply_delta(source, delta, 1.0)
        return jnp.sum((x @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2)

    g_src, g_delta = jax.grad(loss, argnums=(0, 1))(PARAMS, delta)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_src))
    # at b = 0 only B gets a gradient: ∂L/∂B = Aᵀ xᵀ (∂L/∂y)
    assert np.any(np.asarray(g_delta["dense"]["kernel"]["b"]) != 0)
    np.testing.assert_array_equal(g_delta["dense"]["kernel"]["a"], 0.0)


def test_residual_logits():
    np.testing.assert_allclose(residual_logits(jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]), 0.5), [2.5, 1.5])
    with pytest.raises(ValueError, match="diff_logits"):
        residual_logits(jnp.ones((2, 3)), jnp.ones((2, 2)), 1.0)


@pytest.mark.parametrize("fn, match", [
    (lambda: init_lora(PARAMS, ["dense/kernel", "dense/bias"], 2, jax.random.PRNGKey(0)), "rule 'dense/bias'"),
    (lambda: init_lora(PARAMS, ["nothing"], 2, jax.random.PRNGKey(0)), "rule 'nothing'"),
    (lambda: init_lora(PARAMS, ["dense/kernel"], 0, jax.random.PRNGKey(0)), "rank"),
    (lambda: apply_delta(PARAMS, {"dense": {"kernel": jnp.ones((3, 2))}}, 1.0), "delta 'dense/kernel'"),
    (lambda: apply_delta(PARAMS, {"dense": {"w": jnp.ones(2)}}, 1.0), "not in source_params"),
    (lambda: apply_delta(PARAMS, {"dense": {"kernel": jnp.ones((2, 3))}}, float("nan")), "alpha"),
])
def test_bad_args(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()
