"""Config files, arguments and overrides: locked schema, typed values, clear errors."""
import pytest

from tl_jax import config as config_lib
from tl_jax.cli import split_overrides

EXP = "experiments/mnist_to_digits.py"


def test_load_and_override():
    c = config_lib.load_config(f"{EXP}:stage=target,shots=10")
    assert c.data.name == "optdigits" and c.data.shots == 10
    config_lib.apply_overrides(c, ['param_rules=[["backbone/.*", null], [".*", 1.0]]', "init_from=runs/src",
                                   "optimizer.learning_rate=3e-4", "train.steps=7"])
    assert c.param_rules == [["backbone/.*", None], [".*", 1.0]]
    assert c.init_from == "runs/src" and c.optimizer.learning_rate == 3e-4 and c.train.steps == 7


@pytest.mark.parametrize("override, msg", [
    ("trian.steps=3", r"unknown config key config.trian.steps; did you mean config.train.steps"),
    ("train.steps=abc", r"config.train.steps: expected int"),
    ("data.shots=[1]", r"config.data.shots: expected int or None"),
    ("train.steps", r"needs a value"),
])
def test_bad_overrides(override, msg):
    c = config_lib.load_config(f"{EXP}:stage=source")
    with pytest.raises(config_lib.ConfigError, match=msg):
        config_lib.apply_overrides(c, [override])


def test_bad_config_args():
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'shot'"):
        config_lib.load_config(f"{EXP}:stage=target,shot=10")
    with pytest.raises(config_lib.ConfigError, match="stage='tgt'"):
        config_lib.load_config(f"{EXP}:stage=tgt")
    with pytest.raises(config_lib.ConfigError, match="no such file"):
        config_lib.load_config("experiments/nope.py")


def test_roundtrip_json():
    c = config_lib.load_config(f"{EXP}:stage=target,shots=1,method=linear_probe")
    c2 = config_lib.from_dict(config_lib.to_dict(c))
    assert config_lib.to_dict(c2) == config_lib.to_dict(c) and c2.param_rules == [["backbone/.*", None], [".*", 1.0]]


def test_model_kwargs_are_free():
    c = config_lib.base_config()
    config_lib.apply_overrides(c, ["model.kwargs.width=2"])
    assert c.model.kwargs.width == 2


def test_split_overrides():
    rest, ov = split_overrides(["--config", "f.py", "--config.a.b=1", "--config.c", "x", "--workdir", "w"])
    assert rest == ["--config", "f.py", "--workdir", "w"] and ov == ["a.b=1", "c=x"]
