"""Step time of the demo CNN on 1 vs 8 (fake CPU) devices, sharded jit vs pmap.

Each configuration runs in its own subprocess (the device count is fixed when
JAX starts, via ``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and
times the loop's own path: a ``tl_jax.parallel`` strategy, ``put_batch`` of a
host batch and the compiled step, ``STEPS`` steps after ``WARMUP`` ones, best
of ``REPEATS`` timings. The model is the demo's CNN (28x28x1 MNIST-sized
inputs, global batch 64, Adam).

Fake CPU devices share the same cores, so 8 devices cannot be faster than 1:
the ratios measure the *overhead* of splitting the step (collectives, per
device dispatch) and of pmap relative to sharded jit, not a speed-up.

    python benchmarks/parallel_bench.py          # prints a JSON dict
    from benchmarks.parallel_bench import run    # run() -> dict (used by `make bench`)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BATCH = 64
STEPS = 20
WARMUP = 3
REPEATS = 2
CONFIGS = (("jit", 1), ("jit", 8), ("pmap", 8))  # (mode, devices)


def _worker(mode: str) -> dict:
    """In the subprocess: time the step of ``mode`` over all (fake) devices."""
    import jax
    import numpy as np

    from tl_jax import config as config_lib
    from tl_jax.parallel import mesh as mesh_lib
    from tl_jax.parallel.pmap import PmapStrategy
    from tl_jax.parallel.strategy import JitStrategy
    from tl_jax.train import compile_cache
    from tl_jax.train.loop import build_model_and_state
    from tl_jax.train.step import make_train_step

    compile_cache.enable()
    mesh = mesh_lib.build_mesh({"data": -1, "model": 1})
    strategy = PmapStrategy(mesh) if mode == "pmap" else JitStrategy(mesh)
    config = config_lib.base_config()  # the demo's CNN and Adam
    config.parallel.mode = mode  # pmap: the model is built with BatchNorm statistics over devices
    rng = np.random.default_rng(0)
    batches = [{"image": rng.random((BATCH, 28, 28, 1), dtype=np.float32),
                "label": rng.integers(0, 10, BATCH).astype(np.int32)} for _ in range(4)]
    objective, tx, state = build_model_and_state(config, 10, {"image": batches[0]["image"][:1]}, mesh)
    state = strategy.init_state(state)
    state = strategy.to_device(state)
    step = strategy.train_step(make_train_step(objective.loss, tx, axis_name=strategy.axis_name))
    t0 = time.perf_counter()
    state, metrics = step(state, strategy.put_batch(batches[0]))
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    for i in range(WARMUP):
        state, metrics = step(state, strategy.put_batch(batches[i % 4]))
    jax.block_until_ready(metrics)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for i in range(STEPS):
            state, metrics = step(state, strategy.put_batch(batches[i % 4]))
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / STEPS)
    return {"mode": mode, "devices": jax.device_count(), "step_ms": 1e3 * min(times), "first_step_s": first_s}


def _measure(mode: str, devices: int, timeout: float) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the python process itself
        proc.communicate()
        raise RuntimeError(f"parallel_bench: {mode} on {devices} devices took over {timeout:.0f} s") from None
    if proc.returncode:
        raise RuntimeError(f"parallel_bench: {mode} on {devices} devices failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run(timeout_s: float = 110.0) -> dict:
    """``{'jit_1dev_ms', 'jit_8dev_ms', 'pmap_8dev_ms', ratios...}``; each subprocess bounded in time."""
    deadline = time.monotonic() + timeout_s
    res = {}
    for i, (mode, devices) in enumerate(CONFIGS):
        left = deadline - time.monotonic() - 15.0 * (len(CONFIGS) - 1 - i)  # keep 15 s for each one after
        res[f"{mode}_{devices}dev"] = _measure(mode, devices, max(10.0, left))
    out = {f"{k}_ms": round(v["step_ms"], 3) for k, v in res.items()}
    out.update({f"{k}_first_step_s": round(v["first_step_s"], 2) for k, v in res.items()})
    out["ratio_jit_8dev_vs_1dev"] = round(res["jit_8dev"]["step_ms"] / res["jit_1dev"]["step_ms"], 3)
    out["ratio_pmap_vs_jit_8dev"] = round(res["pmap_8dev"]["step_ms"] / res["jit_8dev"]["step_ms"], 3)
    out.update(model="cnn (demo)", input="28x28x1", global_batch=BATCH, steps=STEPS,
               devices="fake CPU devices sharing the host's cores")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        import logging

        logging.disable(logging.INFO)
        print(json.dumps(_worker(sys.argv[2])))
    else:
        print(json.dumps(run(), indent=2))
