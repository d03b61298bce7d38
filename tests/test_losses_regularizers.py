"""l1 / l2 / l2_sp vs NumPy; masks exclude frozen leaves (exactly zero gradient)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import l1, l2, l2_sp

P = {"backbone": {"kernel": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "bias": np.array([-1.0, 0.0], np.float32)},
     "head": {"kernel": np.array([[2.0], [-0.5]], np.float32)}}
A = {"backbone": {"kernel": np.array([[1.0, -1.0], [0.0, 3.0]], np.float32), "bias": np.array([0.0, 0.0], np.float32)},
     "head": {"kernel": np.array([[0.0], [0.0]], np.float32)}}
MASK = {"backbone": {"kernel": False, "bias": True}, "head": {"kernel": True}}


def leaves(t):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(t)]


def test_unmasked_match_numpy():
    np.testing.assert_allclose(l1(P), sum(np.abs(x).sum() for x in leaves(P)), rtol=1e-6)
    np.testing.assert_allclose(l2(P), sum((x ** 2).sum() for x in leaves(P)), rtol=1e-6)
    want = sum(((x - a) ** 2).sum() for x, a in zip(leaves(P), leaves(A)))
    np.testing.assert_allclose(l2_sp(P, A), want, rtol=1e-6)
    # hand values: |·|: 6.5 + 1 + 2.5 = 10;  (θ−θ₀)²: (1 + .25) + 1 + (4 + .25) = 6.5
    np.testing.assert_allclose(l1(P), 10.0)
    np.testing.assert_allclose(l2_sp(P, A), 6.5)


def test_masked_match_numpy_and_frozen_grad_is_zero():
    np.testing.assert_allclose(l1(P, MASK), 1.0 + 2.5)
    np.testing.assert_allclose(l2(P, MASK), 1.0 + 4.25)
    np.testing.assert_allclose(l2_sp(P, A, MASK), 1.0 + 4.25)
    params = jax.tree_util.tree_map(jnp.asarray, P)
    for fn in (lambda p: l1(p, MASK), lambda p: l2(p, MASK), lambda p: l2_sp(p, A, MASK)):
        g = jax.grad(fn)(params)
        assert np.all(np.asarray(g["backbone"]["kernel"]) == 0.0)
        assert np.any(np.asarray(g["head"]["kernel"]) != 0.0)
    g = jax.grad(lambda p: l2_sp(p, A, MASK))(params)
    np.testing.assert_allclose(g["head"]["kernel"], 2 * (P["head"]["kernel"] - A["head"]["kernel"]))


def test_l2_sp_no_gradient_to_anchor_and_jit_mask():
    g = jax.grad(lambda a: l2_sp(P, a))(jax.tree_util.tree_map(jnp.asarray, A))
    assert all(np.all(x == 0) for x in leaves(g))
    # under jit the bool mask leaves become traced 0-d arrays: same value, frozen grad still 0
    f = jax.jit(jax.value_and_grad(lambda p, m: l2(p, m)))
    val, g = f(jax.tree_util.tree_map(jnp.asarray, P), MASK)
    np.testing.assert_allclose(val, 5.25)
    assert np.all(np.asarray(g["backbone"]["kernel"]) == 0.0)


def test_elementwise_mask():
    mask = {"backbone": {"kernel": np.array([[True, False], [False, True]]), "bias": False},
            "head": {"kernel": False}}
    np.testing.assert_allclose(l2(P, mask), 1.0 + 9.0)


@pytest.mark.parametrize("fn, match", [
    (lambda: l2(P, {"backbone": {"kernel": True}, "head": {"kernel": True}}), "mask structure"),
    (lambda: l1(P, {"backbone": True, "head": True}), "mask structure"),
    (lambda: l2_sp(P, {"backbone": A["backbone"]}), "anchor structure"),
    (lambda: l2_sp(P, {**A, "head": {"kernel": np.zeros(2)}}), "anchor leaf 'head/kernel'"),
    (lambda: l2(P, {**MASK, "head": {"kernel": np.array([True])}}), "mask leaf 'head/kernel'"),
])
def test_bad_args(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()
