"""DELTA: feature-map distance, channel loss increase and attention vs NumPy; attention from the training set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.delta import channel_loss_increase, delta_attention, delta_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


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


R = np.random.default_rng(0)
BATCH = {"image": jnp.asarray(R.normal(size=(8, 8, 8, 1)), jnp.float32),
         "label": jnp.arange(8, dtype=jnp.int32) % 10,
         "target_image": jnp.asarray(R.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32),
         "target_strong_image": jnp.asarray(R.normal(0.5, 2.0, size=(6, 8, 8, 1)), jnp.float32)}


def outputs(obj, params, images):
    return obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, images, return_features=True)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_delta_channel_attention_from_the_training_examples(tfds_data_dir):
    from tl_jax.objectives.delta import fit_probe
    from tl_jax.transferability.extract import target_arrays

    config = config_lib.base_config()
    config.objective.name = "delta"
    config.objective.delta.update(weight=0.3, temperature=2.0)
    config.data.update(name="optdigits", data_dir=tfds_data_dir, shots=4, shots_seed=1, val_fraction=0.2,
                       eval_pp=[{"op": "rescale", "in_max": 16.0}])
    model = get_model("cnn", 10)
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), BATCH["image"])["params"]
    _, aux = obj.init_extra(jax.random.PRNGKey(1), params, {})
    # the run's training examples: 4 per class, drawn after the validation carve-out
    examples = target_arrays(config)
    y = examples["label"]
    assert sorted(np.bincount(y, minlength=10)) == [4] * 10
    _, f = model.apply({"params": params}, examples["image"], return_features=True)
    f = np.asarray(f, np.float64)
    w, b = (np.asarray(a, np.float64) for a in fit_probe(f, y, 10))
    p, onehot = np_softmax(f @ w + b), np.eye(10)[y]
    assert np.abs(f.T @ (p - onehot) / len(y) + 1e-3 * w).max() < 1e-4   # the L2 logistic probe's optimum
    assert np.abs((p - onehot).mean(0)).max() < 1e-4
    increase = np.empty(f.shape[1])
    for c in range(f.shape[1]):   # DELTA's definition, one channel at a time (float64)
        g = f.copy()
        g[:, c] = 0.0
        increase[c] = np_mean_ce(g @ w + b, y) - np_mean_ce(f @ w + b, y)
    z = (increase - increase.mean()) / increase.std()
    want = f.shape[1] * np_softmax(z / 2.0)
    got = np.asarray(aux["delta_attention"])
    assert got.shape == (512,) and abs(got.sum() - 512) < 1e-2 and got.max() > 2.0   # far from uniform
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    # the loss: CE + w·(1/B) Σ_b Σ_c a_c (f_bc − f*_bc)²
    moved = jax.tree.map(lambda x: x * 1.1, params)
    loss, (_, m) = obj.loss(moved, {}, aux, BATCH, None, 0)
    zm, fm = outputs(obj, moved, BATCH["image"])
    _, f0 = outputs(obj, params, BATCH["image"])
    term = np.sum(got * (np.asarray(fm, np.float64) - np.asarray(f0, np.float64)) ** 2) / 8
    np.testing.assert_allclose(float(m["train/delta"]), term, rtol=1e-4)
    np.testing.assert_allclose(float(loss), np_mean_ce(np.asarray(zm, np.float64), np.asarray(BATCH["label"]))
                               + 0.3 * term, rtol=1e-4)


def test_delta_attention_flag_must_be_a_bool():
    config = config_lib.base_config()
    config.objective.name = "delta"
    with config.objective.delta.ignore_type():
        config.objective.delta.attention = "yes"
    with pytest.raises(ValueError, match=r"^config.objective.delta.attention must be true or false, got 'yes'$"):
        build_objective(config, get_model("cnn", 10))
