"""CDAN(+E), MCC, MDD, FixMatch, BSS, DELTA, Co-Tuning, FitNets and attention transfer against numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses.da_methods import (cdan_loss, entropy, fixmatch_loss, mcc_loss, mdd_loss, multilinear_map,
                                      randomized_multilinear_map)
from tl_jax.losses.finetune_methods import (attention_map, attention_transfer_loss, bss_loss, category_relationship,
                                            channel_loss_increase, co_tuning_loss, delta_attention, delta_loss,
                                            hint_loss)
from tl_jax.losses.domain_adaptation import gradient_reversal

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


def test_fixmatch_masks_by_confidence_and_trains_only_the_strong_view():
    weak = np.array([[5.0, 0, 0], [0.1, 0, 0.2], [0, 0, 9.0], [0, 3.0, 0]])
    strong = RNG.normal(size=(4, 3))
    p = softmax(weak)
    mask = p.max(1) >= 0.9
    pseudo = p.argmax(1)
    want = np.mean(mask * -np.log(softmax(strong)[np.arange(4), pseudo]))
    loss, m = fixmatch_loss(jnp.asarray(weak), jnp.asarray(strong), threshold=0.9)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["mask_rate"]) == mask.mean() == 0.75
    gw = jax.grad(lambda w: fixmatch_loss(w, jnp.asarray(strong), threshold=0.9)[0])(jnp.asarray(weak))
    assert np.all(np.asarray(gw) == 0)   # pseudo-labels are constants


def test_bss_is_the_sum_of_the_k_smallest_squared_singular_values():
    f = RNG.normal(size=(6, 4))
    s = np.linalg.svd(f, compute_uv=False)
    np.testing.assert_allclose(float(bss_loss(jnp.asarray(f), 1)), s[-1] ** 2, rtol=1e-4)
    np.testing.assert_allclose(float(bss_loss(jnp.asarray(f), 2)), s[-1] ** 2 + s[-2] ** 2, rtol=1e-4)
    # gradient of σ_min² is 2σ u vᵀ (numpy twin)
    u, s_, vt = np.linalg.svd(f, full_matrices=False)
    g = jax.grad(lambda x: bss_loss(x, 1))(jnp.asarray(f))
    np.testing.assert_allclose(np.asarray(g), 2 * s_[-1] * np.outer(u[:, -1], vt[-1]), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(B, D\) = 4\]"):
        bss_loss(jnp.asarray(f), 5)


def test_delta_loss_is_attention_weighted_feature_map_distance():
    f, f0 = RNG.normal(size=(3, 2, 2, 4)), RNG.normal(size=(3, 2, 2, 4))
    w = np.array([0.5, 1.0, 2.0, 0.0])
    want = np.sum(w * ((f - f0) ** 2).sum(axis=(1, 2))) / 3
    np.testing.assert_allclose(float(delta_loss(jnp.asarray(f), jnp.asarray(f0), jnp.asarray(w))), want, rtol=1e-5)
    np.testing.assert_allclose(float(delta_loss(jnp.asarray(f[:, 0, 0]), jnp.asarray(f0[:, 0, 0]))),
                               np.sum((f[:, 0, 0] - f0[:, 0, 0]) ** 2) / 3, rtol=1e-5)
    g0 = jax.grad(lambda b: delta_loss(jnp.asarray(f), b))(jnp.asarray(f0))
    assert np.all(np.asarray(g0) == 0)   # the pretrained features are constants
    d = np.array([0.1, 0.5, -0.2])
    np.testing.assert_allclose(delta_attention(jnp.asarray(d), 0.5), 3 * softmax(d / 0.5), rtol=1e-5)


def np_mean_ce(z, y):
    z = z - z.max(-1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), y])


def test_delta_channel_loss_increase_zeroes_one_channel_at_a_time():
    f = np.maximum(RNG.normal(size=(13, 6)), 0.0) * 2.0   # ReLU-like features: some channels all but off
    f[:, 4] = 0.0                                          # a dead channel: zeroing it changes nothing
    y = RNG.integers(0, 3, size=13)
    w, b = RNG.normal(size=(6, 3)), RNG.normal(size=3)
    want = np.empty(6)
    for c in range(6):   # the definition: CE with channel c set to 0, minus CE (float64)
        g = f.copy()
        g[:, c] = 0.0
        want[c] = np_mean_ce(g @ w + b, y) - np_mean_ce(f @ w + b, y)
    got = channel_loss_increase(jnp.asarray(f), jnp.asarray(y), jnp.asarray(w), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    assert abs(float(got[4])) < 1e-6   # a dead channel: nothing to remove (up to float32 rounding)
    small = channel_loss_increase(jnp.asarray(f), jnp.asarray(y), jnp.asarray(w), jnp.asarray(b), chunk_elements=7)
    np.testing.assert_allclose(np.asarray(small), np.asarray(got), rtol=1e-5, atol=1e-7)   # 13 chunks of 1 row
    with pytest.raises(ValueError, match=r"kernel \[D, K\], bias \[K\] must agree"):
        channel_loss_increase(jnp.asarray(f), jnp.asarray(y), jnp.asarray(w[:5]), jnp.asarray(b))


def test_delta_attention_standardized_is_tllib_softmax_of_z_scores():
    d = np.array([0.0, 0.003, 0.0005, 0.0, 0.012])
    z = (d - d.mean()) / d.std()          # TLlib: (w - mean) / std, then softmax(w / T); here times C
    np.testing.assert_allclose(delta_attention(jnp.asarray(d), 5.0, standardize=True), 5 * softmax(z / 5.0),
                               rtol=1e-5)
    np.testing.assert_allclose(delta_attention(jnp.asarray(d * 100), 5.0, standardize=True),
                               5 * softmax(z / 5.0), rtol=1e-5)   # scale-free
    np.testing.assert_allclose(delta_attention(jnp.zeros(4), 2.0, standardize=True), np.ones(4))  # equal: uniform


def test_co_tuning_relationship_and_soft_targets():
    probs = softmax(RNG.normal(size=(7, 5)))
    labels = np.array([0, 1, 0, 2, 1, 0, 2])
    m = category_relationship(jnp.asarray(probs), jnp.asarray(labels), 4)
    for t in range(3):
        np.testing.assert_allclose(m[t], probs[labels == t].mean(0), rtol=1e-5)
    np.testing.assert_allclose(m[3], np.full(5, 0.2), rtol=1e-6)   # class 3 has no example: uniform
    s = RNG.normal(size=(7, 5))
    logq = np.log(softmax(s))
    want = -np.mean(np.sum(np.asarray(m)[labels] * logq, 1))
    np.testing.assert_allclose(float(co_tuning_loss(jnp.asarray(s), jnp.asarray(labels), m)), want, rtol=1e-5)


def test_hint_and_attention_transfer_losses():
    s, t = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 6))
    np.testing.assert_allclose(float(hint_loss(jnp.asarray(s), jnp.asarray(t))), 0.5 * np.sum((s - t) ** 2) / 3,
                               rtol=1e-5)
    a, b = RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 4, 4, 5))   # channel counts may differ
    qa = (np.abs(a) ** 2).sum(-1).reshape(2, -1)
    qb = (np.abs(b) ** 2).sum(-1).reshape(2, -1)
    qa, qb = qa / np.linalg.norm(qa, axis=1, keepdims=True), qb / np.linalg.norm(qb, axis=1, keepdims=True)
    np.testing.assert_allclose(attention_map(jnp.asarray(a)), qa, rtol=1e-5)
    np.testing.assert_allclose(float(attention_transfer_loss(jnp.asarray(a), jnp.asarray(b))),
                               np.sum((qa - qb) ** 2) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="must have the teacher features' shape"):
        hint_loss(jnp.asarray(s), jnp.asarray(t[:, :4]))


def test_entropy_handles_zero_probabilities():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(entropy(jnp.asarray(p)), [0.0, np.log(2)], rtol=1e-6)


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
