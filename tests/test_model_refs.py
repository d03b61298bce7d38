"""Your own model: ``config.model.name`` as a registered name or an import reference."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tl_jax import models
from tl_jax.models import check_logits, get_model, model_from_config, register
from tl_jax.train.checkpoint import load_variables
from tl_jax.params.param_rules import flatten_paths

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny.py")

USER_FILE = textwrap.dedent('''
    """A researcher's own linen model, outside the package."""
    import flax.linen as nn


    class Backbone(nn.Module):
        width: int = 4

        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.Conv(self.width, (3, 3), name="conv1")(x))
            x = x.mean(axis=(1, 2))
            return nn.relu(nn.Dense(16, name="fc")(x))


    class MyNet(nn.Module):
        num_classes: int
        width: int = 4

        @nn.compact
        def __call__(self, x, *, train=False):
            return nn.Dense(self.num_classes, name="head")(Backbone(self.width, name="backbone")(x, train))


    def make(num_classes, width=4):
        return MyNet(num_classes=num_classes, width=width)


    def wrong_shape(num_classes):
        return MyNet(num_classes=num_classes + 1)


    def not_a_module(num_classes):
        return [num_classes]


    def raises(num_classes):
        raise RuntimeError("no GPU named cuda:7")


    CONSTANT = 3
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_FILE)
    return path


def test_register_adds_a_name_and_refuses_a_taken_one():
    @register("test_refs_tiny")
    def tiny(num_classes, width=2):
        return models.CNN(num_classes=num_classes, width=width)

    try:
        model = get_model("test_refs_tiny", 3, width=1)
        assert isinstance(model, models.CNN) and model.width == 1 and model.num_classes == 3
        with pytest.raises(ValueError, match="already registered"):
            register("test_refs_tiny")(lambda num_classes: None)
        with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['depth'\].*accepted: \['width'\]"):
            get_model("test_refs_tiny", 3, depth=2)
        with pytest.raises(ValueError, match="without ':'"):
            register("a:b")
    finally:
        models.MODELS.pop("test_refs_tiny")


def test_file_reference_builds_the_model_with_kwargs(user_file):
    model = get_model(f"{user_file}:make", 5, width=2)
    assert type(model).__name__ == "MyNet" and model.width == 2 and model.num_classes == 5
    # the same file gives the same classes every time (one module object per file)
    assert type(get_model(f"{user_file}:make", 5)) is type(model)
    # dropout_rate at its default is not forced on a factory that does not take it; another value is an error
    assert get_model(f"{user_file}:make", 5, dropout_rate=0.0).num_classes == 5
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['dropout_rate'\]"):
        get_model(f"{user_file}:make", 5, dropout_rate=0.5)


def test_module_reference(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    model = model_from_config({"name": "my_models:make", "num_classes": 4, "kwargs": {"width": 3}})
    assert model.width == 3 and model.num_classes == 4


@pytest.mark.parametrize("ref, message", [
    ("{f}:nope", r"has no attribute 'nope'; it defines \[.*'make'"),
    ("{f}:CONSTANT", "is a int, not a factory"),
    ("{d}/missing.py:make", "no such file"),
    ("no_such_pkg_xyz.sub:make", "no module named 'no_such_pkg_xyz'"),
    ("{f}:wrong name", "expected 'package.module:factory'"),
    ("{f}:not_a_module", "returned an object of type list, not a Flax module"),
    ("{f}:raises", "the factory raised RuntimeError: no GPU named cuda:7"),
])
def test_bad_references_are_one_line(user_file, ref, message):
    ref = ref.format(f=user_file, d=user_file.parent)
    with pytest.raises(ValueError, match=message) as err:
        get_model(ref, 10)
    assert "\n" not in str(err.value) and "config.model.name" in str(err.value)


def test_wrong_logits_shape_is_named(user_file):
    sample = {"image": np.zeros((1, 8, 8, 1), np.float32)}
    with pytest.raises(ValueError, match=r"float logits \[B, num_classes\] = \[1, 10\].*got shape \(1, 11\)"):
        check_logits(get_model(f"{user_file}:wrong_shape", 10), jax.random.PRNGKey(0), sample, 10, "x")
    check_logits(get_model(f"{user_file}:make", 10), jax.random.PRNGKey(0), sample, 10, "x")  # passes


def _run(args, cwd, fault=""):
    env = dict(os.environ, TL_JAX_FAULT=fault, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tl_jax.train", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
def test_user_linen_file_trains_frozen_resumes_exactly(user_file, tmp_path, tfds_data_dir):
    """From the CLI, by relative path: frozen backbone bit-identical, SIGKILL resume exact, recorded absolute."""
    common = ["--config", TINY, f"--config.data.data_dir={tfds_data_dir}", "--config.model.name=my_models.py:make",
              "--config.model.kwargs={\"width\": 3}", "--config.train.steps=10", "--config.train.checkpoint_every=3",
              "--config.train.log_every=2", "--config.param_rules=[[\"backbone/.*\", null], [\".*\", 1.0]]"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _run([*common, "--workdir", str(ref)], cwd=user_file.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads((ref / "config.json").read_text())["model"]
    assert recorded["name"] == f"{user_file}:make"  # absolute: eval, resume and sweeps rebuild it from anywhere
    first = flatten_paths(load_variables(str(ref / "checkpoints" / "3"))["params"])
    last = flatten_paths(load_variables(str(ref))["params"])
    assert sorted(first) == ["backbone/conv1/bias", "backbone/conv1/kernel", "backbone/fc/bias", "backbone/fc/kernel",
                             "head/bias", "head/kernel"]
    for path in first:  # frozen params never move; the head does
        same = np.array_equal(first[path], last[path])
        assert same == path.startswith("backbone/"), path

    proc = _run([*common, "--workdir", str(killed)], cwd=user_file.parent, fault="kill_after_step=5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = _run([*common, "--workdir", str(killed)], cwd=user_file.parent)
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-2000:]
    a, b = flatten_paths(load_variables(str(ref))["params"]), flatten_paths(load_variables(str(killed))["params"])
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert (ref / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()


def test_bad_reference_leaves_the_workdir_untouched(user_file, tmp_path, tfds_data_dir):
    from tl_jax import cli

    wd = tmp_path / "wd"
    code = cli.main(["train", "--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",
                     f"--config.model.name={user_file}:wrong_shape"])
    assert code == 2 and not wd.exists()


def test_a_head_on_a_model_without_head_options_names_the_config_key():
    with pytest.raises(ValueError, match=r"config.model.head: model 'cnn_nnx' has no configurable head"):
        model_from_config({"name": "cnn_nnx", "num_classes": 3,
                           "head": {"hidden": [8], "activation": "relu", "dropout": 0.0}})
