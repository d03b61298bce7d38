"""Residual adaptation at the output: residual logits; the frozen source, zero head, errors, end to end."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.residual_output import residual_logits
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params import param_rules as pr


def test_residual_logits():
    np.testing.assert_allclose(residual_logits(jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]), 0.5), [2.5, 1.5])
    with pytest.raises(ValueError, match="diff_logits"):
        residual_logits(jnp.ones((2, 3)), jnp.ones((2, 2)), 1.0)


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
