"""Knowledge distillation: Hinton's loss vs NumPy; the objective with a frozen teacher, config errors, end to end."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import optax
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.distill import distillation_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params.param_rules import flatten_paths, path_str
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_train_step
from conftest import RUN_FILES, workdir_files


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


RNG = jax.random.PRNGKey(0)


def make(**group):
    c = config_lib.base_config()
    c.objective.name = "distill"
    c.objective.distill.teacher = "unused-in-unit-tests"
    c.objective.distill.teacher_model = "cnn"
    c.objective.distill.teacher_kwargs = {"width": 2}
    for k, v in group.items():
        c.objective.distill[k] = v
    return build_objective(c, get_model("cnn", 10))


def batch(n=8, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, 8, 8, 1)).astype(np.float32),
            "label": r.integers(0, 10, size=n).astype(np.int32)}


def setup(obj, b):
    params = obj.model.init(RNG, b["image"])["params"]
    teacher = obj.teacher_model.init(jax.random.PRNGKey(1), b["image"])
    return params, {"teacher": teacher}


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha, temp", [(0.5, 4.0), (0.0, 2.0), (1.0, 1.0)])
def test_loss_is_hinton_formula(alpha, temp):
    obj = make(alpha=alpha, temperature=temp)
    b = batch()
    params, aux = setup(obj, b)
    loss, (_, m) = obj.loss(params, {}, aux, b, RNG, jnp.int32(0))
    s = obj.model.apply({"params": params}, b["image"])
    t = obj.teacher_model.apply(aux["teacher"], b["image"])
    ce = -np_log_softmax(s)[np.arange(8), b["label"]]
    logp, logq = np_log_softmax(np.asarray(t) / temp), np_log_softmax(np.asarray(s) / temp)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    want = np.mean(alpha * ce + (1 - alpha) * temp ** 2 * kl)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["train/ce"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["train/kd"], temp ** 2 * kl.mean(), rtol=1e-4, atol=1e-7)


def test_teacher_frozen_bit_identical_and_without_optimizer_state():
    obj = make()
    b = batch()
    params, aux = setup(obj, b)
    aux = jax.device_get(aux)
    tx = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=RNG, skipped=jnp.zeros((), jnp.int32), aux=aux)
    step = jax.jit(make_train_step(obj.loss, tx))
    for _ in range(3):
        state, _ = step(state, b)
    end = jax.device_get(state)
    for path, leaf in flatten_paths(aux["teacher"]["params"]).items():
        np.testing.assert_array_equal(flatten_paths(end.aux["teacher"]["params"])[path], leaf, err_msg=path)
    assert not np.array_equal(end.params["head"]["kernel"], params["head"]["kernel"])
    opt_leaves = jax.tree.leaves(end.opt_state)
    n_student = len(jax.tree.leaves(params))
    assert sum(x.size for x in opt_leaves if np.ndim(x)) == 2 * sum(x.size for x in jax.tree.leaves(params))
    assert len([x for x in opt_leaves if np.ndim(x)]) == 2 * n_student  # adam mu, nu: student params only


@pytest.mark.parametrize("group, match", [
    ({"alpha": 1.5}, r"distill\.alpha must be a number in \[0, 1\]"),
    ({"temperature": 0.0}, r"distill\.temperature must be a finite number > 0"),
    ({"teacher": ""}, r"distill\.teacher is empty"),
    ({"teacher_model": "vgg"}, r"distill\.teacher_model/teacher_kwargs: unknown model 'vgg'"),
    ({"teacher_kwargs": {"depth": 3}}, r"distill\.teacher_model/teacher_kwargs: model 'cnn' got unknown"),
])
def test_bad_config_is_one_clear_error(group, match):
    with pytest.raises(ValueError, match=match):
        make(**group)


def test_label_smoothing_and_missing_teacher_config_are_refused(tmp_path):
    c = config_lib.base_config()
    c.objective.name = "distill"
    c.objective.distill.teacher = str(tmp_path)
    with pytest.raises(ValueError, match=r"distill\.teacher=.*no config\.json found"):
        build_objective(c, get_model("cnn", 10))
    c.objective.distill.teacher_model = "cnn"
    c.loss.label_smoothing = 0.1
    with pytest.raises(ValueError, match=r"config\.loss\.label_smoothing=0\.1 is not used by objective 'distill'"):
        build_objective(c, get_model("cnn", 10))


@pytest.mark.slow
def test_train_end_to_end_with_teacher_from_workdir(tmp_path, tfds_data_dir):
    from orbax import checkpoint as ocp

    from tl_jax.train.checkpoint import load_variables, resolve_init_dir
    from tl_jax.train.loop import train

    def tiny():
        c = config_lib.load_config("tests/configs/tiny.py:steps=4")
        c.data.data_dir = tfds_data_dir
        return c

    teacher_cfg = tiny()
    teacher_cfg.model.kwargs = {"width": 2}
    t_sum = train(teacher_cfg, str(tmp_path / "teacher"))
    c = tiny()
    c.objective.name = "distill"
    c.objective.distill.teacher = str(tmp_path / "teacher")  # architecture read from its config.json
    wd = str(tmp_path / "student")
    s = train(c, wd)
    assert workdir_files(wd) == RUN_FILES
    assert s["test/teacher_accuracy"] == pytest.approx(t_sum["test/accuracy"], abs=1e-6)
    assert {"train/ce", "train/kd", "train/teacher_accuracy", "test/accuracy"} <= set(s)
    assert [json.loads(line)["step"] for line in open(os.path.join(wd, "metrics.jsonl"))
            if "train/kd" in line] == [2, 4]
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(resolve_init_dir(wd) / "state")
    teacher = load_variables(str(tmp_path / "teacher"))
    for path, leaf in flatten_paths(teacher["params"]).items():
        np.testing.assert_array_equal(flatten_paths(saved["aux"]["teacher"]["params"])[path], leaf, err_msg=path)
    opt_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved["opt_state"])[0]]
    assert opt_paths and not any("teacher" in p for p in opt_paths)
    assert saved["params"]["backbone"]["fc"]["kernel"].shape[-1] == 512  # the student (width 1), not 1024
