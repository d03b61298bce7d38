"""config.loss regularisers: L1/L2/L2-SP vs NumPy (masks, anchor); on any objective's loss; head dropout."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import optax
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.regularizers import ANCHOR_KEY, Penalties, l1, l2, l2_sp, penalties
from tl_jax.params.param_rules import ParamGroups
from tl_jax.models import get_model
from tl_jax.objectives import Objective, apply_model
from tl_jax.params.param_rules import flatten_paths
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_train_step
from conftest import RUN_FILES, workdir_files


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


RULES = [["backbone/conv.*", None], [".*", 1.0]]  # conv layers frozen, fc + head trainable


def setup(seed=0, dropout=0.0, **loss):
    config = config_lib.base_config()
    for k, v in loss.items():
        config.loss[k] = v
    model = get_model("cnn", 4, dropout_rate=dropout)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(6, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.PRNGKey(seed), x)["params"]
    batch = {"image": x, "label": jnp.arange(6, dtype=jnp.int32) % 4}
    return config, model, params, batch


def regularized(config, model, params, rules, aux, cls=Objective):
    """``cls`` built as the train setup builds it: the config.loss penalty terms and the resolved groups."""
    groups = ParamGroups.resolve(params, rules)
    terms, aux = penalties(config, params, groups, aux, cls.name)
    return cls(config, model, param_groups=groups, penalties=terms), aux


def perturb(params, scale=0.1, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_l2_sp_gradient_pulls_toward_anchor_on_trainable_only():
    lam = 0.3
    config, model, theta0, batch = setup(l2_sp=lam)
    obj, aux = regularized(config, model, theta0, RULES, {})
    assert isinstance(obj.penalties, Penalties) and set(aux) == {ANCHOR_KEY}
    assert sorted(flatten_paths(aux[ANCHOR_KEY])) == ["backbone/fc/bias", "backbone/fc/kernel", "head/bias",
                                                      "head/kernel"]
    theta = perturb(theta0)
    value, grads = jax.value_and_grad(lambda p: obj.penalties(p, aux)[0])(theta)
    t, t0, g = flatten_paths(theta), flatten_paths(theta0), flatten_paths(grads)
    trainable = [p for p in t if not p.startswith("backbone/conv")]
    want = sum(lam * np.sum((np.asarray(t[p], np.float64) - np.asarray(t0[p])) ** 2) for p in trainable)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    for path in t:
        expected = 2 * lam * (np.asarray(t[path]) - np.asarray(t0[path])) if path in trainable else 0.0
        np.testing.assert_allclose(np.asarray(g[path]), np.broadcast_to(expected, t[path].shape), rtol=1e-5,
                                   atol=1e-7, err_msg=path)
    # At the anchor the L2-SP term and its gradient vanish.
    assert float(obj.penalties(theta0, aux)[0]) == 0.0


def test_l1_l2_gradients_and_logged_terms():
    config, model, params, batch = setup(l1=0.01, l2=0.02)
    obj, aux = regularized(config, model, params, RULES, {})
    assert aux == {}  # no anchor without L2-SP
    params = perturb(params)  # no exact zeros (|x| has no derivative there)
    grads = jax.grad(lambda p: obj.penalties(p, aux)[0])(params)
    for path, g in flatten_paths(grads).items():
        p = np.asarray(flatten_paths(params)[path])
        expected = 0.01 * np.sign(p) + 2 * 0.02 * p if not path.startswith("backbone/conv") else 0 * p
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-7, err_msg=path)
    loss, (_, metrics) = obj.loss(params, {}, aux, batch, jax.random.PRNGKey(0), jnp.int32(0))
    base, _ = Objective(config, model).loss(params, {}, {}, batch, jax.random.PRNGKey(0), jnp.int32(0))
    np.testing.assert_allclose(float(metrics["train/objective_loss"]), float(base), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(base + metrics["train/reg/l1"] + metrics["train/reg/l2"]),
                               rtol=1e-6)
    assert float(metrics["train/loss"]) == float(loss)


def test_zero_weights_leave_objective_unchanged_and_bad_weights_are_named():
    config, model, params, _ = setup()
    assert penalties(config, params, ParamGroups.resolve(params, RULES), {"x": 1}, "classification") == (None, {"x": 1})
    assert regularized(config, model, params, RULES, {})[0].penalties is None
    config, model, params, _ = setup(l2=-1.0)
    with pytest.raises(ValueError, match=r"config.loss.l2 must be a finite number >= 0"):
        regularized(config, model, params, RULES, {})
    config, model, params, _ = setup(l2_sp=0.1)
    with pytest.raises(ValueError, match="freezes every param"):
        regularized(config, model, params, [[".*", None]], {})


def test_objective_is_immutable_and_replace_returns_a_copy():
    config, model, params, _ = setup(l2=0.1)
    obj, _ = regularized(config, model, params, RULES, {})
    assert obj.name == "classification" and obj.model is model
    with pytest.raises(AttributeError, match="immutable once built"):
        obj.model = model.clone(dropout_rate=0.5)
    new = obj.replace(model=model.clone(dropout_rate=0.5))  # the train setup finishes the model this way
    assert new.model.dropout_rate == 0.5 and obj.model is model and new.penalties is obj.penalties
    with pytest.raises(ValueError, match="cannot be replaced"):
        obj.replace(label_smoothing=0.1)


def test_dropout_is_active_in_training_and_uses_its_own_rng_stream():
    config, model, params, batch = setup(dropout=0.5)
    obj = Objective(config, model)
    r1, r2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    z1, _ = apply_model(model, params, {}, batch, train=True, rng=r1)
    z2, _ = apply_model(model, params, {}, batch, train=True, rng=r2)
    assert not np.allclose(z1, z2)  # active in training, drawn from the rng
    np.testing.assert_array_equal(z1, model.apply({"params": params}, batch["image"], train=True,
                                                  rngs={"dropout": r1}))  # the 'dropout' stream
    z_eval, _ = apply_model(model, params, {}, batch, train=False)
    np.testing.assert_array_equal(z_eval, model.apply({"params": params}, batch["image"]))  # off in eval
    # The train step draws a fresh dropout key per step: fold_in(state.rng, step).
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(obj.loss, tx))
    state = TrainState(step=jnp.int32(0), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
    s1, m1 = step(state, batch)
    _, m2 = step(s1, batch)  # same params (lr 0), next step -> other dropout mask
    assert float(m1["train/loss"]) != float(m2["train/loss"])
    _, m1_again = step(state, batch)
    assert float(m1["train/loss"]) == float(m1_again["train/loss"])
    no_drop = Objective(config, model.clone(dropout_rate=0.0))
    step0 = jax.jit(make_train_step(no_drop.loss, tx))
    s1, m1 = step0(state, batch)
    assert float(m1["train/loss"]) == float(step0(s1, batch)[1]["train/loss"])


@pytest.mark.slow
def test_train_with_l2_sp_writes_terms_and_contract(tmp_path, tfds_data_dir):
    from tl_jax.train.loop import train

    def tiny(**ov):
        c = config_lib.load_config("tests/configs/tiny.py:steps=4")
        c.data.data_dir = tfds_data_dir
        return config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in ov.items()])

    src = str(tmp_path / "src")
    train(tiny(), src)
    wd = str(tmp_path / "ft")
    summary = train(tiny(init_from=src, param_rules=RULES, **{"loss.l2_sp": 0.01, "loss.l2": 1e-4}), wd)
    assert workdir_files(wd) == RUN_FILES
    assert summary["steps"] == 4 and "test/accuracy" in summary
    logged = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_rows = [m for m in logged if "train/loss" in m]
    assert all({"train/reg/l2_sp", "train/reg/l2", "train/objective_loss"} <= set(m) for m in train_rows)
    assert train_rows[0]["train/reg/l2_sp"] >= 0.0


def test_custom_value_and_grad_objectives_get_the_penalty_gradient():
    config, model, params, batch = setup(l2=0.05)
    plain, _ = regularized(config, model, params, RULES, {})
    assert getattr(plain, "value_and_grad", None) is None  # plain objectives: the loop differentiates obj.loss

    class OwnUpdate(Objective):  # e.g. PCGrad's own update
        def __init__(self, config, model):
            super().__init__(config, model)
            self.objective_value_and_grad = jax.value_and_grad(self.objective_loss, has_aux=True)

    obj, aux = regularized(config, model, params, RULES, {}, cls=OwnUpdate)
    (loss, (_, metrics)), grads = obj.value_and_grad(params, {}, aux, batch, jax.random.PRNGKey(0), 0)
    (want_loss, _), want = jax.value_and_grad(obj.loss, has_aux=True)(params, {}, aux, batch,
                                                                      jax.random.PRNGKey(0), 0)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert "train/reg/l2" in metrics
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want)
