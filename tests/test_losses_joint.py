"""``joint_loss`` against the formula written out in numpy (loops over d, i, b)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses.joint import joint_loss
from tl_jax.losses.multidomain import multi_domain_loss


def reference(ce, dom, lam, mask, normalization):
    """Σ_d Σ_i λ_{d,i} · (mean_{b∈d} | Σ_{b∈d} /B') CE_i(b), pairs with λ = 0 skipped, by plain loops."""
    num_d, num_t = lam.shape
    total, per = 0.0, np.zeros((num_d, num_t))
    real = sum(mask)
    for d in range(num_d):
        for i in range(num_t):
            if lam[d, i] == 0:
                continue
            s, n = 0.0, 0
            for b in range(len(dom)):
                if dom[b] == d and mask[b]:
                    s += ce[i, b]
                    n += 1
            if normalization == "domain_mean":
                term = lam[d, i] * (s / n if n else 0.0)
            else:
                term = lam[d, i] * s / max(real, 1)
            per[d, i] = term
            total += term
    return total, per


def case(seed=0, b=12, d=3, t=2):
    r = np.random.default_rng(seed)
    ce = r.uniform(0.1, 3.0, size=(t, b)).astype(np.float32)
    dom = r.integers(0, d - 1, size=b).astype(np.int32)          # domain d-1 absent from the batch
    lam = r.uniform(0.2, 2.0, size=(d, t))
    if t > 1:
        lam[0, 1] = 0.0                                         # task 1 absent from domain 0
    mask = (r.uniform(size=b) > 0.2).astype(np.float32)
    return ce, dom, lam, mask


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loops(normalization, seed):
    ce, dom, lam, mask = case(seed)
    total, weighted, means = joint_loss(ce, dom, lam, mask=mask, normalization=normalization)
    ref_total, ref_per = reference(ce, dom, lam, mask, normalization)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weighted), ref_per, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(weighted)[2] == 0)                  # absent domain adds 0
    if normalization == "domain_mean":
        i = 0
        sel = (dom == 1) & (mask > 0)
        np.testing.assert_allclose(float(means[1, i]), ce[i, sel].mean(), rtol=1e-6)


def test_inactive_pairs_get_no_gradient_even_with_nan():
    ce, dom, lam, mask = case(3)
    ce[1, dom == 0] = np.nan                                     # task 1 has no labels on domain 0
    grad = jax.grad(lambda x: joint_loss(x, dom, lam, mask=mask)[0])(jnp.asarray(ce))
    g = np.asarray(grad)
    assert np.all(np.isfinite(g))
    assert np.all(g[1, dom == 0] == 0) and np.all(g[:, mask == 0] == 0)
    assert np.any(g[0, (dom == 0) & (mask > 0)] != 0)


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
def test_one_task_is_multi_domain_loss(normalization):
    ce, dom, lam, mask = case(4, t=1)
    lam[0, 0] = 0.7
    total, weighted, _ = joint_loss(ce, dom, lam, mask=mask, normalization=normalization)
    md_total, md_per = multi_domain_loss(ce[0], dom, lam[:, 0], mask=mask, normalization=normalization)
    np.testing.assert_allclose(float(total), float(md_total), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weighted)[:, 0], np.asarray(md_per), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=np.ones((2, 3))), r"weights must have shape \[D, 2\]"),
    (dict(weights=-np.ones((2, 2))), "finite and >= 0"),
    (dict(weights=np.full((2, 2), np.nan)), "finite and >= 0"),
    (dict(normalization="sum"), "normalization"),
    (dict(domain_ids=np.array([0, 5, 0, 1], np.int32)), r"domain_ids must be in \[0, 2\)"),
])
def test_bad_input(kwargs, match):
    args = dict(per_example_losses=np.ones((2, 4), np.float32), domain_ids=np.array([0, 1, 0, 1], np.int32),
                weights=np.ones((2, 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        joint_loss(**args)
