"""The loop's metric windows: fetched one step late (the devices never wait), same with or without a prefetch thread."""
import json

import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.train import loop as loop_lib
from tl_jax.train import train_metrics as train_metrics_lib
from tl_jax.train.checkpoint import load_variables
from tl_jax.util.tree_paths import flatten_paths

pytestmark = pytest.mark.slow
TINY = "tests/configs/tiny.py"


def tiny(data_dir, **overrides):
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    for key, value in overrides.items():
        config_lib.set_value(c, key, value)
    return c


def train_records(wd):
    return [r for r in map(json.loads, open(wd / "metrics.jsonl")) if "train/loss" in r]


def test_windows_are_logged_one_step_late_as_the_means_of_their_steps(tmp_path, tfds_data_dir, monkeypatch):
    seen = []
    original = train_metrics_lib.log_window

    def spy(pending, wd, is_main, nan_policy, state, **kw):
        seen.append(([(s, float(m["train/loss"])) for s, m in jax.device_get(pending)], int(state.step)))
        return original(pending, wd, is_main, nan_policy, state, **kw)

    monkeypatch.setattr(train_metrics_lib, "log_window", spy)
    c = tiny(tfds_data_dir, **{"train.steps": 8, "train.log_every": 3, "train.eval_every": 0,
                               "train.checkpoint_every": 100, "data.prefetch": 0})
    loop_lib.train(c, str(tmp_path / "run"))
    assert [[s for s, _ in window] for window, _ in seen] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    # Windows that end before the last step are fetched once the next step is queued behind them.
    assert [state_step for _, state_step in seen] == [4, 7, 8]
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6, 8]
    for record, (window, _) in zip(records, seen):
        assert record["train/loss"] == pytest.approx(np.mean([loss for _, loss in window]), rel=1e-12)


def test_prefetch_thread_or_not_same_run(tmp_path, tfds_data_dir):
    pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14},
          {"op": "random_crop", "size": 14, "pad": 1}, {"op": "flip_lr"}]
    for prefetch in (0, 2):
        c = tiny(tfds_data_dir, **{"data.train_pp": pp, "data.prefetch": prefetch, "train.steps": 6})
        loop_lib.train(c, str(tmp_path / f"p{prefetch}"))
    assert train_records(tmp_path / "p0") == train_records(tmp_path / "p2")
    a, b = (flatten_paths(load_variables(str(tmp_path / f"p{p}"))["params"]) for p in (0, 2))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_grad_norm_program_separate_runs_the_norm_step_on_logged_steps_only(tmp_path, tfds_data_dir, monkeypatch,
                                                                          mode):
    """``train.grad_norm_program='separate'``: two programs, the norm one on steps 3, 6 and the last (7); the
    same metrics and params as ``'cond'`` (one program with a ``lax.cond``)."""
    from tl_jax.parallel import strategy as strategy_lib
    from tl_jax.parallel.pmap import PmapStrategy

    ran: dict[str, list] = {}
    cls = strategy_lib.JitStrategy if mode == "jit" else PmapStrategy
    compile_ = cls.compile

    def spy(self, fn, state, batch):
        compiled, calls = compile_(self, fn, state, batch), []
        ran[f"program{len(ran)}"] = calls

        def step(state, batch):
            calls.append(int(jax.device_get(state.step).max()) + 1)  # the step this call ends at
            return compiled(state, batch)

        return step

    monkeypatch.setattr(cls, "compile", spy)
    for program in ("separate", "cond"):
        ran.clear()
        c = tiny(tfds_data_dir, **{"train.steps": 7, "train.log_every": 3, "train.grad_norm_program": program,
                                   "parallel.mode": mode})
        loop_lib.train(c, str(tmp_path / program))
        if program == "separate":  # built (False, True): the plain step, then the one with ‖g‖
            assert ran == {"program0": [1, 2, 4, 5], "program1": [3, 6, 7]}
        else:
            assert ran == {"program0": list(range(1, 8))}
    a, b = (train_records(tmp_path / p) for p in ("separate", "cond"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 7]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys() and "train/grad_norm" in ra
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    pa, pb = (flatten_paths(load_variables(str(tmp_path / p))["params"]) for p in ("separate", "cond"))
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_grad_norm_program_is_validated(tmp_path, tfds_data_dir):
    c = tiny(tfds_data_dir, **{"train.grad_norm_program": "sometimes"})
    with pytest.raises(config_lib.ConfigError, match="config.train.grad_norm_program must be one of"):
        loop_lib.train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
