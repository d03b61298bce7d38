"""BSS: the sum of the k smallest squared singular values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.objectives.bss import bss_loss


RNG = np.random.default_rng(0)


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
