"""Run by tests/test_parallel.py in a subprocess with 8 fake CPU devices; prints one JSON line.

``python tests/parallel_worker.py steps``: trains the tiny CNN and a tiny ResNet-18 (BatchNorm,
base_width 4, cifar stem, 8x8 inputs) for 10 steps of SGD on fixed synthetic batches from the same
initial state with each strategy: one device, sharded jit over 8 devices, pmap over 8 devices and
(CNN) jit over a 4x2 ('data', 'model') mesh with FSDP param sharding; reports the largest param /
batch-stat difference to the one-device run and the last metrics.

``python tests/parallel_worker.py train DATA_DIR WORKDIR``: the tiny CLI config through
``train()`` in jit and pmap mode (pmap also resumed from its step-4 checkpoint), plus the
config errors that need 8 devices.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np

from tl_jax import config as config_lib
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.pmap import PmapStrategy
from tl_jax.parallel import make_strategy
from tl_jax.parallel.strategy import JitStrategy
from tl_jax.train import compile_cache
from tl_jax.train.build import pmap_model
from tl_jax.train.loop import build_model_and_state, train
from tl_jax.train.step import make_train_step

TINY = "tests/configs/tiny.py"


def model_config(name: str) -> config_lib.ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.model.name = name
    if name == "resnet18":
        c.model.kwargs = {"base_width": 4, "stem": "cifar"}
    c.optimizer.name = "sgd"  # with a small step, so float differences do not grow chaotically
    c.optimizer.learning_rate = 0.01
    return c


def strategies(fsdp: bool) -> dict:
    one = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    out = {"single": JitStrategy(one), "jit8": JitStrategy(mesh_lib.build_mesh({"data": -1, "model": 1})),
           "pmap8": PmapStrategy(mesh_lib.build_mesh({"data": -1, "model": 1}))}
    if fsdp:
        out["fsdp4x2"] = JitStrategy(mesh_lib.build_mesh({"data": 4, "model": 2}), fsdp_min_size=64)
    return out


def run_steps(objective, tx, host_state, strategy, batches: list[dict]) -> tuple[dict, dict]:
    """10 steps from ``host_state`` under ``strategy``; the final variables and metrics on the host."""
    if strategy.name == "pmap":  # what config.parallel.mode='pmap' builds: BatchNorm statistics over devices
        objective = objective.replace(model=pmap_model(objective.model))
    state = strategy.init_state(mesh_lib.replicate(host_state, strategy.mesh))
    state = strategy.to_device(state)
    step = strategy.train_step(make_train_step(objective.loss, tx, axis_name=strategy.axis_name))
    for batch in batches:
        state, metrics = step(state, strategy.put_batch(batch))
    final = jax.device_get(strategy.to_global(state))
    return {"params": final.params, "batch_stats": final.batch_stats}, jax.device_get(metrics)


def max_diff(a, b) -> float:
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
    return max(diffs) if diffs else 0.0


def cmd_steps() -> dict:
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                "label": rng.integers(0, 10, size=16).astype(np.int32)} for _ in range(10)]
    out = {}
    for name in ("cnn", "resnet18"):
        one = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
        objective, tx, state = build_model_and_state(model_config(name), 10, {"image": batches[0]["image"][:1]}, one)
        host = jax.device_get(state)
        runs = {k: run_steps(objective, tx, host, s, batches) for k, s in strategies(name == "cnn").items()}
        ref, ref_metrics = runs["single"]
        out[name] = {"moved": max_diff(ref["params"], host.params), "ref_loss": float(ref_metrics["train/loss"]),
                     "has_batch_stats": bool(jax.tree.leaves(ref["batch_stats"]))}
        for key, (tree, metrics) in runs.items():
            if key != "single":
                out[name][key] = {"diff": max_diff(ref, tree), "loss": float(metrics["train/loss"])}
    return out


def tiny(data_dir: str, **parallel) -> config_lib.ml_collections.ConfigDict:
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    for k, v in parallel.items():
        config_lib.set_value(c, f"parallel.{k}", v)
    return c


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def cmd_train(data_dir: str, workdir: str) -> dict:
    strip = lambda s: {k: v for k, v in s.items() if not k.endswith("_s")}  # noqa: E731
    out = {"jit": strip(train(tiny(data_dir), os.path.join(workdir, "jit")))}
    pm = os.path.join(workdir, "pmap")
    out["pmap"] = strip(train(tiny(data_dir, mode="pmap"), pm))
    out["pmap_checkpoints"] = sorted(os.listdir(os.path.join(pm, "checkpoints")))
    shutil.rmtree(os.path.join(pm, "checkpoints", "8"))
    os.remove(os.path.join(pm, "summary.json"))
    out["pmap_resumed"] = strip(train(tiny(data_dir, mode="pmap"), pm))
    crops = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14},
             {"op": "random_crop", "size": 14, "pad": 2}, {"op": "flip_lr"}]
    for mode in (False, True):  # config.data.device_cache: batches made in the sharded step vs on the host
        c = tiny(data_dir)
        c.data.train_pp, c.data.device_cache = crops, mode
        out[f"jit_crops_device_{mode}"] = strip(train(c, os.path.join(workdir, f"crops_{mode}")))
    bad = os.path.join(workdir, "bad")
    out["errors"] = {
        "mesh": error_of(lambda: train(tiny(data_dir, mesh={"data": 3, "model": 1}), bad)),
        "pmap_model": error_of(lambda: make_strategy(tiny(data_dir, mode="pmap", mesh={"data": 4, "model": 2}))),
        "batch": error_of(lambda: train(config_lib.apply_overrides(tiny(data_dir), ["data.batch_size=12"]), bad)),
        "bad_written": os.path.exists(bad)}
    return out


if __name__ == "__main__":
    compile_cache.enable()  # $TL_JAX_COMPILE_CACHE (set by conftest.py): reruns skip compiling
    assert jax.device_count() == 8, jax.devices()
    result = cmd_steps() if sys.argv[1] == "steps" else cmd_train(sys.argv[2], sys.argv[3])
    print("RESULT " + json.dumps(result))
