"""CDAN(+E): the multilinear map and weighted BCE vs NumPy; the objective's loss and randomized map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.objectives.classification import cross_entropy, entropy
from tl_jax.objectives.cdan import cdan_loss, multilinear_map, randomized_multilinear_map
from tl_jax.objectives.domain_adaptation import gradient_reversal
from objective_setup import BATCH, outputs, setup


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_entropy(p):
    return -np.sum(p * np.log(p), -1)


def bce(z, y):
    s = 1 / (1 + np.exp(-z))
    return -(y * np.log(s) + (1 - y) * np.log(1 - s))


def test_multilinear_map_is_the_flattened_outer_product():
    f, g = RNG.normal(size=(3, 5)), softmax(RNG.normal(size=(3, 4)))
    want = np.stack([np.outer(g[b], f[b]).ravel() for b in range(3)])
    np.testing.assert_allclose(multilinear_map(jnp.asarray(f), jnp.asarray(g)), want, rtol=1e-5)
    rf, rg = RNG.normal(size=(5, 7)), RNG.normal(size=(4, 7))
    np.testing.assert_allclose(randomized_multilinear_map(jnp.asarray(f), jnp.asarray(g), jnp.asarray(rf),
                                                          jnp.asarray(rg)), (f @ rf) * (g @ rg) / np.sqrt(7), rtol=1e-5)


@pytest.mark.parametrize("use_e", [False, True])
def test_cdan_loss_matches_weighted_bce(use_e):
    zs, zt = RNG.normal(size=5), RNG.normal(size=3)
    gs, gt = softmax(RNG.normal(size=(5, 4)) * 3), softmax(RNG.normal(size=(3, 4)))
    z = np.concatenate([zs, zt])
    y = np.concatenate([np.ones(5), np.zeros(3)])
    w = 1 + np.exp(-np_entropy(np.concatenate([gs, gt]))) if use_e else np.ones(8)
    want = np.mean(8 * w / w.sum() * bce(z, y))
    got = cdan_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(gs), jnp.asarray(gt), entropy_conditioning=use_e)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if use_e:  # the weights differ from uniform, so +E changes the value
        assert abs(float(got) - np.mean(bce(z, y))) > 1e-4


def test_grl_reverses_cdan_discriminator_gradient():
    # sanity of the wiring used by the objectives: GRL in front of the map flips the feature gradient
    f = jnp.asarray(RNG.normal(size=(4, 3)))
    g = jnp.asarray(softmax(RNG.normal(size=(4, 2))))
    w = jnp.asarray(RNG.normal(size=(6,)))

    def loss(x, lam):
        z = multilinear_map(gradient_reversal(x, lam), g) @ w
        return cdan_loss(z[:2], z[2:], g[:2], g[2:])

    plain = jax.grad(loss)(f, -1.0)   # λ = −1: the GRL passes the gradient unchanged
    np.testing.assert_allclose(jax.grad(loss)(f, 0.5), -0.5 * plain, rtol=1e-5)
    assert np.abs(np.asarray(plain)).max() > 0


def test_cdan_e_loss_is_ce_plus_weighted_conditional_adversarial_term():
    obj, params, aux = setup("cdan", weight=0.5, entropy=True)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 30)
    z, f = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
    g = jax.nn.softmax(z)
    d = obj.discriminator.apply({"params": params["discriminator"]}, multilinear_map(f, g))
    term = cdan_loss(d[:8], d[8:], g[:8], g[8:], entropy_conditioning=True)
    ce = cross_entropy(z[:8], BATCH["label"]).mean()
    np.testing.assert_allclose(float(loss), float(ce + 0.5 * term), rtol=1e-5)
    assert params["discriminator"]["fc0"]["kernel"].shape == (10 * 512, 256)   # reads the C·D map


def test_cdan_randomized_map_keeps_its_matrices_in_aux():
    obj, params, aux = setup("cdan", randomized_dim=64)
    assert aux["cdan_random"]["r_f"].shape == (512, 64) and aux["cdan_random"]["r_g"].shape == (10, 64)
    assert params["discriminator"]["fc0"]["kernel"].shape == (64, 256)
    assert np.isfinite(float(obj.loss(params, {}, aux, BATCH, None, 3)[0]))
