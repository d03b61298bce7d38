"""Finished is finished, one run per workdir, and the one-line refusals of issue 21."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from tl_jax import cli
from tl_jax import config as config_lib
from tl_jax.train import lock as lock_lib
from tl_jax.train import setup as setup_lib
from tl_jax.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny.py")


def args(workdir, data_dir, *extra):
    return ["--config", TINY, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]


def snapshot(workdir):
    """Every file under ``workdir``: (bytes, mtime_ns)."""
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(workdir).rglob("*")) if p.is_file()}


def test_rerunning_a_finished_run_touches_nothing_and_a_longer_one_continues(tmp_path, tfds_data_dir, capsys):
    wd = tmp_path / "run"
    assert cli.main(["train", *args(wd, tfds_data_dir)]) == 0
    first = capsys.readouterr().out
    before = snapshot(wd)
    assert cli.main(["train", *args(wd, tfds_data_dir)]) == 0
    assert capsys.readouterr().out == first  # the same summary line, from summary.json
    assert snapshot(wd) == before  # byte-identical files, not even rewritten

    assert cli.main(["train", *args(wd, tfds_data_dir, "--config.train.steps=12")]) == 0
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["steps"] == 12 and "train/loss" in summary
    steps = [r["step"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and max(steps) == 12 and steps.count(8) == 2  # train + eval line at step 8
    assert json.loads((wd / "config.json").read_text())["train"]["steps"] == 12
    # going back is refused: it would need the steps the run already took
    assert cli.main(["train", *args(wd, tfds_data_dir, "--config.train.steps=4")]) == 2
    assert "train.steps: 12 -> 4" in capsys.readouterr().err


def _cli(argv, fault=""):
    env = dict(os.environ, TL_JAX_FAULT=fault, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tl_jax.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, tfds_data_dir):
    wd = tmp_path / "run"
    first = _cli(args(wd, tfds_data_dir), fault="pause_after_step=3,pause_s=120")
    try:
        lock_file = lock_lib.lock_path(wd, 0)
        deadline = time.time() + 180
        while not ((wd / "metrics.jsonl").exists() and lock_file.exists() and lock_file.read_text().strip()):
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        metrics_before = (wd / "metrics.jsonl").read_bytes()
        second = _cli(args(wd, tfds_data_dir))
        out, err = second.communicate(timeout=180)
        assert second.returncode == 2, err[-2000:]
        line = [ln for ln in err.splitlines() if "error" in ln]
        assert len(line) == 1 and f"is in use by pid {first.pid} on host {socket.gethostname()!r}" in line[0]
        assert (wd / "metrics.jsonl").read_bytes() == metrics_before  # the refused process wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = _cli(args(wd, tfds_data_dir))
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    assert f"was left by pid {first.pid}" in err and "taking it over" in err
    steps = [r["step"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and len(steps) == len(set((r, i) for i, r in enumerate(steps)))
    assert lock_file.read_text() == ""  # released at the end


def test_other_hosts_fresh_lock_refuses_a_stale_one_is_taken(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    path = lock_lib.lock_path(wd, 0)
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": time.time()}))
    with pytest.raises(lock_lib.WorkdirLockedError, match="in use by pid 4242 on host 'node-17'"):
        lock_lib.acquire(wd)
    old = time.time() - lock_lib.STALE_S - 5
    os.utime(path, (old, old))
    lock = lock_lib.acquire(wd)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert lock_lib.acquire(wd) is lock  # re-entrant within a process
    lock.release()
    assert path.read_text() != ""  # still held once
    lock.release()
    assert path.read_text() == ""


def test_a_held_workdir_is_refused_before_any_data_is_read(tmp_path, tfds_data_dir, monkeypatch):
    """Issue 33: the refusal comes first, not after seconds of data loading and caching."""
    wd = tmp_path / "wd"
    wd.mkdir()
    path = lock_lib.lock_path(wd, 0)
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": time.time()}))  # a live holder
    before = snapshot(wd)

    def read(*a, **k):
        raise AssertionError("the data was read before the workdir lock")

    monkeypatch.setattr(setup_lib, "load_split", read)
    c = config_lib.load_config(TINY)
    c.data.data_dir = tfds_data_dir
    with pytest.raises(lock_lib.WorkdirLockedError, match="in use by pid 4242 on host 'node-17'"):
        train(c, str(wd))
    assert snapshot(wd) == before  # nothing written, the holder's lock file as it was


def test_config_that_is_not_python_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    assert cli.main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a Python file" in err[0] and not (tmp_path / "wd").exists()


def test_batch_larger_than_the_training_set_warns(tmp_path, tfds_data_dir, capsys):
    code = cli.main(["train", *args(tmp_path / "wd", tfds_data_dir, "--config.data.shots=1",
                                    "--config.data.batch_size=16", "--config.train.steps=2")])
    assert code == 0
    assert "config.data.batch_size=16 exceeds the 10 training examples" in capsys.readouterr().err
