"""Residual adaptation objectives: output form (frozen source in aux) and parameter form (dense/LoRA delta)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tl_jax import config as config_lib
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.objectives.residual import SOURCE_RULE, merged_params, write_merged_checkpoint
from tl_jax.params import param_rules as pr
from conftest import RUN_FILES, workdir_files


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


def save_source(tmp_path, params):
    out = tmp_path / "source"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "state", {"params": params})
    return str(out)


def test_output_form_zero_head_starts_at_source_and_gradients(tmp_path):
    config, model, src_params, batch = setup("residual_output", learn_alpha=True, alpha=0.5)
    config.objective.residual_output.source = save_source(tmp_path, src_params)
    obj = build_objective(config, model)
    diff = obj.init_params(jax.random.PRNGKey(0), model.init(jax.random.PRNGKey(9), batch["image"])["params"], {})
    assert float(jnp.abs(diff["head"]["kernel"]).max()) == 0.0
    extra, aux = obj.init_extra(jax.random.PRNGKey(1), diff, {})
    params = {**diff, **extra}
    z, z_src, z_diff, _ = obj.logits(params, {}, aux, batch, train=False)
    np.testing.assert_array_equal(z, model.apply({"params": src_params}, batch["image"]))  # P_target = P_source
    params["head"] = randomize(params["head"])
    z, z_src, z_diff, _ = obj.logits(params, {}, aux, batch, train=False)
    np.testing.assert_allclose(z, z_src + 0.5 * z_diff, rtol=1e-6)
    grads = jax.grad(lambda p: obj.loss(p, {}, aux, batch, jax.random.PRNGKey(0), 0)[0])(params)
    assert float(jnp.abs(grads["alpha"])) > 0 and float(jnp.abs(grads["head"]["kernel"]).max()) > 0


def test_output_form_errors(tmp_path):
    config, model, params, _ = setup("residual_output")
    with pytest.raises(ValueError, match=r"config.objective.residual_output.source \(or config.init_from\)"):
        build_objective(config, model)
    config.objective.residual_output.source = save_source(tmp_path, params)
    obj = build_objective(config, get_model("cnn", 5))
    with pytest.raises(ValueError, match="the source head has 4 classes, the target model 5"):
        obj.init_extra(jax.random.PRNGKey(0), params, {})


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


@pytest.mark.slow
def test_train_residual_output_keeps_source_in_aux(tmp_path, tfds_data_dir, source_run):
    from tl_jax.train.checkpoint import load_variables, resolve_init_dir
    from tl_jax.train.loop import train

    src = source_run
    wd = str(tmp_path / "ro")
    summary = train(tiny(tfds_data_dir, init_from=src, **{"objective.name": "residual_output",
                                                          "objective.residual_output.learn_alpha": True}), wd)
    assert summary["steps"] == 4 and "train/residual/alpha" in summary
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(resolve_init_dir(wd) / "state")
    source = load_variables(src)["params"]
    for path, leaf in pr.flatten_paths(source).items():
        np.testing.assert_array_equal(pr.flatten_paths(state["aux"]["source"]["params"])[path], leaf, err_msg=path)
    assert set(state["params"]) == {"backbone", "head", "alpha"}
