"""Residual adaptation at the params: dense and LoRA deltas, merge; layout, gradients, merged checkpoint."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.residual_params import (SOURCE_RULE, apply_delta, init_lora, lora_dense_delta, merge,
                                             merged_params, write_merged_checkpoint)
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params import param_rules as pr
from conftest import RUN_FILES, workdir_files


PARAMS = {
    "conv": {"kernel": jnp.arange(3 * 3 * 2 * 4, dtype=jnp.float32).reshape(3, 3, 2, 4) / 10, "bias": jnp.ones(4)},
    "dense": {"kernel": jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "bias": jnp.zeros(3)},
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
}


def test_apply_dense_subset_delta():
    delta = {"dense": {"kernel": jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])}, "head": {"bias": jnp.ones(2)}}
    out = apply_delta(PARAMS, delta, 0.5)
    np.testing.assert_allclose(out["dense"]["kernel"], [[1.5, 2.0, 2.5], [4.0, 6.0, 6.0]])
    np.testing.assert_allclose(out["head"]["bias"], [0.5, 0.5])
    for path in (("conv", "kernel"), ("conv", "bias"), ("dense", "bias"), ("head", "kernel")):
        np.testing.assert_array_equal(out[path[0]][path[1]], PARAMS[path[0]][path[1]])


def test_init_lora_shapes_zero_b_and_scale():
    delta = init_lora(PARAMS, ["conv/kernel", "dense/.*"], rank=2, rng=jax.random.PRNGKey(0))
    assert set(delta) == {"conv", "dense"} and set(delta["dense"]) == {"kernel"}      # bias skipped
    assert delta["conv"]["kernel"]["a"].shape == (3, 3, 2, 2) and delta["conv"]["kernel"]["b"].shape == (2, 4)
    assert delta["dense"]["kernel"]["a"].shape == (2, 2) and delta["dense"]["kernel"]["b"].shape == (2, 3)
    assert all(np.all(np.asarray(d["kernel"]["b"]) == 0) for d in delta.values())
    # θ starts at θ_source
    out = apply_delta(PARAMS, delta, 4.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, PARAMS)
    # a ~ N(0, 1/fan_in): fan_in = 3·3·2 = 18 for the conv kernel
    big = init_lora({"k": jnp.zeros((256, 8))}, ["k"], rank=64, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.var(np.asarray(big["k"]["a"])), 1 / 256, rtol=0.1)


def test_merge_equals_applying_dense_delta():
    key_a, key_b = jax.random.split(jax.random.PRNGKey(2))
    delta = init_lora(PARAMS, ["conv/kernel", "head/kernel"], rank=3, rng=key_a)
    delta["conv"]["kernel"]["b"] = jax.random.normal(key_b, (3, 4))
    delta["head"]["kernel"]["b"] = jnp.ones((3, 2))
    dense = lora_dense_delta(delta)
    a = np.asarray(delta["conv"]["kernel"]["a"], np.float64).reshape(18, 3)        # [kh·kw·in, r]
    want_conv = (a @ np.asarray(delta["conv"]["kernel"]["b"], np.float64)).reshape(3, 3, 2, 4)
    np.testing.assert_allclose(dense["conv"]["kernel"], want_conv, rtol=1e-5, atol=1e-6)
    merged = merge(PARAMS, delta, 0.3)
    via_dense = apply_delta(PARAMS, dense, 0.3)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), merged, via_dense)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), merged,
                           apply_delta(PARAMS, delta, 0.3))
    np.testing.assert_allclose(merged["conv"]["kernel"], np.asarray(PARAMS["conv"]["kernel"]) + 0.3 * want_conv,
                               rtol=1e-5)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(PARAMS)


def test_gradient_flows_only_into_delta():
    delta = init_lora(PARAMS, ["dense/kernel"], rank=1, rng=jax.random.PRNGKey(3))
    x = jnp.array([[1.0, -1.0]])

    def loss(source, delta):
        p = apply_delta(source, delta, 1.0)
        return jnp.sum((x @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2)

    g_src, g_delta = jax.grad(loss, argnums=(0, 1))(PARAMS, delta)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_src))
    # at b = 0 only B gets a gradient: ∂L/∂B = Aᵀ xᵀ (∂L/∂y)
    assert np.any(np.asarray(g_delta["dense"]["kernel"]["b"]) != 0)
    np.testing.assert_array_equal(g_delta["dense"]["kernel"]["a"], 0.0)


@pytest.mark.parametrize("fn, match", [
    (lambda: init_lora(PARAMS, ["dense/kernel", "dense/bias"], 2, jax.random.PRNGKey(0)), "rule 'dense/bias'"),
    (lambda: init_lora(PARAMS, ["nothing"], 2, jax.random.PRNGKey(0)), "rule 'nothing'"),
    (lambda: init_lora(PARAMS, ["dense/kernel"], 0, jax.random.PRNGKey(0)), "rank"),
    (lambda: apply_delta(PARAMS, {"dense": {"kernel": jnp.ones((3, 2))}}, 1.0), "delta 'dense/kernel'"),
    (lambda: apply_delta(PARAMS, {"dense": {"w": jnp.ones(2)}}, 1.0), "not in source_params"),
    (lambda: apply_delta(PARAMS, {"dense": {"kernel": jnp.ones((2, 3))}}, float("nan")), "alpha"),
])
def test_bad_args(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def setup(name, seed=0, **group):
    config = config_lib.base_config()
    config.objective.name = name
    for k, v in group.items():
        config.objective[name][k] = v
    model = get_model("cnn", 4)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(6, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.PRNGKey(seed), x)["params"]
    batch = {"image": x, "label": jnp.arange(6, dtype=jnp.int32) % 4, "mask": jnp.ones(6)}
    return config, model, params, batch


def randomize(tree, seed=3, scale=0.05):
    leaves, td = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(td, [scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_params_delta_layout_rules_and_start_at_source():
    config, model, params, batch = setup("residual_params", lora_rules=["backbone/conv.*", "backbone/fc/kernel"],
                                         lora_rank=2, learn_alpha=True)
    obj = build_objective(config, model)
    extra, aux = obj.init_extra(jax.random.PRNGKey(1), params, {})
    assert aux == {} and float(extra["alpha"]) == 1.0
    delta = extra["delta"]
    assert delta["backbone"]["conv1"]["kernel"]["a"].shape == (3, 3, 1, 2)
    assert delta["backbone"]["fc"]["kernel"]["b"].shape == (2, 512)
    assert delta["head"]["kernel"].shape == params["head"]["kernel"].shape  # dense (default dense_rules)
    full = {**params, **extra}
    table = pr.match_rules(full, obj.fixed_rules() + [[".*", 1.0]])
    assert {p for p, m in table.items() if m is None} == set(pr.flatten_paths(params))  # the source is frozen
    assert obj.fixed_rules() == [[SOURCE_RULE, None]]
    # Δ = 0 at the start: the adapted model is the source model.
    z_src = model.apply({"params": params}, batch["image"])
    z = obj.eval_sums(full, {}, aux, batch)
    np.testing.assert_allclose(float(z["accuracy"]), float(jnp.sum(jnp.argmax(z_src, -1) == batch["label"])))
    jax.tree.map(np.testing.assert_array_equal, obj.adapted_params(full), params)


def test_params_gradient_reaches_delta_and_alpha_only():
    config, model, params, batch = setup("residual_params", lora_rules=["backbone/fc/kernel"], learn_alpha=True)
    obj = build_objective(config, model)
    extra, _ = obj.init_extra(jax.random.PRNGKey(1), params, {})
    full = {**params, **extra, "delta": randomize(extra["delta"])}
    grads = jax.grad(lambda p: obj.loss(p, {}, {}, batch, jax.random.PRNGKey(0), 0)[0])(full)
    for path, g in pr.flatten_paths(grads).items():
        zero = not path.startswith(("delta/", "alpha"))
        assert (np.abs(np.asarray(g)).max() == 0) == zero, path


def test_merge_gives_identical_logits_dense_and_lora():
    config, model, params, batch = setup("residual_params", lora_rules=["backbone/.*"], alpha=0.7)
    obj = build_objective(config, model)
    extra, _ = obj.init_extra(jax.random.PRNGKey(1), params, {})
    full = {**params, "delta": randomize(extra["delta"])}
    merged = merged_params(full, alpha=0.7)
    assert set(merged) == {"backbone", "head"}
    z_res = model.apply({"params": obj.adapted_params(full)}, batch["image"])
    z_plain = model.apply({"params": merged}, batch["image"])
    np.testing.assert_array_equal(np.asarray(z_res), np.asarray(z_plain))
    with pytest.raises(ValueError, match="pass it"):
        merged_params(full)


@pytest.mark.parametrize("group, msg", [
    (dict(dense_rules=["nope/.*"]), r"config.objective.residual_params.dense_rules \['nope/.\*'\] match no param"),
    (dict(dense_rules=[], lora_rules=["head/bias"]), r"config.objective.residual_params.lora_rules: rule"),
    (dict(lora_rank=0), r"config.objective.residual_params.lora_rank must be an int >= 1"),
    (dict(dense_rules=[], lora_rules=[]), r"both empty"),
    (dict(alpha=float("nan")), r"config.objective.residual_params.alpha must be a finite number"),
])
def test_params_bad_config_is_named(group, msg):
    config, model, params, _ = setup("residual_params", **group)
    with pytest.raises(ValueError, match=msg):
        build_objective(config, model).init_extra(jax.random.PRNGKey(0), params, {})


def tiny(data_dir, **ov):
    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = data_dir
    return config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in ov.items()])


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tfds_data_dir):
    """A tiny pretrained mnist5k run shared by the end-to-end tests."""
    from tl_jax.train.loop import train

    src = str(tmp_path_factory.mktemp("residual") / "src")
    train(tiny(tfds_data_dir), src)
    return src


@pytest.mark.slow
def test_train_residual_params_source_bit_identical_and_merged_checkpoint(tmp_path, tfds_data_dir, source_run):
    from tl_jax.train.checkpoint import load_variables
    from tl_jax.train.loop import train

    src = source_run
    wd = str(tmp_path / "rp")
    cfg = tiny(tfds_data_dir, init_from=src, dont_load=[], **{
        "objective.name": "residual_params", "objective.residual_params.lora_rules": ["backbone/.*"],
        "objective.residual_params.alpha": 0.5})
    summary = train(cfg, wd)
    assert workdir_files(wd) == RUN_FILES
    before, after = load_variables(src)["params"], load_variables(wd)["params"]
    for path, leaf in pr.flatten_paths(before).items():
        np.testing.assert_array_equal(pr.flatten_paths(after)[path], leaf, err_msg=path)  # frozen source
    assert float(np.abs(after["delta"]["head"]["kernel"]).max()) > 0
    merged = write_merged_checkpoint(wd, str(tmp_path / "merged"))
    plain = load_variables(str(tmp_path / "merged"))  # a plain checkpoint, loadable as init_from
    assert set(plain["params"]) == {"backbone", "head"}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 14, 14, 1)), jnp.float32)
    model = get_model("cnn", 10)
    obj = build_objective(cfg, model)
    np.testing.assert_allclose(model.apply(plain, x), model.apply({"params": obj.adapted_params(after)}, x),
                               rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, plain["params"], merged["params"])
    again = train(tiny(tfds_data_dir, init_from=str(tmp_path / "merged"), dont_load=[], **{"train.steps": 1}),
                  str(tmp_path / "from_merged"))
    assert again["steps"] == 1 and summary["steps"] == 4
