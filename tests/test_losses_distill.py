"""distillation_loss vs NumPy; KD vanishes for identical logits; no teacher gradient; T² scaling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import distillation_loss

S = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], np.float32)
T_ = np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 1.0]], np.float32)
Y = np.array([0, 1])


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_distill(s, t, y, alpha, temp):
    s, t = s.astype(np.float64), t.astype(np.float64)
    ce = -np.log(np_softmax(s)[np.arange(len(y)), y]) if y is not None else np.zeros(len(s))
    p, q = np_softmax(t / temp), np_softmax(s / temp)
    kd = temp ** 2 * np.sum(p * np.log(p / q), axis=-1)
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize("alpha, temp", [(0.0, 1.0), (0.3, 2.0), (1.0, 4.0), (0.5, 0.5)])
def test_matches_numpy(alpha, temp):
    loss, terms = distillation_loss(jnp.asarray(S), jnp.asarray(T_), jnp.asarray(Y), alpha=alpha, temperature=temp)
    want, ce, kd = np_distill(S, T_, Y, alpha, temp)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], kd, rtol=1e-5, atol=1e-6)


def test_zero_kd_when_student_equals_teacher():
    loss, terms = distillation_loss(jnp.asarray(S), jnp.asarray(S), None, alpha=0.0, temperature=3.0)
    np.testing.assert_allclose(terms["kd"], 0.0, atol=1e-6)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    g = jax.grad(lambda s: distillation_loss(s, jnp.asarray(S), None, alpha=0.0, temperature=3.0)[0].sum())(
        jnp.asarray(S))
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_no_gradient_to_teacher():
    def f(s, t):
        return distillation_loss(s, t, jnp.asarray(Y), alpha=0.2, temperature=2.0)[0].sum()

    gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(S), jnp.asarray(T_))
    assert np.all(np.asarray(gt) == 0.0) and np.any(np.asarray(gs) != 0.0)


def test_t_squared_scaling():
    # kd term = T² · KL: dividing by T² recovers the KL at that temperature
    for temp in (1.0, 2.0, 5.0):
        _, terms = distillation_loss(jnp.asarray(S), jnp.asarray(T_), None, alpha=0.0, temperature=temp)
        p, q = np_softmax(T_.astype(np.float64) / temp), np_softmax(S.astype(np.float64) / temp)
        np.testing.assert_allclose(terms["kd"] / temp ** 2, np.sum(p * np.log(p / q), -1), rtol=1e-4, atol=1e-7)
    # soft-target gradient: d(T²·KL)/ds = T·(q − p), magnitude kept O(1) for large T (≈ (s − t)/C)
    temp = 20.0
    g = jax.grad(lambda s: distillation_loss(s, jnp.asarray(T_), None, alpha=0.0, temperature=temp)[0].sum())(
        jnp.asarray(S))
    p, q = np_softmax(T_.astype(np.float64) / temp), np_softmax(S.astype(np.float64) / temp)
    np.testing.assert_allclose(g, temp * (q - p), rtol=1e-4, atol=1e-6)
    zs, zt = S - S.mean(-1, keepdims=True), T_ - T_.mean(-1, keepdims=True)
    np.testing.assert_allclose(g, (zs - zt) / 3, atol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=None, alpha=0.5, temperature=1.0), "alpha"),
    (dict(labels=Y, alpha=1.5, temperature=1.0), "alpha"),
    (dict(labels=Y, alpha=0.5, temperature=0.0), "temperature"),
    (dict(labels=Y, alpha=0.5, temperature=float("nan")), "temperature"),
    (dict(teacher_logits=T_[:1], labels=Y, alpha=0.5, temperature=1.0), "teacher_logits"),
])
def test_bad_args(kwargs, match):
    args = dict(student_logits=S, teacher_logits=T_) | kwargs
    with pytest.raises(ValueError, match=match):
        distillation_loss(**args)
