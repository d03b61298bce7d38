"""Closed-form few-shot ridge: the solution against numpy's lstsq, perfect accuracy on separable features,
shots larger than a class as a one-line error."""
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.evaluation.fewshot_ridge import fewshot_eval, ridge_fit, ridge_predict


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


def test_results_do_not_depend_on_the_features_scale_and_match_a_numpy_transcription():
    xtr, ytr = blobs(30, sep=1.0)
    xte, yte = blobs(20, sep=1.0, seed=1)
    base = fewshot_eval(xtr, ytr, xte, yte, shots=(5,), seeds=2)["shots"][5]
    for c in (1e-3, 1e3):  # one scalar scale: same L2 picks, same accuracies
        scaled = fewshot_eval(c * xtr, ytr, c * xte, yte, shots=(5,), seeds=2)["shots"][5]
        assert scaled["l2"] == base["l2"] and scaled["per_seed"] == base["per_seed"]
    # seed 0 written out: carve 20 % per class, draw 5 shots, centre + one RMS scalar, lstsq of the ridge system
    from tl_jax.data import sample_shots
    from tl_jax.data.validation import carve_validation
    rest, val = carve_validation(ytr, 0.2, 0)
    pick = rest[sample_shots(ytr[rest], 5, 0)]
    x, y = xtr[pick], ytr[pick]
    m = x.mean(0)
    s = np.sqrt(((x - m) ** 2).mean())
    t = 2.0 * np.eye(4)[y] - 1.0

    def acc(l2, xe, ye):
        a = np.hstack([(x - m) / s, np.ones((len(x), 1))])
        reg = np.sqrt(l2) * np.eye(a.shape[1])[:-1]  # the bias is not regularised
        sol = np.linalg.lstsq(np.vstack([a, reg]), np.vstack([t, np.zeros((len(reg), 4))]), rcond=None)[0]
        return np.mean(np.argmax(np.hstack([(xe - m) / s, np.ones((len(xe), 1))]) @ sol, -1) == ye)

    val_acc = [acc(2.0 ** e, xtr[val], ytr[val]) for e in range(-10, 11)]  # the default grid
    best = 2.0 ** (int(np.argmax(val_acc)) - 10)  # first (smallest) L2 among ties
    assert base["l2"][0] == best
    assert base["per_seed"][0] == pytest.approx(acc(best, xte, yte), abs=1e-12)


def test_a_unit_firing_on_one_shot_does_not_outweigh_the_informative_ones():
    """Per-dimension standardisation would blow a rarely-active unit up to unit variance; one RMS scalar keeps
    it as small as it is."""
    xtr, ytr = blobs(30, sep=1.5)
    xte, yte = blobs(30, sep=1.5, seed=1)
    rng = np.random.default_rng(5)
    # 200 small non-negative units, each active on ~1 of the 20 shots (per-dimension standardisation: 0.58)
    noise = lambda n: (rng.random((n, 200)) < 0.05) * np.abs(rng.normal(size=(n, 200))) * 1e-2  # noqa: E731
    clean = fewshot_eval(xtr, ytr, xte, yte, shots=(5,), seeds=3)["shots"][5]["accuracy"]
    noisy = fewshot_eval(np.hstack([xtr, noise(len(xtr))]), ytr, np.hstack([xte, noise(len(xte))]), yte,
                         shots=(5,), seeds=3)["shots"][5]["accuracy"]
    assert noisy >= clean - 0.02 and clean > 0.9


def test_fewshot_cli_errors_name_its_own_flag(tmp_path, tfds_data_dir, capsys):
    """`tl-jax fewshot` names its run by --workdir (it has no --candidates flag, unlike `tl-jax rank`)."""
    from tl_jax.cli import main

    run = tmp_path / "not_a_run"
    run.mkdir()
    assert main(["fewshot", "--workdir", str(run), "--target", "tests/configs/tiny.py",
                 f"--config.data.data_dir={tfds_data_dir}", "--shots", "1", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"tl-jax fewshot: error: --workdir {run}") and "--candidates" not in err, err
