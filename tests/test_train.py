"""The pure train step and the masked eval: real numbers, tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tl_jax.data import build_preprocess, load_split
from tl_jax.models import get_model
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.evaluation.during_training import evaluate
from tl_jax.train.state import TrainState
from tl_jax.config import base_config
from tl_jax.objectives import Objective
from tl_jax.train.step import make_eval_step, make_train_step


def classification_loss(model):
    return Objective(base_config(), model).loss
from tl_jax.params import param_rules as pr


def make_state(model, tx, x, seed=0):
    variables = model.init(jax.random.PRNGKey(seed), x, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32))


def fixed_batch(n=16, hw=12, c=1, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, hw, hw, c)).astype(np.float32),
            "label": rng.integers(0, classes, size=n).astype(np.int32)}


def test_loss_decreases_on_fixed_batch():
    model = get_model("cnn", 4)
    batch = fixed_batch()
    tx = optax.adam(1e-3)
    state = make_state(model, tx, batch["image"])
    step = jax.jit(make_train_step(classification_loss(model), tx))
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 15


def test_frozen_params_bit_identical_and_stateless_with_batchnorm():
    model = get_model("resnet18", 4, base_width=4, stem="cifar")
    batch = fixed_batch(n=8, hw=8, c=3)
    variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
    rules = [["backbone/.*", None], [".*", 1.0]]
    from tl_jax.models import norm_paths
    frozen_norms = pr.frozen_module_paths(variables["params"], rules, norm_paths(variables["batch_stats"]))
    assert len(frozen_norms) == len(norm_paths(variables["batch_stats"])) > 0
    model = model.clone(frozen_norms=frozen_norms)
    tx = pr.build_optimizer(variables["params"], rules, lambda m: optax.adam(1e-2 * m))
    state = make_state(model, tx, batch["image"])
    start = jax.device_get(state)
    step = jax.jit(make_train_step(classification_loss(model), tx))
    for _ in range(3):
        state, _ = step(state, batch)
    end = jax.device_get(state)
    for path, leaf in pr.flatten_paths(start.params["backbone"]).items():
        np.testing.assert_array_equal(pr.flatten_paths(end.params["backbone"])[path], leaf, err_msg=path)
    for path, leaf in pr.flatten_paths(start.batch_stats).items():
        np.testing.assert_array_equal(pr.flatten_paths(end.batch_stats)[path], leaf, err_msg=path)
    assert not np.array_equal(end.params["head"]["kernel"], start.params["head"]["kernel"])
    opt_paths = [pr.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(end.opt_state)[0]]
    assert not any("backbone" in p for p in opt_paths), opt_paths


def test_unfrozen_batchnorm_stats_move():
    model = get_model("resnet18", 4, base_width=4, stem="cifar")
    batch = fixed_batch(n=8, hw=8, c=3)
    tx = optax.sgd(0.0)
    state = make_state(model, tx, batch["image"])
    new, _ = jax.jit(make_train_step(classification_loss(model), tx))(state, batch)
    before = pr.flatten_paths(jax.device_get(state.batch_stats))
    after = pr.flatten_paths(jax.device_get(new.batch_stats))
    assert any(not np.array_equal(before[p], after[p]) for p in before)


def test_skip_policy_keeps_state_on_nan():
    model = get_model("cnn", 4)
    batch = fixed_batch()
    tx = optax.sgd(0.1)
    state = make_state(model, tx, batch["image"])
    bad = dict(batch, image=np.full_like(batch["image"], np.nan))
    step = jax.jit(make_train_step(classification_loss(model), tx, nan_policy="skip"))
    new, m = step(state, bad)
    assert float(m["train/finite"]) == 0.0 and int(new.skipped) == 1 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), jax.device_get(state.params))
    new2, m2 = step(new, batch)
    assert float(m2["train/finite"]) == 1.0 and int(new2.skipped) == 1


def test_masked_eval_matches_numpy(tfds_data_dir):
    """450 optdigits test digits with batch 100: the last batch is padded, never dropped."""
    split = load_split("optdigits", "test", tfds_data_dir)
    assert len(split.source) % 100 != 0
    pp = build_preprocess([{"op": "rescale", "in_max": 16.0}])
    model = get_model("cnn", 10)
    state = make_state(model, optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)))
    variables = {"params": state.params}
    mesh = mesh_lib.make_mesh(1)
    res = evaluate(jax.jit(make_eval_step(Objective(base_config(), model))), state, split, pp, 100, mesh)

    images = np.stack([pp(split.source[i], None)["image"] for i in range(len(split.source))])
    labels = split.labels()
    logits = np.asarray(model.apply(variables, images), np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(len(labels)), labels]
    assert res["count"] == 450
    np.testing.assert_allclose(res["loss"], ce.mean(), rtol=1e-5)
    assert res["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)), abs=1e-9)


def test_grad_norm_on_logged_steps_only_same_updates():
    """``grad_norm_every=3, last_step=5``: ‖g‖ on steps 3 and 5 (numpy reference), 0 elsewhere; params unchanged."""
    model = get_model("cnn", 4)
    batch = fixed_batch()
    tx = optax.sgd(0.05)
    loss_fn = classification_loss(model)
    every_step = jax.jit(make_train_step(loss_fn, tx))
    sparse = jax.jit(make_train_step(loss_fn, tx, grad_norm_every=3, last_step=5))
    a = b = make_state(model, tx, batch["image"])
    for step in range(1, 6):
        grads = jax.grad(lambda p: loss_fn(p, {}, {}, batch, jax.random.fold_in(b.rng, b.step), b.step)[0])(b.params)
        want = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
        a, ma = every_step(a, batch)
        b, mb = sparse(b, batch)
        np.testing.assert_allclose(float(ma["train/grad_norm"]), want, rtol=1e-5)
        if step in (3, 5):
            np.testing.assert_allclose(float(mb["train/grad_norm"]), want, rtol=1e-5)
        else:
            assert float(mb["train/grad_norm"]) == 0.0
        assert float(mb["train/finite"]) == 1.0
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))


def test_grad_norm_flag_programs_match_the_cond_step():
    """``grad_norm=True``/``False`` (the loop's two programs): ‖g‖ every step / 0 with no ``lax.cond``;
    the same params as the ``lax.cond`` step; ``False`` under ``nan_policy='skip'`` is refused."""
    model = get_model("cnn", 4)
    batch = fixed_batch()
    tx = optax.sgd(0.05)
    loss_fn = classification_loss(model)
    steps = {flag: jax.jit(make_train_step(loss_fn, tx, grad_norm_every=2, grad_norm=flag))
             for flag in (None, True, False)}
    state = make_state(model, tx, batch["image"])
    for flag in (True, False):
        assert "conditional" not in steps[flag].lower(state, batch).compile().as_text()
    states = dict.fromkeys(steps, state)
    for step in range(1, 4):
        grads = jax.grad(lambda p: loss_fn(p, {}, {}, batch, jax.random.fold_in(state.rng, state.step),
                                           state.step)[0])(states[None].params)
        want = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
        out = {}
        for flag, fn in steps.items():
            states[flag], out[flag] = fn(states[flag], batch)
        np.testing.assert_allclose(float(out[True]["train/grad_norm"]), want, rtol=1e-5)
        assert float(out[False]["train/grad_norm"]) == 0.0
        assert float(out[None]["train/grad_norm"]) == (float(out[True]["train/grad_norm"]) if step == 2 else 0.0)
        for flag in (True, False):
            assert float(out[flag]["train/finite"]) == 1.0
            np.testing.assert_allclose(float(out[flag]["train/loss"]), float(out[None]["train/loss"]), rtol=1e-6)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         jax.device_get(states[flag].params), jax.device_get(states[None].params))
        state = states[None]
    with pytest.raises(ValueError, match="nan_policy='skip' needs the gradient norm"):
        make_train_step(loss_fn, tx, nan_policy="skip", grad_norm=False)


def test_grad_norm_every_rejects_bad_values():
    with pytest.raises(ValueError, match="grad_norm_every must be an int >= 1"):
        make_train_step(classification_loss(get_model("cnn", 4)), optax.sgd(0.1), grad_norm_every=0)


def test_fetch_reads_cpu_vectors_without_device_get_and_keeps_restored_items(monkeypatch):
    from tl_jax.train import train_metrics

    step = jax.jit(lambda x: (x + 1, jax.numpy.stack([x.sum(), x.max()])))
    x, vectors = jax.numpy.arange(4.0), []
    for _ in range(3):
        x, m = step(x)
        vectors.append(m)
    restored = {"train/loss": 0.5}  # a pending window's step restored from a checkpoint: a host dict
    expected = jax.device_get(vectors)

    def no_device_get(*_):
        raise AssertionError("jax.device_get on CPU vectors")

    monkeypatch.setattr(train_metrics.jax, "device_get", no_device_get)
    got = train_metrics.fetch([restored, *vectors])
    assert got[0] is restored
    for g, e in zip(got[1:], expected):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, e)
