"""config.train.feature_cache: a linear probe on cached backbone features equals the uncached probe."""
import logging

import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess
from tl_jax.models import get_model
from tl_jax.objectives import Objective
from tl_jax.train import feature_cache
from tl_jax.train import loop as loop_lib
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.params.param_rules import flatten_paths

TINY = "tests/configs/tiny.py"
PROBE = [["backbone/.*", None], [".*", 1.0]]


def probe_config(data_dir: str, feature_cache_mode, **overrides):
    config = config_lib.load_config(f"{TINY}:steps=6")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "train.eval_every=0",
                                        "train.checkpoint_every=3", "train.log_every=3"])
    config.param_rules = PROBE
    config.train.feature_cache = feature_cache_mode
    for key, value in overrides.items():
        config_lib.set_value(config, key, value)
    return config


def test_cached_probe_equals_uncached_probe(tmp_path, tfds_data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        cached = train(probe_config(tfds_data_dir, "auto"), str(tmp_path / "cached"))
    assert "training the head on" in caplog.text  # 'auto' is on for a linear probe
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        plain = train(probe_config(tfds_data_dir, False), str(tmp_path / "plain"))
    assert "training the head on" not in caplog.text
    pc = flatten_paths(load_variables(str(tmp_path / "cached"))["params"])
    pp = flatten_paths(load_variables(str(tmp_path / "plain"))["params"])
    assert pc.keys() == pp.keys()
    for key in pc:
        if key.startswith("backbone/"):
            np.testing.assert_array_equal(pc[key], pp[key], err_msg=key)  # frozen: untouched either way
        else:
            np.testing.assert_allclose(pc[key], pp[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in ("test/accuracy", "test/loss", "train/loss", "train/grad_norm"):
        np.testing.assert_allclose(cached[key], plain[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert cached["steps"] == plain["steps"] == 6


def test_cached_probe_resumes_where_it_stopped(tmp_path, tfds_data_dir, monkeypatch, caplog):
    full = train(probe_config(tfds_data_dir, True), str(tmp_path / "full"))

    def crash(kind, step):
        if kind == "kill_after_step" and step == 4:  # after the step-3 checkpoint
            raise RuntimeError("crash")

    monkeypatch.setattr(loop_lib, "maybe_kill", crash)
    with pytest.raises(RuntimeError, match="crash"):
        train(probe_config(tfds_data_dir, True), str(tmp_path / "resumed"))
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        resumed = train(probe_config(tfds_data_dir, True), str(tmp_path / "resumed"))
    assert "resumed from" in caplog.text and "training the head on" in caplog.text
    assert resumed["steps"] == full["steps"] == 6
    pf = flatten_paths(load_variables(str(tmp_path / "full"))["params"])
    pr = flatten_paths(load_variables(str(tmp_path / "resumed"))["params"])
    for key in pf:
        np.testing.assert_array_equal(pf[key], pr[key], err_msg=key)
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()


def test_eligibility_reasons():
    config = probe_config("unused", "auto")
    model = get_model("cnn", 10)
    params = {"backbone": {"fc": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}},
              "head": {"kernel": np.zeros((2, 10)), "bias": np.zeros(10)}}
    objective = Objective(config, model)
    deterministic = build_preprocess([{"op": "rescale", "in_max": 255}])
    assert feature_cache.ineligible_reason(config, objective, params, deterministic) is None
    random_pp = build_preprocess([{"op": "flip_lr"}])
    assert "random ops" in feature_cache.ineligible_reason(config, objective, params, random_pp)
    config.param_rules = [[".*", 1.0]]
    assert "backbone params train" in feature_cache.ineligible_reason(config, objective, params, deterministic)


def test_true_raises_with_the_reason(tmp_path, tfds_data_dir):
    config = probe_config(tfds_data_dir, True)
    config.param_rules = [[".*", 1.0]]
    with pytest.raises(ValueError, match="feature_cache=true but .*backbone params train"):
        train(config, str(tmp_path / "ft"))


# Own models with a backbone/head split (docs/models.md#the-own-model-contract): pooling and dropout sit
# between backbone and head, so the cached path must run the model's own __call__ with the backbone replaced.
OWN_NNX = '''
from flax import nnx


class Backbone(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))  # [B, H, W, 8]: the head's input is pooled in Net


class Net(nnx.Module):
    def __init__(self, num_classes, *, rngs):
        self.backbone = Backbone(rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(self.backbone(x).mean(axis=(1, 2))))
'''

OWN_LINEN = '''
import flax.linen as nn


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(8, (3, 3))(x))


class Net(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train=False):
        h = Backbone(name="backbone")(x).mean(axis=(1, 2))
        h = nn.Dropout(0.2, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="head")(h)


def make(num_classes):
    return Net(num_classes)
'''

SKIP_LINEN = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train=False):
        h = nn.Dense(8, name="backbone")(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes, name="head")(h + x.reshape(x.shape[0], -1)[:, :8])  # x bypasses it


def make(num_classes):
    return Net(num_classes)
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_own_split_model_cached_probe_equals_uncached(kind, tmp_path, tfds_data_dir, caplog):
    path = tmp_path / "own.py"
    path.write_text(OWN_NNX if kind == "nnx" else OWN_LINEN)
    name = f"{path}:{'Net' if kind == 'nnx' else 'make'}"
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        cached = train(probe_config(tfds_data_dir, True, **{"model.name": name}), str(tmp_path / "cached"))
    assert "training the head on" in caplog.text
    plain = train(probe_config(tfds_data_dir, False, **{"model.name": name}), str(tmp_path / "plain"))
    pc = flatten_paths(load_variables(str(tmp_path / "cached"))["params"])
    pp = flatten_paths(load_variables(str(tmp_path / "plain"))["params"])
    assert pc.keys() == pp.keys()
    moved = 0
    for key in pc:
        if key.startswith("backbone/"):
            np.testing.assert_array_equal(pc[key], pp[key], err_msg=key)
        else:
            np.testing.assert_allclose(pc[key], pp[key], rtol=1e-4, atol=1e-5, err_msg=key)
            moved += 1
    assert moved == 2  # head/kernel, head/bias
    for key in ("test/accuracy", "test/loss", "train/loss", "train/grad_norm"):
        np.testing.assert_allclose(cached[key], plain[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_own_model_without_split_or_with_input_bypass_is_refused(tmp_path):
    config = probe_config("unused", "auto")
    deterministic = build_preprocess([{"op": "rescale", "in_max": 255}])
    path = tmp_path / "skip.py"
    path.write_text(SKIP_LINEN)
    model = get_model(f"{path}:make", 10)
    x = np.random.default_rng(0).normal(size=(4, 14, 14, 1)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    objective = Objective(config, model)
    assert feature_cache.ineligible_reason(config, objective, params, deterministic) is None  # names fit
    assert not feature_cache._split_matches(model, params, {}, x)  # ... but x reaches the head around it
    renamed = {"body": params["backbone"], "head": params["head"]}
    reason = feature_cache.ineligible_reason(config, objective, renamed, deterministic)
    assert "no `backbone` and `head` submodules" in reason and "docs/models.md#the-own-model-contract" in reason
