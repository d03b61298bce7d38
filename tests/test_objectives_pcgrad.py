"""PCGrad and per-task gradients vs NumPy and hand-computed projections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.objectives.pcgrad import pcgrad, per_task_grads


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
