"""Closed-form few-shot ridge: the solution against numpy's lstsq, perfect accuracy on separable features,
shots larger than a class as a one-line error."""
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.transferability.fewshot import fewshot_eval, ridge_fit, ridge_predict


@pytest.mark.parametrize("n,d", [(40, 6), (8, 20)])  # primal (N > D) and dual (N <= D)
def test_ridge_equals_lstsq_of_the_augmented_system(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) + 0.5
    t = rng.normal(size=(n, 3))
    l2s = np.array([0.01, 1.0, 30.0])
    w, b = ridge_fit(jnp.asarray(x), jnp.asarray(t), l2s)  # JAX arrays are accepted (x64 off: float32)
    w, b = ridge_fit(x, t, l2s)
    for i, lam in enumerate(l2s):
        # min ‖[x 1][W; b] − t‖² + λ‖W‖² (bias unregularised) as one least-squares problem
        a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
        rhs = np.vstack([t, np.zeros((d, 3))])
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        np.testing.assert_allclose(np.asarray(w[i]), sol[:d], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(b[i]), sol[d], rtol=1e-8, atol=1e-10)
        xe = rng.normal(size=(5, d))
        np.testing.assert_allclose(ridge_predict(x, t, [xe], l2s)[0][i], xe @ sol[:d] + sol[d], rtol=1e-8, atol=1e-10)


def blobs(n_per_class, k=4, d=16, sep=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), n_per_class)
    return centers[y] + rng.normal(size=(len(y), d)), y


def test_separable_features_give_accuracy_one_and_the_result_layout():
    xtr, ytr = blobs(40)
    xte, yte = blobs(10, seed=1)
    res = fewshot_eval(xtr, ytr, xte, yte, shots=(1, 5), seeds=2)
    assert set(res["shots"]) == {1, 5}
    for k in (1, 5):
        r = res["shots"][k]
        assert r["accuracy"] == 1.0 and len(r["per_seed"]) == 2 and len(r["l2"]) == 2
        assert all(v in res["l2s"] for v in r["l2"])


def test_random_labels_give_chance_accuracy():
    xtr, ytr = blobs(40, sep=0.0)
    xte, yte = blobs(50, sep=0.0, seed=1)
    acc = fewshot_eval(xtr, ytr, xte, yte, shots=(10,), seeds=3)["shots"][10]["accuracy"]
    assert acc < 0.45  # 4 classes: chance 0.25


def test_shots_larger_than_a_class_is_one_line():
    xtr, ytr = blobs(10)  # 10 per class, 2 held out -> 8 left
    with pytest.raises(ValueError, match="--shots 9 is more than class") as e:
        fewshot_eval(xtr, ytr, xtr, ytr, shots=(1, 9), seeds=1)
    assert "\n" not in str(e.value)
    assert fewshot_eval(xtr, ytr, xtr, ytr, shots=(8,), seeds=1)["shots"][8]["accuracy"] == 1.0
