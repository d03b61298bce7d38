"""Validation set (config.data.val_fraction / val_split), model selection on val/*, early stopping, exact resume."""
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from tl_jax import cli
from tl_jax import config as config_lib
from tl_jax.data import load_split
from tl_jax.data.validation import carve_validation, train_and_val_indices
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import loop as loop_lib
from tl_jax.train import setup as setup_lib
from tl_jax.train.checkpoint import load_variables
from tl_jax.params.param_rules import flatten_paths

TINY = "tests/configs/tiny.py"
# min_delta 0.5: val/accuracy almost surely never improves by that much after the first eval, so the run stops
# at its third eval; the assertions below compare with the replay of the logged values whatever they are.
ES = ["train.early_stopping.metric=val/accuracy", "train.early_stopping.patience=2",
      "train.early_stopping.min_delta=0.5"]


def tiny(data_dir, *overrides):
    c = config_lib.load_config(TINY)
    config_lib.apply_overrides(c, [f"data.data_dir={data_dir}", *overrides])
    return c


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def kept_steps(workdir) -> set[int]:
    return {int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()}


# -- the carved split -------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(5), [40, 13, 7, 2, 25])[np.random.default_rng(1).permutation(87)]


def test_carved_split_is_stratified_seeded_and_disjoint():
    train, val = carve_validation(LABELS, 0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(LABELS.size))
    for c, n in zip(*np.unique(LABELS, return_counts=True)):
        assert np.sum(LABELS[val] == c) == max(1, round(0.2 * n)), c  # 8, 3 (2.6), 1 (1.4), 1 (0.4 -> 1), 5
    again, other = carve_validation(LABELS, 0.2, seed=3), carve_validation(LABELS, 0.2, seed=4)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(other[1], val)


def test_shots_are_drawn_from_the_examples_left_and_val_does_not_depend_on_them():
    big = np.concatenate([LABELS, np.full(8, 3)])  # class 3: 10 examples, 3 to validation
    _, big_val = carve_validation(big, 0.3, seed=0)
    for shots in (1, 4):
        idx, val_s = train_and_val_indices(big, val_fraction=0.3, val_seed=0, shots=shots, shots_seed=5)
        np.testing.assert_array_equal(val_s, big_val)
        assert np.intersect1d(idx, big_val).size == 0 and np.unique(idx).size == idx.size
        np.testing.assert_array_equal(np.bincount(big[idx], minlength=5), [shots] * 5)
    # Class 3 of LABELS has 2 examples, 1 to validation: 2 shots must come from the 1 left.
    with pytest.raises(ValueError, match="shots=2 but class 3 has only 1 examples in d:train without its "
                                         "validation examples"):
        train_and_val_indices(LABELS, val_fraction=0.3, val_seed=0, shots=2, shots_seed=5, name="d:train")
    idx, none = train_and_val_indices(LABELS, val_fraction=None, val_seed=0, shots=None, shots_seed=0)
    assert idx is None and none is None  # no validation, no shots: the old behaviour (all examples)


def test_a_class_left_without_training_examples_is_named():
    with pytest.raises(ValueError, match=r"config.data.val_fraction=0.2 leaves class 3 of d:train with no training "
                                         r"example \(1 example\(s\), 1 to validation\)"):
        carve_validation(np.array([0, 0, 0, 3, 0]), 0.2, 0, name="d:train")
    with pytest.raises(ValueError, match="leaves class 1"):
        carve_validation(np.array([0] * 10 + [1] * 3), 0.9, 0)  # round(2.7) = 3 of 3


def test_same_validation_subset_whatever_the_batch_size_and_shots(tmp_path, tfds_data_dir, monkeypatch):
    seen = []
    real = setup_lib.train_dataset

    def recording(split, pp, **kw):
        seen.append(kw["indices"])
        return real(split, pp, **kw)

    monkeypatch.setattr(setup_lib, "train_dataset", recording)
    vals = []
    for i, extra in enumerate([["data.batch_size=16"], ["data.batch_size=32", "data.shots=7"]]):
        c = tiny(tfds_data_dir, "data.val_fraction=0.05", "train.feature_cache=false", *extra)
        run = loop_lib.prepare_run(c, str(tmp_path / str(i)))
        run.ckpts.close()
        if getattr(run, "lock", None) is not None:
            run.lock.release()
        vals.append(np.asarray(run.val_split.source._indices))  # noqa: SLF001 (the subset's split indices)
    labels = load_split("mnist5k", "train", tfds_data_dir).labels()
    np.testing.assert_array_equal(vals[0], vals[1])
    np.testing.assert_array_equal(vals[0], carve_validation(labels, 0.05, 0)[1])
    all_rest, shots = seen
    assert all_rest.size + vals[0].size == labels.size and np.intersect1d(all_rest, vals[0]).size == 0
    assert np.intersect1d(shots, vals[0]).size == 0
    np.testing.assert_array_equal(np.bincount(labels[shots], minlength=10), [7] * 10)


# -- the rules, against independent numpy replays ----------------------------------------------------------------

def numpy_stop_index(values: np.ndarray, patience: int, mode: str) -> int | None:
    """min_delta = 0: eval i improves iff it beats every earlier one; stop at the first i whose distance to the
    latest improvement reaches patience."""
    v = values if mode == "max" else -values
    prev_best = np.concatenate([[-np.inf], np.maximum.accumulate(v)[:-1]])
    improved = v > prev_best
    last = np.maximum.accumulate(np.where(improved, np.arange(v.size), 0))
    hit = np.flatnonzero(np.arange(v.size) - last >= patience)
    return int(hit[0]) if hit.size else None


def delta_stop_index(values, patience: int, min_delta: float, mode: str) -> int | None:
    best, wait = None, 0
    for i, x in enumerate(values):
        x = x if mode == "max" else -x
        if best is None or x - best > min_delta:
            best, wait = x, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return None


@pytest.mark.parametrize("mode", ["max", "min"])
def test_early_stopping_rule_matches_numpy_replays(mode):
    rng = np.random.default_rng(0)
    for trial in range(200):
        values = np.round(rng.normal(size=rng.integers(1, 15)).cumsum() * 0.1, 2)  # ties happen (rounded)
        patience, min_delta = int(rng.integers(1, 4)), float(rng.choice([0.0, 0.05]))
        recs = [{"step": 10 * (i + 1), "val/m": float(x)} for i, x in enumerate(values)]
        got = es_lib.replay(recs, "val/m", patience=patience, min_delta=min_delta, mode=mode).stopped_at
        want = (numpy_stop_index(values, patience, mode) if min_delta == 0 else
                delta_stop_index(values, patience, min_delta, mode))
        assert got == (None if want is None else 10 * (want + 1)), (trial, values, patience, min_delta)


def test_best_eval_ties_go_to_the_latest_step_like_orbax_bestn():
    recs = [{"step": 2, "val/a": 0.5}, {"step": 4, "val/a": 0.7}, {"step": 4, "train/loss": 1.0},
            {"step": 6, "val/a": 0.7}, {"step": 8, "val/a": 0.2}]
    assert es_lib.best_eval(recs, "val/a", "max") == (6, 0.7)
    assert es_lib.best_eval(recs, "val/a", "min") == (8, 0.2)
    assert es_lib.resolve_best_metric("auto", True) == "val/accuracy"
    assert es_lib.resolve_best_metric("auto", False) is None and es_lib.resolve_best_metric("", True) is None


# -- end to end ---------------------------------------------------------------------------------------------------

def test_val_at_eval_steps_test_at_the_end_and_best_val_checkpoint_kept(tmp_path, tfds_data_dir):
    wd = tmp_path / "run"
    c = tiny(tfds_data_dir, "data.val_fraction=0.05", "train.steps=12", "train.eval_every=2",
             "train.checkpoint_every=5", "train.keep_checkpoints=1")
    summary = loop_lib.train(c, str(wd))
    logged = records(wd)
    assert [r["step"] for r in logged if "val/accuracy" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in logged if "test/accuracy" in r] == [12]
    assert {"val/accuracy", "val/loss", "test/accuracy", "test/loss"} <= summary.keys()
    vals = np.array([r["val/accuracy"] for r in logged if "val/accuracy" in r])
    best = 2 * (vals.size - int(np.argmax(vals[::-1])))  # the latest step of the highest value (orbax's BestN)
    assert (summary["best_step"], summary["best/val/accuracy"]) == (best, vals.max())
    assert kept_steps(wd) == {best, 12}  # newest 1 + best by val/accuracy; every eval step was a checkpoint
    assert "stopped_early" not in summary and summary["steps"] == 12
    n_val = sum(max(1, round(0.05 * n)) for n in np.bincount(load_split("mnist5k", "train", tfds_data_dir).labels()))
    assert n_val == 200  # 5 % of every class of mnist5k's 4000 train examples


def test_early_stopping_stops_where_the_replay_of_the_logged_val_metrics_says(tmp_path, tfds_data_dir, caplog):
    wd = tmp_path / "run"
    c = tiny(tfds_data_dir, "data.val_fraction=0.05", "train.steps=40", "train.eval_every=2",
             "train.log_every=3", "train.best_metric=", *ES)
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        summary = loop_lib.train(c, str(wd))
    logged = records(wd)
    vals = np.array([r["val/accuracy"] for r in logged if "val/accuracy" in r])
    stop = delta_stop_index(vals, 2, 0.5, "max")
    assert stop is not None and summary["stopped_early"] == summary["steps"] == 2 * (stop + 1) < 40
    s = summary["steps"]
    assert max(r["step"] for r in logged) == s
    assert [r["step"] for r in logged if "test/accuracy" in r] == [s]  # the final eval: val and test at s
    assert logged[-1].keys() >= {"val/accuracy", "test/accuracy"} and summary["test/accuracy"] == logged[-1][
        "test/accuracy"]
    assert any(r["step"] == s and "train/loss" in r for r in logged)  # the partial train window is logged
    assert max(kept_steps(wd)) == s
    lines = [r.getMessage() for r in caplog.records if "early stopping at step" in r.getMessage()]
    assert len(lines) == 1 and f"early stopping at step {s}/40" in lines[0]


def run_cli(workdir, data_dir, fault=""):
    extra = [f"--config.{o}" for o in ["data.val_fraction=0.05", "train.steps=40", "train.eval_every=2",
                                       "train.log_every=3", "train.checkpoint_every=3", "train.keep_checkpoints=2",
                                       *ES]]
    args = ["--config", TINY, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]
    return subprocess.run([sys.executable, "-m", "tl_jax.train", *args], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, TL_JAX_FAULT=fault))


@pytest.mark.slow
def test_sigkill_resume_of_an_early_stopping_run_is_exact(tmp_path, tfds_data_dir):
    ref, wd = tmp_path / "ref", tmp_path / "killed"
    assert run_cli(ref, tfds_data_dir).returncode == 0
    stop = json.loads((ref / "summary.json").read_text())["stopped_early"]
    assert stop >= 6
    # Killed while saving an eval step, then after an eval whose "evals since best" must come back from
    # metrics.jsonl: the resumed run must stop at the same step.
    for fault in (f"kill_during_save={stop - 2}", f"kill_after_step={stop - 1}"):
        proc = run_cli(wd, tfds_data_dir, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    proc = run_cli(wd, tfds_data_dir)
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-2000:]
    pa, pb = (flatten_paths(load_variables(str(w))["params"]) for w in (ref, wd))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert (ref / "metrics.jsonl").read_text() == (wd / "metrics.jsonl").read_text()
    sa, sb = (json.loads((w / "summary.json").read_text()) for w in (ref, wd))
    assert {k: v for k, v in sa.items() if not k.endswith("_s")} == {k: v for k, v in sb.items()
                                                                      if not k.endswith("_s")}


# -- bad input ----------------------------------------------------------------------------------------------------

BAD = [
    (["data.val_fraction=1.5"], "config.data.val_fraction must be in (0, 1)"),
    (["data.val_fraction=0"], "config.data.val_fraction must be in (0, 1)"),
    (["data.val_fraction=0.999"], "config.data.val_fraction=0.999 leaves class 0 of mnist5k:train with no training"),
    (["data.val_fraction=0.1", "data.val_split=test"],
     "config.data.val_fraction (0.1) and config.data.val_split ('test') are mutually exclusive"),
    (["data.val_fraction=0.1", "train.early_stopping.metric=val/acc"],
     "config.train.early_stopping.metric='val/acc' is never logged; this run's eval metrics are "
     "['val/accuracy', 'val/loss']"),
    (["data.val_fraction=0.1", "train.best_metric=val/top5"], "config.train.best_metric='val/top5' is never logged"),
    (["train.early_stopping.metric=val/accuracy"],
     "config.train.early_stopping.metric='val/accuracy' needs a validation set"),
    (["data.val_fraction=0.1", "train.early_stopping.metric=test/accuracy"],
     "config.train.early_stopping.metric='test/accuracy' must be a val/* metric"),
    (["data.val_fraction=0.1", "train.early_stopping.metric=val/accuracy", "train.eval_every=0"],
     "config.train.early_stopping.metric='val/accuracy' needs periodic evals: set config.train.eval_every > 0"),
    (["data.val_split=test", "train.best_metric=test/accuracy"],
     "config.train.best_metric='test/accuracy' selects checkpoints on the test set while a validation set exists"),
    (["train.best_metric=val/accuracy"], "config.train.best_metric='val/accuracy' needs a validation set"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_one_line_and_workdir_untouched(tmp_path, tfds_data_dir, capsys, overrides, message):
    wd = tmp_path / "run"
    args = ["--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",
            *[f"--config.{o}" for o in overrides]]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message in lines[0], err[-1500:]
    assert not wd.exists()
