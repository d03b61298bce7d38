"""End to end: the CLI writes the workdir contract, resumes exactly, is deterministic."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tl_jax import config as config_lib
from tl_jax.train.loop import train
from conftest import RUN_FILES, workdir_files

TINY = "tests/configs/tiny.py"
pytestmark = pytest.mark.slow


def tiny(data_dir, arg="", **overrides):
    c = config_lib.load_config(f"{TINY}:{arg}" if arg else TINY)
    c.data.data_dir = data_dir
    config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return c


def metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def run_cli(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "tl_jax.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_writes_contract_and_refuses_other_config(tmp_path, tfds_data_dir):
    wd = str(tmp_path / "run")
    args = ["--config", TINY, "--workdir", wd, f"--config.data.data_dir={tfds_data_dir}"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert workdir_files(wd) == RUN_FILES
    summary = json.load(open(os.path.join(wd, "summary.json")))
    for key in ("test/accuracy", "test/loss", "steps", "wall_s"):
        assert key in summary
    assert summary["steps"] == 8 and 0.0 <= summary["test/accuracy"] <= 1.0
    assert json.load(open(os.path.join(wd, "config.json")))["data"]["data_dir"] == tfds_data_dir
    steps = [m["step"] for m in metrics(wd) if "train/loss" in m]
    assert steps == [2, 4, 6, 8]
    assert [m["step"] for m in metrics(wd) if "test/accuracy" in m] == [4, 8]

    before = {f: os.path.getmtime(os.path.join(wd, f)) for f in ("config.json", "metrics.jsonl", "summary.json")}
    proc = run_cli(*args, "--config.seed=3")  # (a larger train.steps would continue the run)
    assert proc.returncode == 2
    assert "holds a run with another config (seed: 0 -> 3)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert before == {f: os.path.getmtime(os.path.join(wd, f)) for f in before}

    proc = run_cli(*args, "--config.trian.steps=9")
    assert proc.returncode == 2 and "unknown config key config.trian.steps" in proc.stderr


def test_resume_equals_uninterrupted_and_same_seed_is_identical(tmp_path, tfds_data_dir):
    full = str(tmp_path / "full")
    again = str(tmp_path / "again")
    s_full = train(tiny(tfds_data_dir), full)
    s_again = train(tiny(tfds_data_dir), again)
    strip = lambda s: {k: v for k, v in s.items() if not k.endswith("_s")}  # noqa: E731
    assert strip(s_full) == strip(s_again)
    assert metrics(full) == metrics(again)

    # Simulate a crash after step 4: drop the step-8 checkpoint and the summary, then rerun.
    shutil.rmtree(os.path.join(again, "checkpoints", "8"))
    os.remove(os.path.join(again, "summary.json"))
    s_resumed = train(tiny(tfds_data_dir), again)
    assert strip(s_resumed) == strip(s_full)
    assert metrics(again) == metrics(full)  # no duplicated or missing steps

    other = str(tmp_path / "other_seed")
    s_other = train(tiny(tfds_data_dir, "seed=1"), other)
    assert metrics(other) != metrics(full)
    assert s_other["steps"] == 8


def test_init_from_with_new_head_and_frozen_backbone(tmp_path, tfds_data_dir):
    src = str(tmp_path / "src")
    train(tiny(tfds_data_dir, "model=resnet18"), src)
    from tl_jax.train.checkpoint import load_variables

    loaded = load_variables(src)
    cfg = tiny(tfds_data_dir, "model=resnet18", init_from=src, param_rules=[["backbone/.*", None], [".*", 1.0]])
    cfg.model.num_classes = 12  # a new head of another size
    ft = str(tmp_path / "ft")
    train(cfg, ft)
    tuned = load_variables(ft)
    import numpy as np
    from tl_jax.params.param_rules import flatten_paths

    for coll in ("params", "batch_stats"):
        a, b = flatten_paths(loaded[coll]), flatten_paths(tuned[coll])
        for path in a:
            if path.startswith("backbone"):
                np.testing.assert_array_equal(a[path], b[path], err_msg=f"{coll}/{path}")
    assert tuned["params"]["head"]["kernel"].shape[-1] == 12


def test_init_from_mismatch_lists_every_problem(tmp_path, tfds_data_dir):
    src = str(tmp_path / "src")
    train(tiny(tfds_data_dir, "steps=2"), src)
    cfg = tiny(tfds_data_dir, "model=resnet18", init_from=src)
    from tl_jax.params.merge import MergeError

    with pytest.raises(MergeError, match=r"problem\(s\)") as err:
        train(cfg, str(tmp_path / "bad"))
    assert "missing in init_from" in str(err.value) and "unused in the model: backbone/conv2/kernel" in str(err.value)
    assert not os.path.exists(tmp_path / "bad")  # nothing written
