"""The public loss functions compose with jit / vmap / grad and give the eager values."""
import jax
import jax.numpy as jnp
import numpy as np

import tl_jax.losses as L

KEY = jax.random.PRNGKey(0)
Z = jax.random.normal(KEY, (4, 5, 3))          # [N, B, C]: N independent batches for vmap
Y = jnp.array([[0, 1, 2, 0, 1]] * 4)
F = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 2))


def test_public_api_exported():
    for name in L.__all__:
        assert hasattr(L, name), name


def test_vmap_and_jit_match_eager():
    ce = jax.jit(jax.vmap(lambda z, y: L.cross_entropy(z, y, label_smoothing=0.1)))(Z, Y)
    np.testing.assert_allclose(ce[2], L.cross_entropy(Z[2], Y[2], label_smoothing=0.1), rtol=1e-6)
    kd = jax.jit(jax.vmap(lambda s, t, y: L.distillation_loss(s, t, y, alpha=0.5, temperature=2.0)[0]))(Z, Z[::-1], Y)
    np.testing.assert_allclose(kd[1], L.distillation_loss(Z[1], Z[2], Y[1], alpha=0.5, temperature=2.0)[0], rtol=1e-5)
    mmd = jax.jit(jax.vmap(lambda a, b: L.mmd_loss(a, b)))(F, F[::-1])
    np.testing.assert_allclose(mmd[0], L.mmd_loss(F[0], F[3]), rtol=1e-5)
    coral = jax.jit(jax.vmap(L.coral_loss))(F, F[::-1])
    np.testing.assert_allclose(coral[0], L.coral_loss(F[0], F[3]), rtol=1e-5)
    md = jax.jit(jax.vmap(lambda l, d: L.multi_domain_loss(l, d, jnp.array([1.0, 2.0, 0.5]))[0]))(
        Z[..., 0], Y)
    np.testing.assert_allclose(md[3], L.multi_domain_loss(Z[3, :, 0], Y[3], jnp.array([1.0, 2.0, 0.5]))[0],
                               rtol=1e-6)


def test_grad_through_a_combined_objective():
    params = {"w": jnp.ones((2, 3)) * 0.1, "log_var": {"a": 0.0, "b": 0.0}}
    anchor = {"w": jnp.zeros((2, 3))}

    @jax.jit
    def objective(p):
        feats = F[0] @ p["w"]                                        # [6, 3]
        ce = L.masked_mean(L.cross_entropy(feats, jnp.array([0, 1, 2, 0, 1, 2])),
                           jnp.array([1, 1, 1, 1, 1, 0]))
        da = L.mmd_loss(L.gradient_reversal(feats[:3], L.dann_lambda(0.5)), feats[3:])
        total, _ = L.uncertainty_weighted({"a": ce, "b": da}, p["log_var"])
        return total + 1e-3 * L.l2_sp({"w": p["w"]}, anchor)

    g = jax.grad(objective)(params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))


def test_per_task_grads_then_pcgrad_under_jit():
    params = {"w": jnp.array([1.0, -1.0]), "b": jnp.array(0.5)}

    def task_losses(p):
        return jnp.stack([jnp.sum(p["w"] ** 2) + p["b"], -jnp.sum(p["w"]) - 2.0 * p["b"]])

    g = jax.jit(lambda p, k: L.pcgrad(L.per_task_grads(task_losses, p), rng=k))(params, KEY)
    # g1 = (2, −2, 1), g2 = (−1, −1, −2): g1·g2 = −2 → g1' = g1 − (−2/6) g2, g2' = g2 − (−2/9) g1
    g1, g2 = np.array([2.0, -2.0, 1.0]), np.array([-1.0, -1.0, -2.0])
    want = g1 + g2 / 3 + g2 + 2 * g1 / 9
    np.testing.assert_allclose(np.append(g["w"], g["b"]), want, rtol=1e-5)
