"""cross_entropy / accuracy / masked_mean / entropy vs NumPy float64 formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.objectives.classification import accuracy, cross_entropy, entropy, masked_mean


LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.5]], np.float32)
LABELS = np.array([0, 1, 2])


def np_cross_entropy(z, y, eps=0.0):
    z = z.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    c = z.shape[1]
    q = (1 - eps) * np.eye(c)[y] + eps / c
    return -(q * logp).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_numpy(eps):
    got = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), label_smoothing=eps)
    np.testing.assert_allclose(got, np_cross_entropy(LOGITS, LABELS, eps), rtol=1e-6, atol=1e-6)


def test_cross_entropy_hand_value():
    # uniform logits over 4 classes: CE = log 4 for any label and smoothing
    got = cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]), label_smoothing=0.2)
    np.testing.assert_allclose(got, [np.log(4.0)] * 2, rtol=1e-6)


def test_cross_entropy_grad_is_softmax_minus_target():
    eps = 0.1
    g = jax.grad(lambda z: cross_entropy(z, jnp.asarray(LABELS), label_smoothing=eps).sum())(jnp.asarray(LOGITS))
    z = LOGITS.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    q = (1 - eps) * np.eye(3)[LABELS] + eps / 3
    np.testing.assert_allclose(g, p - q, atol=1e-6)


def test_cross_entropy_under_jit_with_traced_smoothing():
    f = jax.jit(lambda z, y, e: cross_entropy(z, y, label_smoothing=e))
    np.testing.assert_allclose(f(LOGITS, LABELS, 0.3), np_cross_entropy(LOGITS, LABELS, 0.3), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=np.zeros((3,)), labels=np.zeros(3, int)), "logits"),
    (dict(logits=np.zeros((3, 2)), labels=np.zeros(4, int)), "labels"),
    (dict(logits=np.zeros((3, 2)), labels=np.zeros(3, int), label_smoothing=-0.1), "label_smoothing"),
    (dict(logits=np.zeros((3, 2)), labels=np.zeros(3, int), label_smoothing=float("nan")), "label_smoothing"),
])
def test_cross_entropy_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(**kwargs)


def test_accuracy():
    got = accuracy(jnp.asarray(LOGITS), jnp.array([0, 2, 1]))
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0])
    assert got.dtype == jnp.float32


def test_masked_mean():
    v = jnp.array([1.0, 2.0, 3.0, jnp.nan])
    m = jnp.array([1, 1, 0, 0])
    np.testing.assert_allclose(masked_mean(v, m), 1.5)
    np.testing.assert_allclose(masked_mean(v[:3]), 2.0)
    assert float(masked_mean(v, jnp.zeros(4))) == 0.0      # all padding: 0, not NaN
    g = jax.grad(lambda x: masked_mean(x, m))(v)
    np.testing.assert_allclose(g, [0.5, 0.5, 0.0, 0.0])    # no NaN from the padded entry
    with pytest.raises(ValueError, match="mask"):
        masked_mean(v, jnp.ones(3))


def test_entropy_handles_zero_probabilities():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(entropy(jnp.asarray(p)), [0.0, np.log(2)], rtol=1e-6)
