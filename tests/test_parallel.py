"""Sharded jit, pmap and multi-host runs give the single-device results; clear errors.

The multi-device tests run in subprocesses with fake CPU devices
(``--xla_force_host_platform_device_count``); the multi-host test starts two
processes that join through ``jax.distributed.initialize`` on 127.0.0.1. Every
subprocess is bounded in time and killed (its own python PID) on failure.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import types

import grain
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.parallel import distributed
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.data import process_sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "tests/configs/tiny.py"
WORKER = "tests/parallel_worker.py"


# -- helpers ------------------------------------------------------------------------------------------------

def _env(devices: int) -> dict:
    launch = ("TL_JAX_COORDINATOR", "JAX_COORDINATOR", "TL_JAX_NUM_PROCESSES", "TL_JAX_PROCESS_ID",
              "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_")  # no multi-host auto-detection here
    env = {k: v for k, v in os.environ.items() if not k.startswith(launch)}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def run_all(cmds: list[list[str]], env: dict, timeout: float, logdir: pathlib.Path) -> list[tuple[int, str]]:
    """Start every command at once, wait for all (at most ``timeout`` s), kill leftovers; ``[(rc, output)]``."""
    logdir.mkdir(parents=True, exist_ok=True)
    logs = [open(logdir / f"proc{i}.log", "w+") for i in range(len(cmds))]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for cmd, log in zip(cmds, logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # the python process itself, not a wrapper
                p.wait(timeout=30)
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    return out


def worker(args: list[str], tmp_path: pathlib.Path, timeout: float = 420) -> dict:
    [(rc, out)] = run_all([[sys.executable, WORKER, *args]], _env(8), timeout, tmp_path / "logs")
    assert rc == 0, out[-4000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir: str, data_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tl_jax.train", "--config", TINY, "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", *extra]


def two_processes(workdir: str, data_dir: str, tmp_path: pathlib.Path, name: str) -> list[tuple[int, str]]:
    port = free_port()
    cmds = [train_cmd(workdir, data_dir, f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                      "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}",
                      "--config.parallel.heartbeat_timeout_s=10", "--config.parallel.initialization_timeout_s=120")
            for i in range(2)]
    return run_all(cmds, _env(4), 400, tmp_path / name)


def results(workdir: str) -> tuple[dict, list[dict]]:
    summary = json.loads(pathlib.Path(workdir, "summary.json").read_text())
    metrics = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in summary.items() if not k.endswith("_s")}, metrics


def assert_close_records(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-6), k


# -- units: mesh, data sharding, distributed settings (one device, in process) ----------------------------

def test_mesh_shape_resolves_and_names_the_config_key():
    assert mesh_lib.mesh_shape({"data": -1, "model": 1}, 8) == {"data": 8, "model": 1}
    assert mesh_lib.mesh_shape({"data": 4, "model": -1}, 8) == {"data": 4, "model": 2}
    assert mesh_lib.mesh_shape({"data": 2, "model": 4}, 8) == {"data": 2, "model": 4}
    with pytest.raises(ValueError, match=r"config.parallel.mesh=.* spans 3 devices but there are 8"):
        mesh_lib.mesh_shape({"data": 3, "model": 1}, 8)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        mesh_lib.mesh_shape({"data": -1, "model": 3}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.mesh_shape({"data": -1, "model": -1}, 8)
    with pytest.raises(ValueError, match=r"unknown axes \['pipe'\]"):
        mesh_lib.mesh_shape({"data": -1, "pipe": 2}, 8)
    with pytest.raises(config_lib.ConfigError, match="unknown config key config.parallel.mesh.modl"):
        config_lib.apply_overrides(config_lib.base_config(), ['parallel.mesh={"data": 4, "modl": 2}'])


def test_batch_not_divisible_by_devices_names_the_key():
    eight = types.SimpleNamespace(devices=np.empty(8))
    assert mesh_lib.check_batch(64, eight) == 64
    with pytest.raises(ValueError, match=r"config.data.batch_size=12 is not divisible by the 8 devices"):
        mesh_lib.check_batch(12, eight)


def test_fsdp_spec_shards_big_leaves_on_their_largest_divisible_dim():
    P = mesh_lib.P
    assert mesh_lib.fsdp_spec((3, 3, 64, 128), 2, 1000) == P(None, None, None, "model")
    assert mesh_lib.fsdp_spec((2048, 10), 4, 1000) == P("model", None)
    assert mesh_lib.fsdp_spec((128,), 2, 1000) == P()  # small: replicated
    assert mesh_lib.fsdp_spec((999, 5), 2, 10) == P()  # nothing divisible
    assert mesh_lib.fsdp_spec((), 2, 0) == P()
    assert mesh_lib.fsdp_spec((64, 64), 1, 0) == P()  # model axis of 1


def test_fsdp_shards_most_of_resnet50_at_the_default_threshold():
    import jax
    import jax.numpy as jnp

    from tl_jax.models import get_model

    model = get_model("resnet50", 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    leaves = [x.shape for x in jax.tree.leaves(shapes)]
    min_size = config_lib.base_config().parallel.fsdp_min_size
    sharded = [s for s in leaves if mesh_lib.fsdp_spec(s, 8, min_size) != mesh_lib.P()]
    share = sum(np.prod(s) for s in sharded) / sum(np.prod(s) for s in leaves)
    assert len(sharded) == 29 and share > 0.9  # the big convs and the head: 94% of 25.6M params


def test_batch_sharding_gives_every_process_count_the_same_global_batches():
    def batches(block: int):  # what train_dataset builds: shuffled, repeated, batched
        return grain.MapDataset.source(list(range(37))).seed(5).shuffle().repeat().batch(block)

    global_batches = [batches(12)[k] for k in range(5)]
    for n in (2, 3, 4):
        shards = [process_sharding("batch", 37, p, n) for p in range(n)]
        assert all(s.kwargs == {"process_index": 0, "process_count": 1} for s in shards)
        parts = [s.select(batches(12 // n)) for s in shards]
        for k in range(5):
            np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), global_batches[k])
    examples = process_sharding("examples", 36, 1, 3)
    assert examples.kwargs == {"process_index": 1, "process_count": 3}


def test_batch_sharding_of_cached_rows_builds_only_the_process_blocks():
    from tl_jax.data.shuffle import GatherBatches

    arrays = {"image": np.arange(37 * 4, dtype=np.float32).reshape(37, 2, 2, 1), "label": np.arange(37) % 10}
    global_batches = GatherBatches(arrays, batch_size=12, seed=5)
    for n in (2, 3):
        parts = [process_sharding("batch", 37, p, n).select(GatherBatches(arrays, batch_size=12 // n, seed=5))
                 for p in range(n)]
        assert all(isinstance(part, GatherBatches) and f"step={n}" in str(part) for part in parts)
        for k in range(7):
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]),
                                              global_batches[k][key])


def test_data_sharding_errors():
    with pytest.raises(ValueError, match=r"the 37 training examples do not split evenly over 2 processes"):
        process_sharding("examples", 37, 0, 2)
    with pytest.raises(ValueError, match=r"config.parallel.data_sharding must be one of"):
        process_sharding("rows", 37, 0, 1)
    with pytest.raises(ValueError, match="needs a random-access grain MapDataset"):
        process_sharding("batch", 37, 0, 2).select(iter([]))


def test_distributed_settings_from_config_and_env():
    c = config_lib.base_config().parallel
    assert distributed.settings(c, {}) is None  # 'auto', nothing asks for it: one process
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "TL_JAX_NUM_PROCESSES": "4", "TL_JAX_PROCESS_ID": "3"}
    got = distributed.settings(c, env)
    assert got["coordinator_address"] == "10.0.0.1:1234" and (got["num_processes"], got["process_id"]) == (4, 3)
    assert got["heartbeat_timeout_seconds"] == 100
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n[1-2]"}
    assert distributed.settings(c, slurm) == dict(coordinator_address=None, num_processes=None, process_id=None,
                                                  heartbeat_timeout_seconds=100, initialization_timeout=300)
    assert distributed.settings(c, {**slurm, "SLURM_NTASKS": "1"}) is None
    c.distributed = False
    assert distributed.settings(c, env) is None
    c.distributed = True
    assert distributed.settings(c, {})["coordinator_address"] is None  # jax auto-detects (e.g. a TPU pod)
    c.process_id, c.num_processes = 2, 2
    with pytest.raises(ValueError, match=r"config.parallel.process_id=2 must be in \[0, num_processes=2\)"):
        distributed.settings(c, {})
    c.distributed = "yes"
    with pytest.raises(ValueError, match="config.parallel.distributed must be 'auto', true or false"):
        distributed.settings(c, {})


def test_initialize_after_jax_started_is_a_clear_error(monkeypatch):
    c = config_lib.base_config().parallel
    c.coordinator_address, c.num_processes, c.process_id = "127.0.0.1:1", 2, 0
    monkeypatch.setattr(distributed, "_backends_started", lambda: True)
    with pytest.raises(ValueError, match="must run before any JAX computation"):
        distributed.initialize(c, {})
    c.coordinator_address, c.num_processes = None, None
    assert distributed.initialize(c, {}) is False  # nothing asked: no-op, whatever JAX did before


def test_workdir_identity_drops_per_process_launch_keys():
    c = config_lib.base_config()
    config_lib.apply_overrides(c, ["parallel.process_id=1", "parallel.coordinator_address=h:1", "parallel.mode=pmap"])
    ident = distributed.run_identity(config_lib.to_dict(c))
    assert ident["parallel"] == {"mode": "pmap", "mesh": {"data": -1, "model": 1}, "fsdp_min_size": 2**18,
                                 "data_sharding": "batch"}
    assert ident["seed"] == c.seed


# -- 8 fake devices in a subprocess --------------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_jit_fsdp_and_pmap_match_single_device_including_batchnorm(tmp_path):
    res = worker(["steps"], tmp_path)
    assert res["resnet18"]["has_batch_stats"] and not res["cnn"]["has_batch_stats"]
    for model, runs in res.items():
        assert runs["moved"] > 1e-3, model  # training did move the params
        for key in ("jit8", "pmap8", "fsdp4x2"):
            if key in runs:
                assert runs[key]["diff"] < 5e-5, (model, key, runs[key])
                assert runs[key]["loss"] == pytest.approx(runs["ref_loss"], rel=1e-5), (model, key)
    assert "fsdp4x2" in res["cnn"]


@pytest.mark.slow
def test_train_in_pmap_mode_matches_jit_resumes_and_errors_are_clear(tmp_path, tfds_data_dir):
    res = worker(["train", tfds_data_dir, str(tmp_path / "runs")], tmp_path)
    assert_close_records(res["pmap"], res["jit"])
    assert res["pmap_checkpoints"] == ["4", "8"]
    assert_close_records(res["pmap_resumed"], res["pmap"])
    # Batches made inside the sharded step from the replicated row table train like host-made ones.
    assert_close_records(res["jit_crops_device_True"], res["jit_crops_device_False"])
    err = res["errors"]
    assert "config.parallel.mesh={'data': 3, 'model': 1} spans 3 devices but there are 8" in err["mesh"]
    assert "config.parallel.mesh.model=2: param sharding over 'model' needs config.parallel.mode='jit'" \
        in err["pmap_model"]
    assert "config.data.batch_size=12 is not divisible by the 8 devices" in err["batch"]
    assert not err["bad_written"]  # refused before anything was written


# -- two processes x 4 fake devices vs one process x 8 ------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_one_process_checkpoint_and_resume(tmp_path, tfds_data_dir):
    ref, multi = str(tmp_path / "ref"), str(tmp_path / "multi")
    [(rc, out)] = run_all([train_cmd(ref, tfds_data_dir)], _env(8), 300, tmp_path / "ref_logs")
    assert rc == 0, out[-3000:]
    outs = two_processes(multi, tfds_data_dir, tmp_path, "multi_logs")
    assert all(rc == 0 for rc, _ in outs), "\n----\n".join(o[-3000:] for _, o in outs)
    assert "process 0 of 2" in outs[0][1] and "process 1 of 2" in outs[1][1]
    assert "test/accuracy=" in outs[0][1] and "INFO step" not in outs[1][1]  # logs from process 0 only
    ref_summary, ref_metrics = results(ref)
    summary, metrics = results(multi)
    assert_close_records(summary, ref_summary)
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics]  # each event written once
    for a, b in zip(metrics, ref_metrics):
        assert_close_records(a, b)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["4", "8"]
    assert json.loads(pathlib.Path(multi, "config.json").read_text())["parallel"].get("process_id") is None

    # Lose the last checkpoint and the summary, rerun both processes: they resume at step 4.
    shutil.rmtree(os.path.join(multi, "checkpoints", "8"))
    os.remove(os.path.join(multi, "summary.json"))
    outs = two_processes(multi, tfds_data_dir, tmp_path, "resume_logs")
    assert all(rc == 0 for rc, _ in outs), "\n----\n".join(o[-3000:] for _, o in outs)
    assert "resumed from" in outs[0][1] and "at step 4" in outs[0][1]
    resumed, resumed_metrics = results(multi)
    assert_close_records(resumed, summary)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in metrics]
