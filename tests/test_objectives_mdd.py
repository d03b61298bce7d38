"""MDD: the disparity loss vs TLlib's form; the adversary and the reversed backbone gradient."""
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.mdd import mdd_loss
from tl_jax.params.param_rules import flatten_paths
from objective_setup import BATCH, outputs, setup


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mdd_loss_matches_tllib_and_its_gradients_point_the_right_way():
    ys, yt = RNG.normal(size=(5, 3)), RNG.normal(size=(4, 3))
    as_, at = RNG.normal(size=(5, 3)), RNG.normal(size=(4, 3))
    ps, pt = softmax(as_), softmax(at)
    hs, ht = ys.argmax(1), yt.argmax(1)
    want = 4.0 * np.mean(-np.log(ps[np.arange(5), hs])) - np.mean(np.log(1 - pt[np.arange(4), ht] + 1e-6))
    got = mdd_loss(jnp.asarray(ys), jnp.asarray(as_), jnp.asarray(yt), jnp.asarray(at), margin=4.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # minimising over the adversary: raise its source agreement, lower its target agreement
    g_s, g_t = jax.grad(lambda a, b: mdd_loss(jnp.asarray(ys), a, jnp.asarray(yt), b), argnums=(0, 1))(
        jnp.asarray(as_), jnp.asarray(at))
    assert np.all(np.asarray(g_s)[np.arange(5), hs] < 0) and np.all(np.asarray(g_t)[np.arange(4), ht] > 0)


def test_mdd_adversary_minimises_and_the_backbone_gets_the_reversed_gradient():
    obj, params, aux = setup("mdd", weight=0.7, margin=2.0)
    step = 60
    lam = float(obj.grl_max * (2 / (1 + np.exp(-10 * 0.6)) - 1))

    def plain(p):  # the same MDD term without gradient reversal
        z, f = outputs(obj, p, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
        adv = obj.adversary.apply({"params": p["adversary"]}, f)
        return mdd_loss(z[:8], adv[:8], z[8:], adv[8:], margin=2.0)

    def ce(p):
        z, _ = outputs(obj, p, BATCH["image"])
        return cross_entropy(z, BATCH["label"]).mean()

    total = flatten_paths(jax.grad(lambda p: obj.loss(p, {}, aux, BATCH, None, step)[0])(params))
    g_mdd, g_ce = flatten_paths(jax.grad(plain)(params)), flatten_paths(jax.grad(ce)(params))
    for path in total:
        want = 0.7 * g_mdd[path] if path.startswith("adversary/") else g_ce[path] - lam * 0.7 * g_mdd[path]
        np.testing.assert_allclose(total[path], want, rtol=2e-4, atol=1e-6, err_msg=path)
    assert np.abs(g_mdd["backbone/fc/kernel"]).max() > 0
