"""MCC: the class-confusion loss vs the paper's formula; the objective is CE + w·MCC(target)."""
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.mcc import mcc_loss
from objective_setup import BATCH, outputs, setup


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_entropy(p):
    return -np.sum(p * np.log(p), -1)


def test_mcc_loss_matches_the_paper():
    z = RNG.normal(size=(6, 4)) * 2
    t = 2.5
    p = softmax(z / t)
    w = 1 + np.exp(-np_entropy(p))
    w = 6 * w / w.sum()
    c = (p * w[:, None]).T @ p
    c = c / c.sum(0, keepdims=True)
    want = (c.sum() - np.trace(c)) / 4
    np.testing.assert_allclose(float(mcc_loss(jnp.asarray(z), t)), want, rtol=1e-5)
    assert float(mcc_loss(jnp.asarray(np.eye(4)[[0, 1, 2, 3]] * 200.0), 1.0)) < 1e-6   # one-hot: no confusion
    g = jax.grad(lambda x: mcc_loss(x, t))(jnp.asarray(z))
    assert np.abs(np.asarray(g)).max() > 0


def test_mcc_loss_is_ce_plus_weighted_confusion_of_the_target():
    obj, params, aux = setup("mcc", weight=2.0, temperature=3.0)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    z, _ = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
    want = cross_entropy(z[:8], BATCH["label"]).mean() + 2.0 * mcc_loss(z[8:], 3.0)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
