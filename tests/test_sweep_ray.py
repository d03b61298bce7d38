"""The Ray executor's per-point resources (``_resources``) and retries, on a local Ray runtime.

The slow tests start a local runtime (``ray.init()``, a few seconds) and train tests/configs/tiny_tasks.py's
points in Ray tasks; they are skipped without Ray.
"""
import json
import pathlib

import pytest

from tl_jax.cli import main
from tl_jax.config import ConfigError
from tl_jax.sweep import spec
from tl_jax.sweep.ray_executor import check_fits
from tl_jax.sweep.runner import SweepError, load_points, resolve

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = str(ROOT / "tests" / "configs" / "tiny_tasks.py")


# -- _resources: checked with the other point keys, one line each ------------------------------------------------
def test_resources_default_and_override():
    assert spec.resources({"seed": 0}) == {"cpus": 1.0, "gpus": 0.0}
    assert spec.resources({"_resources": {"gpus": 1}}) == {"cpus": 1.0, "gpus": 1.0}
    assert spec.resources({"_resources": {"cpus": 4, "gpus": 0.5}}) == {"cpus": 4.0, "gpus": 0.5}
    assert spec.run_fields({"seed": 0, "_resources": {"cpus": 2}}) == {"seed": 0}  # not part of the run
    assert spec.point_name({"seed": 0, "_resources": {"cpus": 2}}) == "seed0"


@pytest.mark.parametrize("value, message", [
    (4, "get_sweep[0]: _resources must be a dict like {'cpus': 4, 'gpus': 1}, got 4"),
    ({"gpu": 1}, "get_sweep[0]: _resources key 'gpu' is not one of ['cpus', 'gpus']"),
    ({"cpus": -1}, "get_sweep[0]: _resources['cpus'] must be a number >= 0, got -1"),
    ({"gpus": "1"}, "get_sweep[0]: _resources['gpus'] must be a number >= 0, got '1'"),
    ({"gpus": True}, "get_sweep[0]: _resources['gpus'] must be a number >= 0, got True"),
    ({"cpus": float("nan")}, "get_sweep[0]: _resources['cpus'] must be a number >= 0, got nan"),
])
def test_bad_resources_are_one_line(value, message):
    with pytest.raises(ConfigError) as e:
        spec.check_points([{"seed": 0, "_resources": value}], "get_sweep")
    assert str(e.value) == message


def _points(tmp_path, resources):
    config_file, raw = load_points(f"{TASKS}:n=2")
    raw[1]["_resources"] = resources
    return resolve(config_file, raw, tmp_path)


def test_a_point_no_node_can_hold_is_an_error_locally_and_a_warning_on_a_cluster(tmp_path, caplog):
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    check_fits(nodes, _points(tmp_path, {"cpus": 8, "gpus": 1}), local=True)  # the second node holds it
    with pytest.raises(SweepError) as e:  # 8 CPUs on one node, a GPU on another: no single node
        check_fits(nodes[:1] + [{"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}],
                   _points(tmp_path, {"cpus": 8, "gpus": 1}), local=True)
    assert str(e.value) == ("point t1 asks Ray for 8 CPUs and 1 GPUs (_resources) but no node of the local Ray "
                            "runtime has them (largest: 2 CPUs, 1 GPUs): lower the point's _resources, or give "
                            "--address of a cluster that has such a node")
    with pytest.raises(SweepError, match="asks Ray for 1 CPUs and 2 GPUs"):
        check_fits(nodes, _points(tmp_path, {"gpus": 2}), local=True)  # the dead node does not count
    check_fits(nodes, _points(tmp_path, {"gpus": 2}), local=False)
    assert "Ray waits until a node that fits joins" in caplog.text


# -- on a local Ray runtime ---------------------------------------------------------------------------------------
def _tasks_file(tmp_path, resources) -> str:
    """tiny_tasks' points with ``_resources`` on the second."""
    path = tmp_path / "ray_points.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests' / 'configs')!r})\n"
                    "from tiny_tasks import get_config, get_sweep as _sweep\n\n\n"
                    f"def get_sweep(arg=None):\n    points = _sweep(arg)\n"
                    f"    for p in points[1:2]:\n        p['_resources'] = {resources!r}\n    return points\n")
    return str(path)


@pytest.mark.slow
def test_ray_refuses_a_point_larger_than_the_local_runtime_and_touches_nothing(tmp_path, capsys):
    pytest.importorskip("ray")
    study = tmp_path / "study"
    rc = main(["sweep", "--config", f"{_tasks_file(tmp_path, {'cpus': 4096})}:n=2", "--workdir", str(study),
               "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("tl-jax sweep: error: point t1 asks Ray for 4096 CPUs and 0 GPUs")
    assert "lower the point's _resources" in err[-1]
    assert not study.exists()


@pytest.mark.slow
def test_ray_retries_a_failed_point_which_resumes_from_its_checkpoint(tmp_path, tfds_data_dir, monkeypatch,
                                                                      capsys):
    """Every first attempt is killed right after its step-4 checkpoint (TL_JAX_FAULT, inherited by the Ray
    workers): with --retries 0 the point fails, with --retries 1 its second attempt resumes at step 4."""
    pytest.importorskip("ray")
    monkeypatch.setenv("TL_JAX_FAULT", "kill_during_save=4")
    spec_arg = f"{_tasks_file(tmp_path, {'cpus': 2})}:steps=8"
    ov = [f"--config.data.data_dir={tfds_data_dir}", "--config.train.eval_every=0", "--no-report"]
    rc = main(["sweep", "--config", f"{spec_arg},n=1", "--workdir", str(tmp_path / "r0"), "--executor", "ray",
               "--retries", "0", *ov])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "1 point(s) failed after 0 retries: t0 (RuntimeError: exit -9 (SIGKILL): " in err[-1]
    assert "exit -9 (SIGKILL)" in json.loads((tmp_path / "r0" / "t0" / "failed.json").read_text())["error"]
    study = tmp_path / "r1"
    assert main(["sweep", "--config", f"{spec_arg},n=2", "--workdir", str(study), "--executor", "ray", "--retries",
                 "1", *ov]) == 0
    record = json.loads((study / "sweep.json").read_text())
    assert {n: (r["status"], r["resources"]) for n, r in record["points"].items()} == {
        "t0": ("ray", {"cpus": 1.0, "gpus": 0.0}), "t1": ("ray", {"cpus": 2.0, "gpus": 0.0})}
    for name in ("t0", "t1"):
        log = (study / "logs" / f"{name}.log").read_text()
        assert log.count("resumed from") == 1 and "at step 4" in log, log[-2000:]
        assert json.loads((study / name / "summary.json").read_text())["steps"] == 8
        assert not (study / name / "failed.json").exists()


def test_a_ray_worker_runs_a_point_without_importing_jax():
    """Ray imports the task's module in each fresh worker: tl_jax.sweep.ray_task keeps that to the stdlib."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, tl_jax.sweep.ray_task; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
