"""Multitask: weighted sum and uncertainty weighting vs NumPy; heads, weightings, config errors, end to end."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import optax
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.pcgrad import pcgrad, per_task_grads
from tl_jax.objectives.multitask import uncertainty_weighted, weighted_sum
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params.param_rules import flatten_paths
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_train_step
from conftest import RUN_FILES, workdir_files


LOSSES = {"cls": 1.5, "seg": 0.25, "depth": 4.0}


def test_weighted_sum_matches_numpy():
    weights = {"cls": 1.0, "seg": 2.0, "depth": 0.5}
    total, terms = weighted_sum({k: jnp.float32(v) for k, v in LOSSES.items()}, weights)
    np.testing.assert_allclose(total, 1.5 + 0.5 + 2.0, rtol=1e-6)
    np.testing.assert_allclose(terms["weighted/seg"], 0.5)
    np.testing.assert_allclose(terms["weight/depth"], 0.5)
    np.testing.assert_allclose(terms["loss/cls"], 1.5)


@pytest.mark.parametrize("weights, match", [
    ({"cls": 1.0, "seg": 1.0}, "missing \\['depth'\\]"),
    ({"cls": 1.0, "seg": 1.0, "depth": 1.0, "aux": 1.0}, "extra \\['aux'\\]"),
    ({"cls": -1.0, "seg": 1.0, "depth": 1.0}, "weights\\['cls'\\]"),
    ({"cls": float("inf"), "seg": 1.0, "depth": 1.0}, "weights\\['cls'\\]"),
])
def test_weighted_sum_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_sum(LOSSES, weights)


def test_zero_weight_removes_task_gradient():
    def total(theta, lam_b):
        losses = {"a": jnp.sum(theta ** 2), "b": jnp.sum(3.0 * theta)}
        return weighted_sum(losses, {"a": 1.0, "b": lam_b})[0]

    theta = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(jax.grad(total)(theta, 0.0), 2 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(jax.grad(total)(theta, 1.0), 2 * np.array([1.0, -2.0]) + 3.0)
    # even an inf loss with weight 0 contributes nothing
    tot, _ = weighted_sum({"a": jnp.float32(2.0), "b": jnp.float32(np.inf)}, {"a": 1.0, "b": 0.0})
    assert float(tot) == 2.0


def test_uncertainty_weighted_formula_and_grad():
    s = {"cls": 0.0, "seg": 1.0, "depth": -0.5}
    losses = {k: jnp.float32(v) for k, v in LOSSES.items()}
    log_vars = {k: jnp.float32(v) for k, v in s.items()}
    total, terms = uncertainty_weighted(losses, log_vars)
    want = sum(np.exp(-s[k]) * LOSSES[k] + s[k] for k in LOSSES)
    np.testing.assert_allclose(total, want, rtol=1e-6)
    for k in LOSSES:
        np.testing.assert_allclose(terms[f"weight/{k}"], np.exp(-s[k]), rtol=1e-6)
    g = jax.grad(lambda lv: uncertainty_weighted(losses, lv)[0])(log_vars)
    for k in LOSSES:
        np.testing.assert_allclose(g[k], -np.exp(-s[k]) * LOSSES[k] + 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="log_vars keys"):
        uncertainty_weighted(losses, {"cls": 0.0})


RNG = jax.random.PRNGKey(3)


def make(weighting="fixed", tasks=("digit", "parity", "ge5"), weights=(), **extra):
    c = config_lib.base_config()
    c.objective.name = "multitask"
    mt = c.objective.multitask
    mt.weighting, mt.tasks, mt.weights = weighting, list(tasks), list(weights)
    for k, v in extra.items():
        mt[k] = v
    return build_objective(c, get_model("cnn", 10))


def batch(n=12, hw=8, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, hw, hw, 1)).astype(np.float32),
            "label": r.integers(0, 10, size=n).astype(np.int32)}


def init(obj, b, seed=0):
    params = obj.model.init(jax.random.PRNGKey(seed), b["image"])["params"]
    extra, aux = obj.init_extra(RNG, params, {})
    return {**params, **extra}, aux


def np_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def np_task_losses(obj, params, b):
    out = obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, b["image"])
    y = b["label"]
    labels = {"digit": y, "parity": y % 2, "ge5": (y >= 5).astype(int)}
    return {t: np_ce(out[t], labels[t]) for t in obj.tasks}


def test_param_paths_and_heads():
    obj = make()
    params, _ = init(obj, batch())
    paths = sorted(flatten_paths(params))
    assert "backbone/conv1/kernel" in paths and "head/digit/kernel" in paths
    assert params["head"]["digit"]["kernel"].shape[-1] == 10
    assert params["head"]["parity"]["kernel"].shape[-1] == 2 and params["head"]["ge5"]["bias"].shape == (2,)


def test_fixed_total_is_weighted_sum_of_task_ces():
    obj = make(weights=(1.0, 0.5, 2.0))
    b = batch()
    params, aux = init(obj, b)
    loss, (_, m) = obj.loss(params, {}, aux, b, RNG, jnp.int32(0))
    want = np_task_losses(obj, params, b)
    np.testing.assert_allclose(loss, want["digit"] + 0.5 * want["parity"] + 2.0 * want["ge5"], rtol=1e-5)
    for t, lam in zip(obj.tasks, (1.0, 0.5, 2.0)):
        np.testing.assert_allclose(m[f"train/loss/{t}"], want[t], rtol=1e-5)
        assert float(m[f"train/weight/{t}"]) == lam
    assert float(m["train/accuracy"]) == float(m["train/accuracy/digit"])


@pytest.mark.parametrize("weighting", ["fixed", "pcgrad"])
def test_zero_weight_removes_the_task_gradient(weighting):
    b = batch()
    obj = make(weighting, weights=(1.0, 0.0, 1.0), pcgrad_random_order=False)
    params, aux = init(obj, b)
    vg = getattr(obj, "value_and_grad", None) or jax.value_and_grad(obj.loss, has_aux=True)
    _, grads = vg(params, {}, aux, b, RNG, jnp.int32(0))
    assert not np.any(grads["head"]["parity"]["kernel"])
    # the same as a model that never had the task
    obj2 = make(weighting, tasks=("digit", "ge5"), pcgrad_random_order=False)
    sub = {"backbone": params["backbone"], "head": {t: params["head"][t] for t in ("digit", "ge5")}}
    vg2 = getattr(obj2, "value_and_grad", None) or jax.value_and_grad(obj2.loss, has_aux=True)
    _, grads2 = vg2(sub, {}, {}, b, RNG, jnp.int32(0))
    for path, g in flatten_paths(grads2).items():
        np.testing.assert_allclose(flatten_paths(grads)[path], g, rtol=1e-5, atol=1e-7, err_msg=path)


def test_pcgrad_equals_pcgrad_of_independent_per_task_grads():
    b = batch(seed=2)  # a batch/init whose digit and parity gradients conflict (checked below)
    obj = make("pcgrad", weights=(1.0, 0.5, 2.0), pcgrad_random_order=False)
    params, aux = init(obj, b, seed=2)
    (loss, (_, m)), grads = obj.value_and_grad(params, {}, aux, b, RNG, jnp.int32(0))
    y = b["label"]
    labels = [y, y % 2, (y >= 5).astype(np.int32)]

    def vec(p):  # written out independently: [λ_i · mean CE_i]
        out = obj.model.apply({"params": p}, b["image"])
        ces = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out[t]), lab[:, None], -1)) for t, lab in
               zip(("digit", "parity", "ge5"), labels)]
        return jnp.stack([1.0 * ces[0], 0.5 * ces[1], 2.0 * ces[2]])

    want = pcgrad(per_task_grads(vec, params))
    for path, g in flatten_paths(want).items():
        np.testing.assert_allclose(flatten_paths(grads)[path], g, rtol=1e-4, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(loss, float(np.sum(vec(params))), rtol=1e-5)
    # the tasks conflict here, so the projection changes the update: not the plain sum Σ_i g_i
    jac = per_task_grads(vec, params)
    flat = np.concatenate([np.asarray(x).reshape(3, -1) for x in jax.tree.leaves(jac)], axis=1)
    assert (flat @ flat.T).min() < 0
    raw = jax.tree.map(lambda x: x.sum(0), jac)
    assert not np.allclose(raw["backbone"]["fc"]["kernel"], grads["backbone"]["fc"]["kernel"])


def test_uncertainty_log_vars_are_params_and_follow_kendall():
    b = batch()
    obj = make("uncertainty")
    params, aux = init(obj, b)
    assert sorted(params["task_log_vars"]) == ["digit", "ge5", "parity"]
    s = {"digit": 0.3, "parity": -0.7, "ge5": 1.1}
    params["task_log_vars"] = {k: jnp.float32(v) for k, v in s.items()}
    loss, (_, m) = obj.loss(params, {}, aux, b, RNG, jnp.int32(0))
    L = np_task_losses(obj, params, b)
    np.testing.assert_allclose(loss, sum(np.exp(-s[t]) * L[t] + s[t] for t in s), rtol=1e-5)
    np.testing.assert_allclose(m["train/weight/parity"], np.exp(0.7), rtol=1e-6)
    grads = jax.grad(lambda p: obj.loss(p, {}, aux, b, RNG, jnp.int32(0))[0])(params)
    for t in s:
        np.testing.assert_allclose(grads["task_log_vars"][t], 1.0 - np.exp(-s[t]) * L[t], rtol=1e-4)
    # and they are trained by the standard step
    tx = optax.sgd(0.1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=RNG, skipped=jnp.zeros((), jnp.int32))
    new, _ = jax.jit(make_train_step(obj.loss, tx))(state, b)
    assert float(new.params["task_log_vars"]["ge5"]) != 1.1


@pytest.mark.parametrize("field, value, match", [
    ("tasks", ["digit", "colour"], r"multitask\.tasks: unknown task 'colour'"),
    ("tasks", [], r"multitask\.tasks is empty"),
    ("weights", [1.0, -1.0, 1.0], r"multitask\.weights\[1\] must be a finite number >= 0"),
    ("weights", [1.0, float("nan"), 1.0], r"multitask\.weights\[1\]"),
    ("weights", [1.0, 1.0], r"multitask\.weights has 2 values for 3 tasks"),
    ("weights", [0.0, 0.0, 0.0], r"multitask\.weights are all 0"),
    ("weighting", "gradnorm", r"multitask\.weighting must be one of"),
])
def test_bad_config_is_one_clear_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{field: value}) if field != "weighting" else make(value)


def test_uncertainty_refuses_fixed_weights():
    with pytest.raises(ValueError, match=r"multitask\.weights is not used by weighting='uncertainty'"):
        make("uncertainty", weights=(1.0, 1.0, 1.0))


@pytest.mark.slow
def test_train_pcgrad_end_to_end_writes_contract(tmp_path, tfds_data_dir):
    from tl_jax.train.loop import train

    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = tfds_data_dir
    c.objective.name = "multitask"
    c.objective.multitask.weighting = "pcgrad"
    wd = str(tmp_path / "mt")
    summary = train(c, wd)
    assert workdir_files(wd) == RUN_FILES
    for t in ("digit", "parity", "ge5"):
        assert 0.0 <= summary[f"test/accuracy/{t}"] <= 1.0
        assert f"train/loss/{t}" in summary and summary[f"train/weight/{t}"] == 1.0
    assert summary["test/accuracy"] == summary["test/accuracy/digit"] and summary["steps"] == 4
    logged = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [m["step"] for m in logged if "train/loss/parity" in m] == [2, 4]
