"""Guarantees: exact resume after SIGKILL, graceful SIGTERM, damaged checkpoints, NaNs, bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import cli
from tl_jax import config as config_lib
from tl_jax.objectives import Objective, register
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.train.train_metrics import NonFiniteError
from tl_jax.params.param_rules import flatten_paths

TINY = "tests/configs/tiny.py"


def cli_args(workdir, data_dir, *extra):
    return ["--config", TINY, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.train.keep_checkpoints=2", *extra]


def run_cli(args, fault="", timeout=240):
    env = dict(os.environ, TL_JAX_FAULT=fault)
    return subprocess.run([sys.executable, "-m", "tl_jax.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def final_params(workdir):
    return flatten_paths(load_variables(str(workdir))["params"])


def metrics(workdir):
    return (pathlib.Path(workdir) / "metrics.jsonl").read_text()


def assert_same_run(a, b):
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bit-identical
    assert metrics(a) == metrics(b)  # same values, no duplicated or missing steps
    sa, sb = (json.loads((pathlib.Path(w) / "summary.json").read_text()) for w in (a, b))
    assert {k: v for k, v in sa.items() if not k.endswith("_s")} == \
        {k: v for k, v in sb.items() if not k.endswith("_s")}


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_async, device_cache", [("true", "false"), ("false", "false"),
                                                             ("false", "true")])
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path, tfds_data_dir, checkpoint_async, device_cache):
    # log windows (3) deliberately misaligned with checkpoints (2): pending metrics travel in the checkpoint.
    # Asynchronous saves: 'kill_during_save' lands while orbax's threads are still writing step 6.
    # device_cache: the batches are made in the step from the rows on the device (same iterator state).
    extra = ("--config.train.steps=12", "--config.train.log_every=3", "--config.train.checkpoint_every=2",
             "--config.train.eval_every=5", f"--config.train.checkpoint_async={checkpoint_async}",
             f"--config.data.device_cache={device_cache}")
    ref, wd = tmp_path / "ref", tmp_path / "killed"
    assert run_cli(cli_args(ref, tfds_data_dir, *extra)).returncode == 0
    rng = np.random.default_rng(0)
    kill_points = [f"kill_after_step={rng.integers(1, 4)}", "kill_during_save=6",
                   f"kill_after_step={rng.integers(7, 12)}"]
    for fault in kill_points:
        proc = run_cli(cli_args(wd, tfds_data_dir, *extra), fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
        assert not (wd / "summary.json").exists()
    proc = run_cli(cli_args(wd, tfds_data_dir, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    assert_same_run(ref, wd)


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes_exactly(tmp_path, tfds_data_dir):
    extra = ("--config.train.steps=400", "--config.train.log_every=7", "--config.train.checkpoint_every=1000",
             "--config.train.eval_every=0")
    ref, wd = tmp_path / "ref", tmp_path / "term"
    env = dict(os.environ, TL_JAX_FAULT="")
    proc = subprocess.Popen([sys.executable, "-m", "tl_jax.train", *cli_args(wd, tfds_data_dir, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (wd / "metrics.jsonl").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    steps = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) < 400
    assert run_cli(cli_args(wd, tfds_data_dir, *extra)).returncode == 0
    assert run_cli(cli_args(ref, tfds_data_dir, *extra)).returncode == 0
    assert_same_run(ref, wd)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_and_is_named(tmp_path, tfds_data_dir):
    c = config_lib.load_config(TINY)
    c.data.data_dir = tfds_data_dir
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "damaged")
    train(c, ref)
    train(c, wd)
    # Damage step 8: truncate every array file of its state item.
    damaged = 0
    for f in (pathlib.Path(wd) / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "_METADATA" not in f.name:
            f.write_bytes(b"garbage")
            damaged += 1
    assert damaged
    os.remove(os.path.join(wd, "summary.json"))
    with pytest.warns(UserWarning, match=r"checkpoints/8 is damaged .* trying an older one"):
        train(c, wd)
    assert any(p.name.startswith("damaged-8-") for p in (pathlib.Path(wd) / "checkpoints").iterdir())
    assert_same_run(ref, wd)


@register
class _NanAtStep3(Objective):
    """Test-only objective: the loss is NaN at step 3."""

    name = "test_nan_at_step3"

    def loss(self, params, batch_stats, aux, batch, rng, step):
        loss, aux_out = super().loss(params, batch_stats, aux, batch, rng, step)
        return loss * jnp.where(step == 3, jnp.nan, 1.0), aux_out


def nan_config(data_dir, policy):
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    c.objective.name = "test_nan_at_step3"
    c.train.nan_policy = policy
    return c


def test_nan_error_policy_names_the_step_and_param(tmp_path, tfds_data_dir):
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 4 .*first non-finite param: "
                                             r"backbone/\w+/\w+"):
        train(nan_config(tfds_data_dir, "error"), str(tmp_path / "err"))


def test_nan_skip_policy_counts_and_continues(tmp_path, tfds_data_dir):
    summary = train(nan_config(tfds_data_dir, "skip"), str(tmp_path / "skip"))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    assert np.isfinite(summary["test/loss"])
    logged = [json.loads(line) for line in metrics(tmp_path / "skip").splitlines()]
    assert [r["train/skipped_steps"] for r in logged if "train/skipped_steps" in r] == [0, 1, 1, 1]
    for leaf in final_params(tmp_path / "skip").values():
        assert np.all(np.isfinite(leaf))


BAD_INPUTS = [
    (["--config.trian.steps=3"], "unknown config key config.trian.steps; did you mean config.train.steps?"),
    (["--config.train.steps=many"], "config.train.steps: expected int, got 'many'"),
    (['--config.param_rules=[["backbone/(", null], [".*", 1.0]]'], "config.param_rules[0]: invalid regex"),
    (['--config.param_rules=[["bakbone/.*", null], [".*", 1.0]]'], "rule(s) [0] 'bakbone/.*' match no param"),
    (["--config.data.shots=401"], "shots=401 but class"),
    (["--config.data.name=cifar10"], "cifar10"),
    (["--config.init_from=/nonexistent/run"], "config.init_from: '/nonexistent/run' does not exist"),
    (["--config.data.batch_size=0"], "batch_size"),
    (["--config.train.nan_policy=ignore"], "config.train.nan_policy must be one of ('error', 'skip')"),
    (["--config.optimizer.name=adamm"], "config.optimizer.name must be one of"),
    (["--config.data.train_pp=[{\"op\": \"reszie\", \"size\": 3}]"], "config.data.train_pp[0]"),
    (["--config.data.prefetch=-1"], "config.data.prefetch must be 'auto' or an int >= 0, got -1"),
    (["--config.train.checkpoint_async=sometimes"],
     "config.train.checkpoint_async must be 'auto', true or false, got 'sometimes'"),
    (["--config.data.device_cache=sometimes"], "config.data.device_cache must be 'auto', true or false"),
    (["--config.data.device_cache=true", "--config.parallel.mode=pmap"],
     "config.data.device_cache=true but the run cannot make its batches on the devices: "
     "config.parallel.mode='pmap'"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m[:30] for _, m in BAD_INPUTS])
def test_bad_input_one_line_error_and_workdir_untouched(tmp_path, tfds_data_dir, capsys, extra, message):
    wd = tmp_path / "run"
    code = cli.main(["train", *cli_args(wd, tfds_data_dir, *extra)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message in lines[0], err[-1500:]
    assert not wd.exists()


def test_init_from_other_architecture_lists_mismatches_and_workdir_untouched(tmp_path, tfds_data_dir, capsys):
    src = tmp_path / "src"
    assert cli.main(["train", *cli_args(src, tfds_data_dir, "--config.train.steps=2")]) == 0
    wd = tmp_path / "ft"
    code = cli.main(["train", *cli_args(wd, tfds_data_dir, f"--config.init_from={src}",
                                        "--config.model.kwargs.width=2")])
    err = capsys.readouterr().err
    assert code == 2 and "shape mismatch at backbone/conv1/kernel" in err and "problem(s)" in err
    assert not wd.exists()


def test_other_config_on_nonempty_workdir_is_refused_and_untouched(tmp_path, tfds_data_dir, capsys):
    wd = tmp_path / "run"
    assert cli.main(["train", *cli_args(wd, tfds_data_dir, "--config.train.steps=2")]) == 0
    before = {p: p.stat().st_mtime_ns for p in wd.rglob("*")}
    code = cli.main(["train", *cli_args(wd, tfds_data_dir, "--config.train.steps=2", "--config.seed=7")])
    assert code == 2 and "holds a run with another config (seed: 0 -> 7)" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in wd.rglob("*")}
