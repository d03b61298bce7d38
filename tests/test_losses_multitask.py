"""weighted_sum, uncertainty_weighted, pcgrad, per_task_grads vs NumPy / hand values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import pcgrad, per_task_grads, uncertainty_weighted, weighted_sum

LOSSES = {"cls": 1.5, "seg": 0.25, "depth": 4.0}


def test_weighted_sum_matches_numpy():
    weights = {"cls": 1.0, "seg": 2.0, "depth": 0.5}
    total, terms = weighted_sum({k: jnp.float32(v) for k, v in LOSSES.items()}, weights)
    np.testing.assert_allclose(total, 1.5 + 0.5 + 2.0, rtol=1e-6)
    np.testing.assert_allclose(terms["weighted/seg"], 0.5)
    np.testing.assert_allclose(terms["weight/depth"], 0.5)
    np.testing.assert_allclose(terms["loss/cls"], 1.5)


@pytest.mark.parametrize("weights, match", [
    ({"cls": 1.0, "seg": 1.0}, "missing \\['depth'\\]"),
    ({"cls": 1.0, "seg": 1.0, "depth": 1.0, "aux": 1.0}, "extra \\['aux'\\]"),
    ({"cls": -1.0, "seg": 1.0, "depth": 1.0}, "weights\\['cls'\\]"),
    ({"cls": float("inf"), "seg": 1.0, "depth": 1.0}, "weights\\['cls'\\]"),
])
def test_weighted_sum_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_sum(LOSSES, weights)


def test_zero_weight_removes_task_gradient():
    def total(theta, lam_b):
        losses = {"a": jnp.sum(theta ** 2), "b": jnp.sum(3.0 * theta)}
        return weighted_sum(losses, {"a": 1.0, "b": lam_b})[0]

    theta = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(jax.grad(total)(theta, 0.0), 2 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(jax.grad(total)(theta, 1.0), 2 * np.array([1.0, -2.0]) + 3.0)
    # even an inf loss with weight 0 contributes nothing
    tot, _ = weighted_sum({"a": jnp.float32(2.0), "b": jnp.float32(np.inf)}, {"a": 1.0, "b": 0.0})
    assert float(tot) == 2.0


def test_uncertainty_weighted_formula_and_grad():
    s = {"cls": 0.0, "seg": 1.0, "depth": -0.5}
    losses = {k: jnp.float32(v) for k, v in LOSSES.items()}
    log_vars = {k: jnp.float32(v) for k, v in s.items()}
    total, terms = uncertainty_weighted(losses, log_vars)
    want = sum(np.exp(-s[k]) * LOSSES[k] + s[k] for k in LOSSES)
    np.testing.assert_allclose(total, want, rtol=1e-6)
    for k in LOSSES:
        np.testing.assert_allclose(terms[f"weight/{k}"], np.exp(-s[k]), rtol=1e-6)
    g = jax.grad(lambda lv: uncertainty_weighted(losses, lv)[0])(log_vars)
    for k in LOSSES:
        np.testing.assert_allclose(g[k], -np.exp(-s[k]) * LOSSES[k] + 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="log_vars keys"):
        uncertainty_weighted(losses, {"cls": 0.0})


def np_pcgrad(g, orders):
    g = np.asarray(g, np.float64)
    out = []
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            d = gi @ g[j]
            if d < 0:
                gi = gi - d / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return np.sum(out, axis=0)


def test_pcgrad_two_conflicting_vectors_by_hand():
    g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    # g1·g2 = -1: g1 -> (1,0) - (-1/2)(-1,1) = (0.5, 0.5);  g2 -> (-1,1) - (-1/1)(1,0) = (0, 1)
    np.testing.assert_allclose(pcgrad(g), [0.5, 1.5], atol=1e-6)


def test_pcgrad_non_conflicting_is_plain_sum():
    g = jnp.array([[1.0, 2.0], [3.0, 0.5]])
    np.testing.assert_allclose(pcgrad(g), [4.0, 2.5], atol=1e-6)


def test_pcgrad_three_tasks_pytree_fixed_and_random_order():
    g = np.array([[1.0, 0.0, 2.0], [-2.0, 1.0, -1.0], [0.5, -3.0, 0.0]], np.float32)
    tree = {"w": jnp.asarray(g[:, :2]), "b": jnp.asarray(g[:, 2])}     # dot products span both leaves
    got = pcgrad(tree)
    want = np_pcgrad(g, [range(3)] * 3)
    np.testing.assert_allclose(got["w"], want[:2], rtol=1e-5)
    np.testing.assert_allclose(got["b"], want[2], rtol=1e-5)
    key = jax.random.PRNGKey(3)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(key, 3)))
    got_r = jax.jit(lambda t, k: pcgrad(t, rng=k))(tree, key)
    want_r = np_pcgrad(g, orders)
    np.testing.assert_allclose(np.append(got_r["w"], got_r["b"]), want_r, rtol=1e-5)


def test_pcgrad_zero_gradient_task_and_bad_shape():
    g = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(pcgrad(g), [1.0, 0.0])
    with pytest.raises(ValueError, match="task_grads"):
        pcgrad({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})


def test_per_task_grads_matches_separate_grads():
    params = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "b": jnp.array([0.1, -0.3])}
    x = jnp.array([0.3, -0.7])

    def task_losses(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return jnp.stack([jnp.sum(h ** 2), jnp.sum(h), h[0] * h[1]])

    jac = per_task_grads(task_losses, params, x)
    for t in range(3):
        g = jax.grad(lambda p: task_losses(p, x)[t])(params)
        for k in params:
            np.testing.assert_allclose(jac[k][t], g[k], rtol=1e-5, atol=1e-7)
    assert jac["w"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="loss_vector_fn"):
        per_task_grads(lambda p, x: jnp.sum(p["b"]), params, x)
