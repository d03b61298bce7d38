"""Sweep points as tasks (--list/--index/--shard), phases, failure records, partial reports, and three
concurrent shard processes (one killed and restarted) against the sequential sweep."""
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tl_jax.cli import main
from tl_jax.sweep.report import write_report
from tl_jax.sweep import status as status_lib
from tl_jax.sweep import tasks
from tl_jax.sweep.runner import SweepError, load_points, resolve

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = str(ROOT / "tests" / "configs" / "tiny_tasks.py")


def _sweep(capsys, *args, spec=TASKS):
    rc = main(["sweep", "--config", spec, *args])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


# -- bad input: one line, nothing touched ------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--index", "6"], "--index 6 is out of range: the sweep has 6 points (0..5)"),
    (["--index", "-1"], "--index -1 is out of range: the sweep has 6 points (0..5)"),
    (["--index", "two"], "--index: expected an integer or 'auto', got 'two'"),
    (["--index", "auto"], "--index auto: none of SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX is set"),
    (["--shard", "3/3"], "--shard 3/3: need 0 <= I < N"),
    (["--shard", "1"], "--shard must be I/N (e.g. 0/4, I counted from 0), got '1'"),
    (["--shard", "a/2"], "--shard must be I/N"),
    (["--shard", "0/0"], "--shard 0/0: need 0 <= I < N"),
    (["--index", "0", "--jobs", "2"], "--jobs is for a whole sweep in one task"),
    (["--executor", "ray"], "--executor ray needs Ray, which is not installed: pip install 'tl_jax[ray]'"),
])
def test_bad_task_arguments_are_one_line_and_touch_nothing(args, message, tmp_path, capsys, monkeypatch):
    for var in tasks.ARRAY_VARS:
        monkeypatch.delenv(var, raising=False)
    if args[0] == "--executor":  # the message when Ray is missing, whether or not this machine has it
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    rc, _, err = _sweep(capsys, "--workdir", str(tmp_path / "study"), *args)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("tl-jax sweep: error: ") and message in err
    assert not (tmp_path / "study").exists()


def test_parse_index_reads_array_variables_in_order():
    assert tasks.parse_index("auto", 6, {"SLURM_ARRAY_TASK_ID": "4", "JOB_COMPLETION_INDEX": "1"}) == 4
    assert tasks.parse_index("auto", 6, {"JOB_COMPLETION_INDEX": "1", "TPU_WORKER_ID": "3"}) == 1
    assert tasks.parse_index("5", 6, {}) == 5
    with pytest.raises(SweepError, match=r"--index auto \(SLURM_ARRAY_TASK_ID\) 9 is out of range"):
        tasks.parse_index("auto", 6, {"SLURM_ARRAY_TASK_ID": "9"})
    with pytest.raises(SweepError, match="none of SLURM_ARRAY_TASK_ID"):
        tasks.parse_index("auto", 6, {"TPU_WORKER_ID": "3"})  # a host index, not an array task


def _points(tmp_path, arg="n=6"):
    config_file, raw = load_points(f"{TASKS}:{arg}")
    return resolve(config_file, raw, tmp_path)


def test_shards_partition_the_points_in_phase_order(tmp_path):
    points = _points(tmp_path, "n=7,phased=1")
    shards = [tasks.shard_indices(i, 3, points) for i in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(k for s in shards for k in s) == list(range(7))
    for p in points:  # phase 0 for t0 only: it comes first in its shard
        p.point["_phase"] = 1 if p.name == "t0" else 0
    assert tasks.shard_indices(0, 3, points) == [3, 6, 0]


# -- statuses and idempotent task runs (training replaced by a fake: no JAX) -------------------------------------
@pytest.fixture
def holder(tmp_path):
    """Another live process holding the workdir lock of ``study/t1``."""
    wd = tmp_path / "study" / "t1"
    code = (f"from tl_jax.train import lock; lock.acquire({str(wd)!r}); print('held', flush=True); "
            f"import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _fake_train(calls, fail=()):
    def train(config, workdir):
        name = pathlib.Path(workdir).name
        calls.append(name)
        if name in fail:
            raise RuntimeError(f"boom in {name}")
        (pathlib.Path(workdir) / "summary.json").write_text(json.dumps({"test/accuracy": 0.5, "steps": 4}))
        return {"test/accuracy": 0.5}
    return train


class _Messages(logging.Handler):
    """The tl_jax log's messages (the CLI's logging.basicConfig(force=True) removes caplog's handler)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_list_and_shard_leave_finished_and_running_points_alone(tmp_path, holder, capsys, monkeypatch):
    study = tmp_path / "study"
    (study / "t0").mkdir(parents=True)
    (study / "t0" / "summary.json").write_text("{}")
    status_lib.record_failure(study / "t2", RuntimeError("out of memory"))
    (study / "t3" / "checkpoints" / "2").mkdir(parents=True)
    rc, out, _ = _sweep(capsys, "--workdir", str(study), "--list")
    assert rc == 0
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()[1:7]}
    assert rows["t0"] == ["0", "finished"] and rows["t1"][:2] == ["0", "running"]
    assert f"pid {holder.pid}" in " ".join(rows["t1"])
    assert rows["t2"][:3] == ["0", "failed", "RuntimeError:"] and rows["t3"][1:] == ["pending", "resumes", "from",
                                                                                     "step", "2"]
    assert out.splitlines()[-1] == "6 points: 3 pending, 1 running, 1 finished, 1 failed"
    assert not (study / "sweep.json").exists()  # --list writes nothing

    calls = []
    monkeypatch.setattr("tl_jax.train.loop.train", _fake_train(calls, fail={"t4"}))
    seen = _Messages()
    logging.getLogger("tl_jax").addHandler(seen)
    try:
        with pytest.raises(SweepError, match=r"1 point\(s\) failed.*t4: RuntimeError: boom in t4"):
            tasks.run_tasks(TASKS, str(study), shard="0/1")
    finally:
        logging.getLogger("tl_jax").removeHandler(seen)
    assert calls == ["t2", "t3", "t4", "t5"]  # t0 finished, t1 held by the other process
    assert any(m.startswith("sweep: leave t1 (point 1) alone: --workdir") and str(holder.pid) in m
               for m in seen.messages)
    assert not (study / "t2" / "failed.json").exists()  # retried and finished: the record is gone
    assert status_lib.read_failure(study / "t4")["error"] == "RuntimeError: boom in t4"
    assert [status_lib.point_status(study / f"t{i}") for i in range(6)] == [
        "finished", "running", "finished", "finished", "failed", "finished"]
    assert list(json.loads((study / "sweep.json").read_text())["points"]) == [f"t{i}" for i in range(6)]
    calls.clear()  # again: idempotent, only the failed point is retried
    monkeypatch.setattr("tl_jax.train.loop.train", _fake_train(calls))
    assert tasks.run_tasks(TASKS, str(study), shard="1/3") == {"t1": "running", "t4": "trained"}
    assert calls == ["t4"] and not (study / "t4" / "failed.json").exists()
    calls.clear()
    assert tasks.run_tasks(TASKS, str(study), index="4") == {"t4": "finished"} and calls == []
    holder.kill()
    holder.wait()  # a dead holder: the point is pending again
    assert status_lib.point_status(study / "t1") == "pending"


def test_phases_wait_or_exit_with_the_no_wait_code(tmp_path, capsys, monkeypatch):
    study = tmp_path / "study"
    rc, _, err = _sweep(capsys, "--workdir", str(study), "--shard", "1/3", "--no-wait", spec=f"{TASKS}:phased=1")
    assert rc == 75 and len(err.splitlines()) == 1
    assert "point t1 (phase 1) waits for 1 point(s) of an earlier phase: t0 (pending); exiting with 75" in err
    assert not study.exists()
    rc, _, err = _sweep(capsys, "--workdir", str(study), "--index", "2", "--no-wait", "--no-wait-code", "3",
                        spec=f"{TASKS}:phased=1")
    assert rc == 3 and "exiting with 3 (--no-wait)" in err and not study.exists()

    calls = []
    monkeypatch.setattr("tl_jax.train.loop.train", _fake_train(calls))
    points = _points(study, "phased=1")

    def finish_t0():  # another task finishes t0 a moment later
        time.sleep(0.3)
        (study / "t0").mkdir(parents=True)
        (study / "t0" / "summary.json").write_text("{}")

    thread = threading.Thread(target=finish_t0)
    thread.start()
    t0 = time.time()
    assert tasks.Tasks(study, points, poll_s=0.05).run([2]) == {"t2": "trained"}
    thread.join()
    assert time.time() - t0 >= 0.3 and calls == ["t2"]
    (study / "t0" / "summary.json").unlink()
    status_lib.record_failure(study / "t0", RuntimeError("nan"))
    with pytest.raises(SweepError, match=r"point t3 \(phase 1\) needs t0, which failed .*rerun it with --index"):
        tasks.Tasks(study, points, poll_s=0.05).run([3])


# -- reports over partial studies ------------------------------------------------------------------------------
def test_report_names_missing_and_failed_points(tmp_path, caplog):
    names = [f"t{i}" for i in range(4)]
    (tmp_path / "sweep.json").write_text(json.dumps({"points": {n: {"point": {"lr": i, "seed": 0}}
                                                                for i, n in enumerate(names)}}))
    for i in (0, 2):
        (tmp_path / names[i]).mkdir()
        (tmp_path / names[i] / "point.json").write_text(json.dumps({"lr": i, "seed": 0}))
        (tmp_path / names[i] / "summary.json").write_text(json.dumps({"test/accuracy": 0.1 * (i + 1)}))
    status_lib.record_failure(tmp_path / "t1", RuntimeError("boom"))
    with caplog.at_level(logging.WARNING, logger="tl_jax"):
        table = write_report(str(tmp_path))
    note = "2 of 4 points are not in these results (no summary.json): t1 (failed), t3 (pending)"
    assert [r.getMessage() for r in caplog.records if "report:" in r.getMessage()] == [f"report: {note}"]
    assert "| 0 | 0.100 ± 0.000 (n=1) |" in table and "| 2 | **0.300 ± 0.000 (n=1)** |" in table
    assert (tmp_path / "results.md").read_text().strip().endswith(note)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["t0", "t2", "t1", "t3"]
    assert rows[0].endswith(",status") and rows[3].endswith(",failed") and rows[4].startswith("t3,3,0,")
    assert (tmp_path / "results.png").exists()
    for n in ("t0", "t2"):
        (tmp_path / n / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished runs .*4 of 4 points are not in these results"):
        write_report(str(tmp_path))


# -- three concurrent shard processes, one killed and restarted ------------------------------------------------
def _params(workdir):
    from tl_jax.train.checkpoint import load_variables

    import jax

    return jax.tree_util.tree_flatten_with_path(load_variables(str(workdir))["params"])[0]


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_concurrent_shards_with_a_kill_equal_the_sequential_sweep(tmp_path, tfds_data_dir, capsys):
    ov = [f"--config.data.data_dir={tfds_data_dir}", "--config.train.checkpoint_every=2"]
    spec = f"{TASKS}:n=6,steps=4"
    assert main(["sweep", "--config", spec, "--workdir", str(tmp_path / "seq"), "--vectorize", "off",
                 "--no-report", *ov]) == 0  # also prepares the data set once, before the processes share it
    capsys.readouterr()
    study = tmp_path / "shards"

    def shard(i, fault=""):
        env = {**os.environ, "TL_JAX_FAULT": fault, "JAX_PLATFORMS": "cpu"}
        return subprocess.Popen([sys.executable, "-m", "tl_jax.cli", "sweep", "--config", spec, "--workdir",
                                 str(study), "--shard", f"{i}/3", *ov], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    procs = [shard(0, "kill_after_step=3"), shard(1), shard(2)]
    killed_out, _ = procs[0].communicate(timeout=300)
    assert procs[0].returncode == -9, killed_out  # SIGKILLed after step 3 of t0 (checkpoint 2 saved)
    assert status_lib.point_status(study / "t0") == "pending" and status_lib.latest_step(study / "t0") == 2
    procs[0] = shard(0)  # the retried array task, while the others may still run
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    text = killed_out + "".join(outs)
    assert "resumed from" in outs[0] and "at step 2" in outs[0]
    for k in range(6):  # each point trained to its end once
        assert text.count(f"[point {k}] t{k}:") == 1, text
    for k in range(6):
        seq, par = tmp_path / "seq" / f"t{k}", study / f"t{k}"
        assert _lines(par / "metrics.jsonl") == _lines(seq / "metrics.jsonl")  # no step logged twice
        strip = lambda s: {a: b for a, b in s.items() if not a.endswith("_s")}  # noqa: E731
        assert strip(json.loads((par / "summary.json").read_text())) == strip(
            json.loads((seq / "summary.json").read_text()))
        for (path_a, a), (path_b, b) in zip(_params(par), _params(seq), strict=True):
            assert path_a == path_b and np.array_equal(a, b), (k, path_a)  # bit for bit
    rc, out, _ = _sweep(capsys, "--workdir", str(study), "--list", *ov)
    assert rc == 0 and out.splitlines()[-1] == "6 points: 0 pending, 0 running, 6 finished, 0 failed"


# -- the Ray executor --------------------------------------------------------------------------------------------
def test_a_failing_ray_task_raises_with_its_exit_status_and_last_line(tmp_path):
    from tl_jax.sweep.ray_task import run_command

    with pytest.raises(RuntimeError, match="exit 3: bad thing"):  # Ray retries on this exception
        run_command([sys.executable, "-c", "import sys; print('bad thing'); sys.exit(3)"], str(tmp_path / "p.log"))
    assert 0 < run_command([sys.executable, "-c", "print('ok')"], str(tmp_path / "p.log")) < 60  # its seconds


@pytest.mark.slow
def test_ray_executor_runs_a_phased_sweep_like_the_sequential_one(tmp_path, tfds_data_dir, capsys):
    pytest.importorskip("ray")
    ov = [f"--config.data.data_dir={tfds_data_dir}"]
    spec = f"{TASKS}:n=3,phased=1"
    assert main(["sweep", "--config", spec, "--workdir", str(tmp_path / "seq"), "--vectorize", "off",
                 "--no-report", *ov]) == 0
    study = tmp_path / "ray"
    assert main(["sweep", "--config", spec, "--workdir", str(study), "--executor", "ray", *ov]) == 0
    record = json.loads((study / "sweep.json").read_text())
    assert {n: r["status"] for n, r in record["points"].items()} == {"t0": "ray", "t1": "ray", "t2": "ray"}
    assert sorted(os.listdir(study / "logs")) == ["t0.log", "t1.log", "t2.log"]
    assert (study / "t0" / "summary.json").stat().st_mtime <= (study / "t1" / "config.json").stat().st_mtime
    for k in range(3):
        assert _lines(study / f"t{k}" / "metrics.jsonl") == _lines(tmp_path / "seq" / f"t{k}" / "metrics.jsonl")
    assert (study / "results.md").exists()
    capsys.readouterr()
    t = time.time()  # again: everything is finished, so Ray is not even started
    assert main(["sweep", "--config", spec, "--workdir", str(study), "--executor", "ray", "--no-report", *ov]) == 0
    assert time.time() - t < 20
