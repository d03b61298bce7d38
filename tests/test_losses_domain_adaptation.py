"""GRL, DANN schedule/loss, CORAL and MMD vs NumPy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.losses import coral_loss, dann_lambda, domain_adversarial_loss, gradient_reversal, mmd_loss

FS = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [1.0, 3.0]], np.float32)
FT = np.array([[1.0, 1.0], [3.0, -1.0], [0.0, 0.5]], np.float32)


def test_gradient_reversal_flips_and_scales():
    x = jnp.array([1.0, -2.0, 3.0])
    c = jnp.array([0.5, 1.0, -2.0])
    np.testing.assert_array_equal(gradient_reversal(x, 0.7), x)
    gx, glam = jax.grad(lambda x, lam: jnp.sum(gradient_reversal(x, lam) * c), argnums=(0, 1))(x, 0.7)
    np.testing.assert_allclose(gx, -0.7 * np.asarray(c), rtol=1e-6)
    assert float(glam) == 0.0
    g = jax.jit(jax.grad(lambda x, lam: jnp.sum(gradient_reversal(x, lam) * c)))(x, jnp.float32(2.0))
    np.testing.assert_allclose(g, -2.0 * np.asarray(c))


def test_dann_lambda():
    assert float(dann_lambda(0.0)) == 0.0
    np.testing.assert_allclose(dann_lambda(1.0), 2 / (1 + np.exp(-10)) - 1, rtol=1e-6)
    assert float(dann_lambda(1.0)) > 0.9999
    np.testing.assert_allclose(dann_lambda(0.3, gamma=5.0), 2 / (1 + np.exp(-1.5)) - 1, rtol=1e-6)
    np.testing.assert_allclose(dann_lambda(2.0), dann_lambda(1.0))       # clipped
    with pytest.raises(ValueError, match="gamma"):
        dann_lambda(0.5, gamma=-1.0)


def test_domain_adversarial_loss_matches_numpy():
    zs, zt = np.array([2.0, -1.0, 0.0], np.float32), np.array([[0.5], [-3.0]], np.float32)
    sig = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))
    want = 0.5 * (np.mean(-np.log(sig(zs))) + np.mean(-np.log(1 - sig(zt[:, 0]))))
    np.testing.assert_allclose(domain_adversarial_loss(zs, zt), want, rtol=1e-6)
    np.testing.assert_allclose(domain_adversarial_loss(jnp.zeros(2), jnp.zeros(5)), np.log(2.0), rtol=1e-6)
    assert np.isfinite(float(domain_adversarial_loss(jnp.array([-1e4]), jnp.array([1e4]))))
    with pytest.raises(ValueError, match="domain_logits_target"):
        domain_adversarial_loss(zs, np.zeros((2, 2)))


def np_coral(fs, ft):
    fs, ft = fs.astype(np.float64), ft.astype(np.float64)
    cs, ct = np.cov(fs, rowvar=False), np.cov(ft, rowvar=False)     # unbiased (n − 1)
    return np.sum((cs - ct) ** 2) / (4 * fs.shape[1] ** 2)


def test_coral_matches_numpy():
    np.testing.assert_allclose(coral_loss(FS, FT), np_coral(FS, FT), rtol=1e-5)
    # hand value: fs = [[0],[2]] has var 2, ft = [[0],[1]] var 0.5 -> (1.5)² / 4
    np.testing.assert_allclose(coral_loss(np.array([[0.0], [2.0]]), np.array([[0.0], [1.0]])), 2.25 / 4)
    np.testing.assert_allclose(coral_loss(FS, FS + 5.0), 0.0, atol=1e-6)     # shift-invariant
    with pytest.raises(ValueError, match="ft"):
        coral_loss(FS, FT[:, :1])
    with pytest.raises(ValueError, match="fs"):
        coral_loss(FS[:1], FT)


def np_mmd(fs, ft, betas=None, mul=2.0, k=5):
    z = np.concatenate([fs, ft]).astype(np.float64)
    n, ns = len(z), len(fs)
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    if betas is None:
        base = d.sum() / (n * n - n)
        betas = [base * mul ** (i - k // 2) for i in range(k)]
    kern = sum(np.exp(-d / b) for b in betas)
    return kern[:ns, :ns].mean() + kern[ns:, ns:].mean() - 2 * kern[:ns, ns:].mean()


def test_mmd_matches_numpy():
    np.testing.assert_allclose(mmd_loss(FS, FT), np_mmd(FS, FT), rtol=1e-5)
    np.testing.assert_allclose(mmd_loss(FS, FT, kernel_mul=3.0, num_kernels=2), np_mmd(FS, FT, mul=3.0, k=2),
                               rtol=1e-5)
    np.testing.assert_allclose(mmd_loss(FS, FT, bandwidths=[1.0, 4.0]), np_mmd(FS, FT, betas=[1.0, 4.0]), rtol=1e-5)
    # hand value: one point each, distance² 4, β = 4: k_ss = k_tt = 1, k_st = e^{-1}
    np.testing.assert_allclose(mmd_loss(np.zeros((1, 1)), np.full((1, 1), 2.0), bandwidths=[4.0]),
                               2 - 2 * np.exp(-1.0), rtol=1e-6)


def test_mmd_identical_vs_shifted():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 3)))
    assert abs(float(mmd_loss(x, x))) < 1e-5
    assert float(mmd_loss(x, x + 2.0)) > 0.1
    assert abs(float(mmd_loss(np.ones((3, 2)), np.ones((2, 2))))) < 1e-6      # zero spread: no NaN
    g = jax.grad(lambda a: mmd_loss(a, x + 2.0))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bandwidths=[1.0, -1.0]), "bandwidths"),
    (dict(bandwidths=[]), "bandwidths"),
    (dict(kernel_mul=0.0), "kernel_mul"),
    (dict(num_kernels=0), "num_kernels"),
])
def test_mmd_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mmd_loss(FS, FT, **kwargs)
