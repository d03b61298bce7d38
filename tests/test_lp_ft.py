"""LP-FT in one run (config.recipe.name='lp_ft'): the probe phase, the fine-tune from it, exact resume."""
from __future__ import annotations

import json
import pathlib
import signal

import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.train.lp_ft import probe_config
from tl_jax.params.param_rules import flatten_paths

from test_reliability import assert_same_run, run_cli

TINY = "tests/configs/tiny.py"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tfds_data_dir):
    """A tiny pretrained run (8 steps) to probe and fine-tune from."""
    wd = tmp_path_factory.mktemp("lpft") / "source"
    c = config_lib.load_config(TINY)
    c.data.data_dir = tfds_data_dir
    train(c, str(wd))
    return wd


def lp_ft_config(source, data_dir, **over):
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    c.init_from = str(source)
    c.recipe.name = "lp_ft"
    c.recipe.lp_steps = 6
    c.recipe.lp_learning_rate = 0.01
    c.train.steps = 10
    for k, v in over.items():
        config_lib.set_value(c, k, v)
    return c


def params(workdir) -> dict:
    return flatten_paths(load_variables(str(workdir))["params"])


def test_probe_trains_the_head_only_then_the_finetune_starts_from_it(tmp_path, source, tfds_data_dir):
    c = lp_ft_config(source, tfds_data_dir)
    summary = train(c, str(tmp_path / "run"))
    probe_wd = tmp_path / "run" / "lp"
    probe = json.loads((probe_wd / "summary.json").read_text())
    assert probe["steps"] == 6 and summary["steps"] == 10
    assert summary["lp/test/accuracy"] == probe["test/accuracy"]  # the probe's metrics in the run's summary
    # the probe's recorded config: head trained, the rest frozen, its own lr and steps
    recorded = json.loads((probe_wd / "config.json").read_text())
    assert recorded["param_rules"] == [["head/.*", 1.0], [".*", None]]
    assert recorded["recipe"]["name"] == "" and recorded["optimizer"]["learning_rate"] == 0.01
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]["name"] == "lp_ft"
    # the probe left the pretrained backbone bit-identical and moved the (fresh) head
    src, lp, ft = params(source), params(probe_wd), params(tmp_path / "run")
    for k in src:
        if k.startswith("backbone/"):
            np.testing.assert_array_equal(lp[k], src[k], err_msg=k)
            assert not np.array_equal(ft[k], src[k]), k  # the fine-tune trains the backbone
    # the fine-tune's initial state is exactly the probe's final params (head included)
    sample = {"image": np.zeros((1, 14, 14, 1), np.float32), "label": np.zeros((1,), np.int32)}
    _, _, state = build_model_and_state(c, 10, sample, mesh_lib.make_mesh(1), start_from=load_variables(str(probe_wd)))
    start = flatten_paths(state.params)
    assert start.keys() == lp.keys()
    for k in lp:
        np.testing.assert_array_equal(np.asarray(start[k]), lp[k], err_msg=k)
    # a finished LP-FT run is a no-op: nothing rewritten
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.json*")}
    assert train(c, str(tmp_path / "run")) == summary
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.json*")} == before


def test_the_fresh_head_of_a_plain_finetune_differs_from_the_probes(tmp_path, source, tfds_data_dir):
    """Without the recipe the fine-tune starts at the fresh head: the probe really changes the start."""
    c = lp_ft_config(source, tfds_data_dir)
    sample = {"image": np.zeros((1, 14, 14, 1), np.float32), "label": np.zeros((1,), np.int32)}
    train(probe_config(c), str(tmp_path / "lp"))
    _, _, plain = build_model_and_state(c, 10, sample, mesh_lib.make_mesh(1))
    lp = params(tmp_path / "lp")
    assert not np.array_equal(np.asarray(flatten_paths(plain.params)["head/kernel"]), lp["head/kernel"])


@pytest.mark.slow
def test_sigkill_in_either_phase_resumes_exactly(tmp_path, source, tfds_data_dir):
    """Killed in the probe (step 3), then in the fine-tune (step 8): the same run as an uninterrupted one."""
    args = lambda wd: ["--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",  # noqa
                       f"--config.init_from={source}", "--config.recipe.name=lp_ft", "--config.recipe.lp_steps=6",
                       "--config.train.steps=10", "--config.train.checkpoint_every=3"]
    ref, wd = tmp_path / "ref", tmp_path / "killed"
    assert run_cli(args(ref)).returncode == 0
    proc = run_cli(args(wd), fault="kill_after_step=3")
    assert proc.returncode == -signal.SIGKILL and not (wd / "lp" / "summary.json").exists()
    proc = run_cli(args(wd), fault="kill_after_step=8")  # the probe resumes and ends at 6; the fine-tune dies
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (wd / "lp" / "summary.json").exists() and not (wd / "summary.json").exists()
    proc = run_cli(args(wd))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    assert_same_run(ref / "lp", wd / "lp")
    assert_same_run(ref, wd)


@pytest.mark.parametrize("key, value, needle", [
    ("recipe.name", "lp", "config.recipe.name must be one of"),
    ("recipe.lp_steps", 0, "config.recipe.lp_steps must be an int >= 1"),
    ("recipe.lp_learning_rate", -1.0, "config.recipe.lp_learning_rate must be > 0"),
    ("recipe.lp_trainable", ["head/("], "config.recipe.lp_trainable: invalid regex"),
    ("init_from", "", "set config.init_from"),
])
def test_bad_recipe_is_one_line_naming_the_key(tmp_path, source, tfds_data_dir, key, value, needle):
    c = lp_ft_config(source, tfds_data_dir, **{key: value})
    with pytest.raises(config_lib.ConfigError) as e:
        train(c, str(tmp_path / "run"))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_probe_rules_that_match_nothing_are_refused(tmp_path, source, tfds_data_dir):
    c = lp_ft_config(source, tfds_data_dir, **{"recipe.lp_trainable": ["classifier/.*"]})
    with pytest.raises(ValueError, match="classifier"):
        train(c, str(tmp_path / "run"))
    assert not pathlib.Path(tmp_path / "run" / "summary.json").exists()
