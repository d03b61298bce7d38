"""multi_domain_loss vs NumPy for both normalisations, absent domain and padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import multi_domain_loss

LOSS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan], np.float32)   # last entry is padding
DOM = np.array([0, 0, 2, 2, 0, 1])
LAM = np.array([1.0, 3.0, 0.5, 2.0], np.float32)                  # domain 3 absent, domain 1 only padded
W = np.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.0], np.float32)
MASK = np.array([1, 1, 1, 1, 1, 0])


def np_multi_domain(loss, dom, lam, w, m, normalization):
    loss, w, m = (np.asarray(a, np.float64) for a in (loss, w, m))
    loss = np.where(w * m != 0, loss, 0.0)
    per = np.zeros(len(lam))
    for d in range(len(lam)):
        sel = dom == d
        num = np.sum(w[sel] * m[sel] * loss[sel])
        if normalization == "domain_mean":
            den = np.sum(w[sel] * m[sel])
            per[d] = lam[d] * num / den if den > 0 else 0.0
        else:
            per[d] = lam[d] * num / max(m.sum(), 1.0)
    return per.sum(), per


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
def test_matches_numpy(normalization):
    total, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK, normalization=normalization)
    want_total, want_per = np_multi_domain(LOSS, DOM, LAM, W, MASK, normalization)
    np.testing.assert_allclose(per, want_per, rtol=1e-6)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    assert np.all(np.isfinite(per)) and per[1] == 0 and per[3] == 0


def test_hand_values():
    # domain 0: weighted mean (1*1 + 0.5*2 + 0*5)/(1.5) = 4/3;  domain 2: (2*3 + 1*4)/3 = 10/3
    _, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK)
    np.testing.assert_allclose(per, [4 / 3, 0.0, 0.5 * 10 / 3, 0.0], rtol=1e-6)
    # global: 5 real examples; domain 0: 1*(1 + 1 + 0)/5, domain 2: 0.5*(6 + 4)/5
    _, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK, normalization="global_mean")
    np.testing.assert_allclose(per, [2 / 5, 0.0, 1.0, 0.0], rtol=1e-6)


def test_defaults_reduce_to_means():
    loss = jnp.array([1.0, 2.0, 3.0, 6.0])
    dom = jnp.array([0, 1, 1, 0])
    total, _ = multi_domain_loss(loss, dom, jnp.ones(2), normalization="global_mean")
    np.testing.assert_allclose(total, 3.0)             # plain mean
    total, per = multi_domain_loss(loss, dom, jnp.ones(2))
    np.testing.assert_allclose(per, [3.5, 2.5])         # per-domain means


def test_gradient_finite_and_zero_on_padding():
    f = jax.jit(lambda l: multi_domain_loss(l, DOM, LAM, example_weights=W, mask=MASK)[0])
    g = np.asarray(jax.grad(f)(jnp.asarray(LOSS)))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, [1 / 1.5, 0.5 / 1.5, 0.5 * 2 / 3, 0.5 / 3, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(normalization="global_sum"), "normalization"),
    (dict(domain_weights=np.array([1.0, -1.0, 1.0, 1.0])), "domain_weights"),
    (dict(domain_weights=np.array([1.0, np.inf, 1.0, 1.0])), "domain_weights"),
    (dict(example_weights=-W), "example_weights"),
    (dict(example_weights=W[:3]), "example_weights"),
    (dict(mask=MASK[:2]), "mask"),
    (dict(domain_ids=DOM[:5]), "domain_ids"),
    (dict(domain_ids=DOM + 2), "domain_ids"),
])
def test_bad_args(kwargs, match):
    args = dict(per_example_loss=LOSS, domain_ids=DOM, domain_weights=LAM) | kwargs
    with pytest.raises(ValueError, match=match):
        multi_domain_loss(**args)
