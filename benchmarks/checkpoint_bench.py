"""Goal 1's remaining cost, the checkpoint: what one orbax save of the demo's train state costs, and what it scales with.

The demo's train state (CNN, Adam: params, both moments, counters, rng) is saved
by :class:`tl_jax.train.checkpoint.Checkpoints` (orbax, asynchronous) and waited
for, several times; the figure is the process CPU time per save (all threads:
orbax's writer threads compete with XLA's for the same cores). Two controls
with the same code path separate the per-save, per-array and per-byte costs
(``cpu_ms = fixed + per_array * arrays + per_mb * MB``, through the three points):

* ``same bytes, 3 arrays``: the state's arrays concatenated into three;
* ``same arrays, 1 % bytes``: every array cut to 1 % of its elements.

A fourth, ``demo state, zstd``, saves the state with ``config.train.checkpoint_compression``
(orbax's default codec, off in tl_jax): its CPU and its bytes on disk against the plain save's.

Variants are interleaved save by save, so a load swing hits all of them.
"""
from __future__ import annotations

import pathlib
import tempfile
import time

import numpy as np

from benchmarks.common import ROOT

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")
SAVES = 8
ZSTD = "demo state, zstd"


def demo_state():
    """The demo source stage's TrainState (device arrays), built as the loop builds it, its float arrays then
    filled with Gaussian noise of their own scale: a trained state's bytes (at init, Adam's moments are zeros,
    which zstd shrinks to nothing; mid-training they compress like noise)."""
    from tl_jax.cli import resolve_config
    from tl_jax.parallel import mesh as mesh_lib
    from tl_jax.train.loop import build_model_and_state

    config = resolve_config(f"{DEMO}:stage=source", [])
    sample = {"image": np.zeros((1, 28, 28, 1), np.float32), "label": np.zeros((1,), np.int32)}
    mesh = mesh_lib.build_mesh(dict(config.parallel.mesh))
    import jax
    import jax.numpy as jnp

    state = build_model_and_state(config, 10, sample, mesh)[2]
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    noisy = [(jax.random.normal(k, x.shape, x.dtype) * (jnp.std(x) + 1e-3)).astype(x.dtype)
             if jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1 else x for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noisy)


def variants(state) -> dict:
    """``{name: pytree}``: the state, its bytes in 3 arrays, and its arrays at 1 % of the bytes."""
    import jax
    import jax.numpy as jnp

    leaves = [x for x in jax.tree.leaves(state) if x.size]
    flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])
    thirds = dict(zip("abc", jnp.array_split(flat, 3)))
    small = [x.reshape(-1)[: max(1, x.size // 100)] for x in leaves]
    return {"demo state": state, "same bytes, 3 arrays": thirds, "same arrays, 1 % bytes": small}


def run() -> dict:
    """CPU ms per save (median over ``SAVES``) of each variant, with its array count and MB."""
    import jax

    from tl_jax.train.checkpoint import Checkpoints

    trees = variants(demo_state())
    solve = list(trees)  # the three points of the cost model
    trees[ZSTD] = trees["demo state"]
    root = tempfile.mkdtemp(prefix="tl_jax_bench_ckpt_")
    ckpts = {name: Checkpoints(f"{root}/{i}", keep=2, compression=name == ZSTD) for i, name in enumerate(trees)}
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    for step in range(1, SAVES + 2):  # the first save of each (orbax's first-use costs) is not counted
        for name, tree in trees.items():
            jax.block_until_ready(tree)
            c0 = time.process_time()
            ckpts[name].save(step, tree, {"iterator": "{}", "pending_metrics": []})
            ckpts[name].wait()
            if step > 1:
                cpu[name].append(time.process_time() - c0)
    for c in ckpts.values():
        c.close()
    out = {}
    for i, (name, tree) in enumerate(trees.items()):
        leaves = jax.tree.leaves(tree)
        on_disk = sum(p.stat().st_size for p in pathlib.Path(f"{root}/{i}/{SAVES + 1}/state").rglob("*") if p.is_file())
        out[name] = {"arrays": len(leaves), "mb": sum(x.nbytes for x in leaves) / 2**20,
                     "disk_mb": on_disk / 2**20, "cpu_ms": 1000 * float(np.median(cpu[name]))}
    # cpu_ms = fixed + per_array * arrays + per_mb * MB, solved through the three points.
    a = np.array([[1.0, out[k]["arrays"], out[k]["mb"]] for k in solve])
    fixed, per_array, per_mb = np.linalg.solve(a, np.array([out[k]["cpu_ms"] for k in solve]))
    return {"saves": SAVES, "variants": out, "fixed_ms": float(fixed), "ms_per_array": float(per_array),
            "ms_per_mb": float(per_mb)}


if __name__ == "__main__":
    import logging

    import tl_jax  # noqa: F401  (tl_jax's XLA:CPU defaults, before any backend starts)
    from benchmarks.common import emit

    logging.basicConfig(level=logging.WARNING)
    emit(run())
