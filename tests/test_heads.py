"""Configurable classifier heads (tl_jax/models/heads.py): linear or MLP, against numpy and in every consumer."""
from __future__ import annotations

import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tl_jax import config as config_lib
from tl_jax.models import Bert, get_model
from tl_jax.models.heads import ACTIVATIONS, head_dims, head_kwargs, logits_layer
from tl_jax.objectives import build_objective
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.params import param_rules as pr
from tl_jax.params.param_rules import flatten_paths

KEY = jax.random.PRNGKey(0)


def images(n=4, hw=8, c=1, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, hw, hw, c)), jnp.float32)


def head_config(hidden=(), activation="relu", dropout=0.0):
    c = config_lib.base_config()
    c.model.head.hidden, c.model.head.activation, c.model.head.dropout = list(hidden), activation, dropout
    return c


def np_act(name, x):
    x = np.asarray(x, np.float64)
    erf = np.vectorize(math.erf)
    return {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh,
            "gelu": lambda v: 0.5 * v * (1 + erf(v / math.sqrt(2))),
            "silu": lambda v: v / (1 + np.exp(-v))}[name](x)


@pytest.mark.parametrize("hidden, activation", [((16,), "relu"), ((12, 6), "gelu"), ((8,), "tanh"),
                                                ((8,), "silu")])
def test_mlp_head_matches_numpy_forward(hidden, activation):
    model = get_model("cnn", 5, **head_kwargs(head_config(hidden, activation).model))
    x = images()
    params = model.init(KEY, x)["params"]
    head = params["head"]
    assert sorted(head) == [f"hidden_{i}" for i in range(len(hidden))] + ["logits"]
    logits, feats = model.apply({"params": params}, x, return_features=True)
    a = np.asarray(feats, np.float64)
    for i in range(len(hidden)):
        a = np_act(activation, a @ np.asarray(head[f"hidden_{i}"]["kernel"]) + np.asarray(head[f"hidden_{i}"]["bias"]))
    want = a @ np.asarray(head["logits"]["kernel"]) + np.asarray(head["logits"]["bias"])
    assert logits.shape == (4, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_empty_hidden_is_the_linear_head_of_old_checkpoints():
    assert head_kwargs(head_config().model) == {}
    assert head_kwargs({"name": "cnn", "kwargs": {}}) == {}  # an old config.json without model.head
    x = images()
    plain = get_model("cnn", 5)
    explicit = get_model("cnn", 5, head_hidden=(), head_activation="tanh", head_dropout=0.5)
    vp, ve = plain.init(KEY, x), explicit.init(KEY, x)
    assert jax.tree.map(jnp.shape, vp) == jax.tree.map(jnp.shape, ve)
    assert sorted(p for p in flatten_paths(ve["params"]) if p.startswith("head/")) == ["head/bias", "head/kernel"]
    logits, feats = explicit.apply(ve, x, return_features=True)
    np.testing.assert_array_equal(logits, plain.apply(vp, x))
    want = np.asarray(feats) @ np.asarray(ve["params"]["head"]["kernel"]) + np.asarray(ve["params"]["head"]["bias"])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["cnn", "bert"])
def test_head_dropout_only_in_train_mode(arch):
    kw = dict(head_hidden=(32,), head_dropout=0.5)
    if arch == "bert":
        model = Bert(num_classes=3, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position=16, hidden_dropout=0.0, attention_dropout=0.0, **kw)
        x = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(4, 8)), jnp.int32)
    else:
        model, x = get_model("cnn", 3, **kw), images()
    variables = model.init(KEY, x)
    fwd = jax.jit(lambda v, r: model.apply(v, x, train=True, rngs={"dropout": r}))
    eval_out = model.apply(variables, x)
    t1, t1b, t2 = fwd(variables, jax.random.PRNGKey(1)), fwd(variables, jax.random.PRNGKey(1)), \
        fwd(variables, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(t1, t1b)  # a pure function of the key
    assert not np.allclose(t1, eval_out) and not np.allclose(t1, t2)
    np.testing.assert_array_equal(eval_out, model.apply(variables, x, train=False))
    # the same params with head_dropout=0: train mode equals eval mode, no rng needed (backbone has no dropout)
    no_drop = model.clone(head_dropout=0.0)
    np.testing.assert_allclose(no_drop.apply(variables, x, train=True), eval_out, rtol=1e-6, atol=1e-6)


def test_resnet50_keras_style_head_shapes():
    model = get_model("resnet50", 7, **head_kwargs(head_config([1024]).model))
    shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
    head = {p: s.shape for p, s in flatten_paths(shapes["params"]).items() if p.startswith("head/")}
    assert head == {"head/hidden_0/kernel": (2048, 1024), "head/hidden_0/bias": (1024,),
                    "head/logits/kernel": (1024, 7), "head/logits/bias": (7,)}
    assert logits_layer(shapes["params"]["head"]) is shapes["params"]["head"]["logits"]
    assert head_dims(shapes["params"]["head"]) == (2048, 7)
    linear = jax.eval_shape(lambda: get_model("resnet50", 7).init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
    assert head_dims(linear["params"]["head"]) == (2048, 7) and head_dims({"digit": {}}) is None


def test_param_rules_freeze_part_of_the_head():
    model = get_model("cnn", 4, head_hidden=(8,))
    params = model.init(KEY, images())["params"]
    rules = [["head/hidden_0/.*", None], ["backbone/.*", None], [".*", 1.0]]
    mults = pr.match_rules(params, rules)
    assert mults["head/hidden_0/kernel"] is None and mults["head/logits/kernel"] == 1.0
    tx = pr.build_optimizer(params, rules, lambda m: optax.sgd(0.1 * m))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    new, old = flatten_paths(optax.apply_updates(params, updates)), flatten_paths(params)
    for path in ("head/hidden_0/kernel", "head/hidden_0/bias", "backbone/conv1/kernel"):
        np.testing.assert_array_equal(new[path], old[path], err_msg=path)
    np.testing.assert_allclose(new["head/logits/bias"], np.asarray(old["head/logits/bias"]) - 0.1, rtol=1e-6)


@pytest.mark.parametrize("group, match", [
    (dict(activation="sigmoidal"), r"config.model.head.activation: unknown activation 'sigmoidal'; known: "),
    (dict(hidden=[16, 0]), r"config.model.head.hidden\[1\] must be a positive int"),
    (dict(hidden=[-3]), r"config.model.head.hidden\[0\] must be a positive int"),
    (dict(hidden=[True]), r"config.model.head.hidden\[0\] must be a positive int"),
    (dict(hidden=[8.5]), r"config.model.head.hidden\[0\] must be a positive int"),
    (dict(hidden=[8], dropout=1.0), r"config.model.head.dropout must be a number in \[0, 1\)"),
    (dict(hidden=[8], dropout=-0.1), r"config.model.head.dropout must be a number in \[0, 1\)"),
])
def test_bad_head_options_are_one_line_errors(group, match):
    c = head_config(**group)
    with pytest.raises(config_lib.ConfigError, match=match) as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=match):
        head_kwargs(c.model)
    kw = {"head_hidden": tuple(c.model.head.hidden) or (4,), "head_activation": c.model.head.activation,
          "head_dropout": c.model.head.dropout}
    with pytest.raises(ValueError, match=match):  # a model built with the bad options directly
        get_model("cnn", 3, **kw).init(KEY, images())


def test_head_set_twice_is_an_error_and_the_override_parses():
    c = head_config([8])
    c.model.kwargs = {"head_hidden": [4]}
    with pytest.raises(ValueError, match=r"config.model.head.hidden is set and config.model.kwargs also has "
                                         r"\['head_hidden'\]"):
        head_kwargs(c.model)
    c = config_lib.base_config()
    config_lib.apply_overrides(c, ["model.head.hidden=[1024, 256]", "model.head.activation=gelu",
                                   "model.head.dropout=0.2"])
    config_lib.validate(c)
    assert head_kwargs(c.model) == {"head_hidden": (1024, 256), "head_activation": "gelu", "head_dropout": 0.2}
    assert {"relu", "gelu", "tanh", "silu"} <= set(ACTIVATIONS)


def test_multitask_heads_are_mlps():
    c = config_lib.base_config()
    c.objective.name = "multitask"
    c.objective.multitask.tasks = ["digit", "parity"]
    obj = build_objective(c, get_model("cnn", 10, head_hidden=(6,), head_activation="tanh"))
    x = images()
    params = obj.model.init(KEY, x)["params"]
    assert sorted(p for p in flatten_paths(params) if p.startswith("head/")) == [
        f"head/{t}/{layer}/{leaf}" for t in ("digit", "parity") for layer in ("hidden_0", "logits")
        for leaf in ("bias", "kernel")]
    out, feats = obj.model.apply({"params": params}, x, return_features=True)
    for task, classes in (("digit", 10), ("parity", 2)):
        h = params["head"][task]
        hid = h["hidden_0"]
        a = np.tanh(np.asarray(feats, np.float64) @ np.asarray(hid["kernel"]) + np.asarray(hid["bias"]))
        want = a @ np.asarray(h["logits"]["kernel"]) + np.asarray(h["logits"]["bias"])
        assert out[task].shape == (4, classes)
        np.testing.assert_allclose(out[task], want, rtol=1e-4, atol=1e-5)


def test_residual_zero_init_zeros_only_the_last_layer(tmp_path):
    config = config_lib.base_config()
    config.objective.name = "residual_output"
    model = get_model("cnn", 4, head_hidden=(8,))
    x = images(6)
    src_params = model.init(KEY, x)["params"]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "source" / "state", {"params": src_params})
    config.objective.residual_output.source = str(tmp_path / "source")
    config.model.head.hidden = [8]  # the source's architecture (no config.json in tmp_path/source)
    obj = build_objective(config, model)
    fresh = model.init(jax.random.PRNGKey(9), x)["params"]
    diff = obj.init_params(KEY, fresh, {})
    assert float(jnp.abs(diff["head"]["logits"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(diff["head"]["logits"]["bias"]).max()) == 0.0
    np.testing.assert_array_equal(diff["head"]["hidden_0"]["kernel"], fresh["head"]["hidden_0"]["kernel"])
    _, aux = obj.init_extra(KEY, diff, {})
    batch = {"image": x, "label": jnp.arange(6, dtype=jnp.int32) % 4, "mask": jnp.ones(6)}
    z, z_src, z_diff, _ = obj.logits(diff, {}, aux, batch, train=False)
    assert float(jnp.abs(z_diff).max()) == 0.0
    np.testing.assert_array_equal(z, model.apply({"params": src_params}, x))  # starts exactly at the source


def _torchvision_names(shapes: dict) -> dict[str, np.ndarray]:
    """Random tensors named like a torchvision ResNet state dict, for a tl_jax resnet's variable shapes."""
    rng = np.random.default_rng(0)
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    out = {}
    for path, spec in shapes.items():
        coll, _, rest = path.partition("/")
        *mods, name = rest.removeprefix("backbone/").split("/")
        mod = ".".join(mods)
        mod = re.sub(r"layer(\d)_(\d+)", r"layer\1.\2", mod).replace("downsample_conv", "downsample.0")
        mod = mod.replace("downsample_bn", "downsample.1").replace("head", "fc")
        shape = tuple(spec.shape)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = shape[::-1]
        out[f"{mod}.{leaf[name]}"] = (rng.random(shape) if name == "var" else rng.normal(size=shape)).astype(
            np.float32)
    return out


def test_weight_import_keeps_an_mlp_head_fresh_or_refuses(tmp_path):
    from tl_jax.weights import convert_weights
    from tl_jax.weights.convert import target_shapes

    targets = target_shapes("resnet18", 6, {"base_width": 4, "stem": "cifar"},
                            ((np.zeros((1, 16, 16, 3), np.float32),), {}))
    np.savez(tmp_path / "r18.npz", **_torchvision_names(targets))
    with pytest.raises(ValueError, match=r"the classifier fc.bias of .* is a linear head .* head_hidden=\[16\] "
                                         r"builds an MLP head: --ignore the classifier tensors"):
        convert_weights(tmp_path / "r18.npz", mapping="torchvision_resnet", model="resnet18", out=None,
                        model_kwargs={"head_hidden": (16,)})
    res = convert_weights(tmp_path / "r18.npz", mapping="torchvision_resnet", model="resnet18", out=None,
                          model_kwargs={"head_hidden": (16,)}, ignore=[r"fc\..*"])
    assert "head" not in res.variables["params"] and "fc.weight" in res.dropped
    assert "backbone" in res.variables["params"]


# --- end to end: frozen backbone + MLP head on cached features == the uncached run ---------------------------
def probe(data_dir: str, feature_cache):
    config = config_lib.load_config("tests/configs/tiny.py:steps=6")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "train.eval_every=0",
                                        "train.checkpoint_every=3", "train.log_every=3"])
    config.param_rules = [["backbone/.*", None], [".*", 1.0]]
    config.model.dropout_rate = 0.2
    config.model.head.hidden, config.model.head.activation, config.model.head.dropout = [16], "gelu", 0.25
    config.train.feature_cache = feature_cache
    return config


@pytest.mark.slow
def test_mlp_head_on_cached_features_equals_uncached_run(tmp_path, tfds_data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        cached = train(probe(tfds_data_dir, True), str(tmp_path / "cached"))
    assert "training the head on" in caplog.text
    plain = train(probe(tfds_data_dir, False), str(tmp_path / "plain"))
    pc = flatten_paths(load_variables(str(tmp_path / "cached"))["params"])
    pp = flatten_paths(load_variables(str(tmp_path / "plain"))["params"])
    assert pc.keys() == pp.keys() and "head/hidden_0/kernel" in pc and "head/logits/kernel" in pc
    for key in pc:
        if key.startswith("backbone/"):
            np.testing.assert_array_equal(pc[key], pp[key], err_msg=key)  # frozen: bit-identical either way
        else:
            np.testing.assert_allclose(pc[key], pp[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for key in ("test/accuracy", "test/loss", "train/loss"):
        np.testing.assert_allclose(cached[key], plain[key], rtol=1e-4, atol=1e-5, err_msg=key)
