"""Sweeps: expansion, planning, skip/resume, vmap == sequential, the auto choice, --jobs."""
import json
import logging
import os
import shutil

import pytest

from tl_jax import config as config_lib
from tl_jax.sweep import point_name, product, seeds, spec, zip_
from tl_jax.sweep.plan import plan_groups
from tl_jax.sweep.runner import SweepError, load_points, run_sweep

SWEEP = "tests/configs/tiny_sweep.py"
TINY = "tests/configs/tiny.py"


# -- expansion and names (no training) ---------------------------------------------------------------
def test_product_zip_seeds_and_names():
    grid = product({"stage": "target"}, method=["scratch", "finetune"], shots=[1, 10])
    assert grid == [{"stage": "target", "method": m, "shots": k} for m in ("scratch", "finetune") for k in (1, 10)]
    pairs = zip_(**{"config.optimizer.learning_rate": [1e-3, 3e-4]}, lam=[0.1, 1.0])
    assert pairs == [{"config.optimizer.learning_rate": 1e-3, "lam": 0.1},
                     {"config.optimizer.learning_rate": 3e-4, "lam": 1.0}]
    full = product(pairs, seeds(3))
    assert len(full) == 6 and [p["seed"] for p in full] == [0, 1, 2, 0, 1, 2]  # the last factor varies fastest
    assert seeds(2, key="data.shots_seed", start=5) == [{"data.shots_seed": 5}, {"data.shots_seed": 6}]
    assert point_name({"stage": "target", "method": "finetune", "shots": 10, "seed": 0}) == "finetune_shots10_seed0"
    assert point_name(full[1]) == "learning_rate0.001_lam0.1_seed1"
    assert point_name({"config.objective.multitask.weights": [1, 0.5], "_name": "x"}) == "x"
    assert point_name({"config.objective.multitask.weights": [1, 0.5]}) == "weights1-0.5"
    point = {"stage": "target", "config.loss.l2": 0.1, "_phase": 1}
    assert spec.config_arg(point) == "stage=target" and spec.overrides(point) == ["loss.l2=0.1"]
    assert spec.substitute({"source": "{workdir}/src", "n": 1}, "/r") == {"source": "/r/src", "n": 1}


def test_spec_errors_are_one_line_and_name_the_key():
    with pytest.raises(config_lib.ConfigError, match="different lengths: lr=2, seed=3"):
        zip_(lr=[1, 2], seed=[0, 1, 2])
    with pytest.raises(config_lib.ConfigError, match="axis 'lr' needs a list"):
        product(lr=0.1)
    with pytest.raises(config_lib.ConfigError, match="key 'a' is set by two factors"):
        product({"a": 1}, a=[2])
    with pytest.raises(config_lib.ConfigError, match="same name 'seed0'"):
        spec.check_points([{"seed": 0}, {"seed": 0}], "get_sweep")
    with pytest.raises(config_lib.ConfigError, match="unknown reserved key '_nme'"):
        spec.check_points([{"_nme": "x"}], "get_sweep")
    with pytest.raises(SweepError, match="defines no get_sweep"):
        load_points(TINY)


def _config(*overrides):
    return config_lib.apply_overrides(config_lib.load_config(TINY), list(overrides))


def test_plan_groups_vectorises_traced_numbers_and_says_why_not():
    base = ["loss.l2=1e-4", 'param_rules=[["backbone/.*", 0.5], [".*", 1.0]]']
    traced = [_config(*base), _config(*base, "optimizer.learning_rate=3e-3", "seed=1"),
              _config(*base, "loss.l2=1e-3", "data.shots_seed=3"),
              _config(*base, 'param_rules=[["backbone/.*", 0.1], [".*", 1.0]]')]
    groups, why = plan_groups(traced)
    assert groups == [[0, 1, 2, 3]] and why == ""
    groups, why = plan_groups([_config("loss.l2=1e-3"), _config("loss.l2=1e-4"), _config()])
    assert groups == [[0, 1], [2]] and "config.loss.l2 (its on/off)" in why
    groups, why = plan_groups([_config(), _config("model.name=resnet18"),
                               _config('param_rules=[["backbone/.*", null], [".*", 1.0]]')])
    assert groups == [[0], [1], [2]]
    assert "config.model.name" in why and "config.param_rules (its structure)" in why and "shapes or code" in why


# -- runs (a few steps of the tiny CNN) ----------------------------------------------------------------
def _metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def _close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=atol), k


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tfds_data_dir):
    """The same 2-point sweep (lr, L2, lr multiplier and seed differ) run vectorised and sequentially."""
    root = tmp_path_factory.mktemp("sweep")
    ov = [f"data.data_dir={tfds_data_dir}", "train.checkpoint_every=2"]
    records = {mode: run_sweep(SWEEP, str(root / mode), vectorize=mode, overrides=ov) for mode in ("on", "off")}
    return root, ov, records


@pytest.mark.slow
def test_vectorized_equals_sequential(swept):
    root, _, records = swept
    assert [g["mode"] for g in records["on"]["groups"]] == ["vectorized"] and records["off"]["groups"] == []
    for name in ("p0", "p1"):
        vec, seq = root / "on" / name, root / "off" / name
        assert {"config.json", "metrics.jsonl", "summary.json", "point.json", "checkpoints"} <= set(os.listdir(vec))
        assert json.loads((vec / "config.json").read_text()) == json.loads((seq / "config.json").read_text())
        mv, ms = _metrics(vec), _metrics(seq)
        assert [m["step"] for m in mv] == [m["step"] for m in ms] == [2, 4, 4]
        for a, b in zip(mv, ms):
            _close(a, b)
        sv, ss = (json.loads((d / "summary.json").read_text()) for d in (vec, seq))
        assert sv["vectorized_points"] == 2 and "vectorized_points" not in ss
        for s in (sv, ss):  # compile time (train + eval steps) is reported apart from train time
            assert s["compile_s"] > 0 and s["train_s"] > 0 and s["compile_s"] + s["train_s"] <= s["wall_s"]
        _close({k: v for k, v in sv.items() if not k.endswith("_s") and k != "vectorized_points"},
               {k: v for k, v in ss.items() if not k.endswith("_s")})
    assert json.loads((root / "on" / "p1" / "point.json").read_text())["config.optimizer.learning_rate"] == 3e-3


@pytest.mark.slow
def test_skip_finished_and_resume_unfinished(swept, caplog):
    root, ov, _ = swept
    seq = root / "off"
    mtimes = {p: (seq / p / "summary.json").stat().st_mtime for p in ("p0", "p1")}
    record = run_sweep(SWEEP, str(seq), vectorize="off", overrides=ov)
    assert {p: r["status"] for p, r in record["points"].items()} == {"p0": "skipped (finished)",
                                                                     "p1": "skipped (finished)"}
    assert mtimes == {p: (seq / p / "summary.json").stat().st_mtime for p in mtimes}

    # p0 "crashed" after step 2: resumes from checkpoint 2 and logs the same events.
    before, summary = _metrics(seq / "p0"), json.loads((seq / "p0" / "summary.json").read_text())
    shutil.rmtree(seq / "p0" / "checkpoints" / "4")
    os.remove(seq / "p0" / "summary.json")
    # p1 of the vectorised sweep lost its summary: a sequential run restores its (vectorised) checkpoint.
    vec_summary = json.loads((root / "on" / "p1" / "summary.json").read_text())
    os.remove(root / "on" / "p1" / "summary.json")
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        record = run_sweep(SWEEP, str(seq), vectorize="off", overrides=ov)
        run_sweep(SWEEP, str(root / "on"), vectorize="off", overrides=ov)
    assert record["points"]["p0"]["status"] == "sequential"
    assert any("resumed from" in m and "p0" in m and m.endswith("at step 2") for m in caplog.messages)
    assert _metrics(seq / "p0") == before
    strip = lambda s: {k: v for k, v in s.items() if not k.endswith("_s")}  # noqa: E731
    assert strip(json.loads((seq / "p0" / "summary.json").read_text())) == strip(summary)
    resumed = json.loads((root / "on" / "p1" / "summary.json").read_text())
    assert resumed["test/accuracy"] == vec_summary["test/accuracy"]
    assert resumed["test/loss"] == pytest.approx(vec_summary["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_auto_times_both_ways_and_logs_its_choice(tmp_path, tfds_data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        record = run_sweep(f"{SWEEP}:steps=2", str(tmp_path), overrides=[f"data.data_dir={tfds_data_dir}"])
    (group,) = record["groups"]
    assert group["mode"] in ("vectorized", "sequential")
    assert group["estimate_vectorized_s"] > 0 and group["estimate_sequential_s"] > 0
    assert any(m.startswith("sweep: vectorize=auto: 2 points x 2 steps") and f"chose {group['mode']}" in m
               for m in caplog.messages)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["groups"][0]["mode"] == group["mode"]
    assert all((tmp_path / p / "summary.json").exists() for p in ("p0", "p1"))


@pytest.mark.slow
def test_cli_jobs_runs_points_in_processes(tmp_path, tfds_data_dir):
    from tl_jax.cli import main

    rc = main(["sweep", "--config", f"{SWEEP}:steps=2", "--workdir", str(tmp_path), "--jobs", "2",
               "--vectorize", "off", f"--config.data.data_dir={tfds_data_dir}"])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "logs")) == ["p0.log", "p1.log"]
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["status"] for r in record["points"].values()} == {"process"}
    assert (tmp_path / "results.md").exists()  # the report written at the end
