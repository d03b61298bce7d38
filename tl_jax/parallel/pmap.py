"""``config.parallel.mode = 'pmap'``: the same pure step under ``jax.pmap``.

For users with pmap-era code. The step is built with ``axis_name='data'``, so
gradients, batch statistics and metrics are averaged over all devices (of all
processes) with ``lax.pmean`` (see :func:`tl_jax.train.step.make_train_step`),
and BatchNorm layers compute their statistics over the whole global batch
(``norm_axis_name``, set when the model is built: :func:`tl_jax.train.build.pmap_link`), which makes the update identical to the single-device
one on the same global batch (up to float summation order). Dropout masks
differ (each device folds its index into the step's rng).

Layouts: the state carries a leading axis of ``jax.local_device_count()``
copies (one per local device); a process's batch ``[B_local, ...]`` becomes
``[local_devices, B_local / local_devices, ...]``. Checkpoints are written from
device 0's copy turned into global replicated arrays
(:meth:`PmapStrategy.to_global`), in the same format as jit mode (``init_from``
works across modes). Metrics and eval sums, the same on every device after
``pmean`` / ``psum``, come back once (``out_axes=None``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.strategy import Strategy

PyTree = Any
AXIS = mesh_lib.DATA


def replicate(tree: PyTree, devices: list[jax.Device]) -> PyTree:
    """``x -> [len(devices), *x.shape]``, copy ``i`` on ``devices[i]`` (the pmap layout).

    ``x`` may be a global array (its local copy is used), a host array or a scalar.
    """
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))

    def one(x: Any) -> jax.Array:
        local = x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)
        copies = [jax.device_put(local[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *local.shape), sharding, copies)

    return jax.tree.map(one, tree)


def unreplicate_global(tree: PyTree, mesh: Mesh) -> PyTree:
    """Pmap layout -> global arrays replicated over ``mesh`` (each device keeps its own copy)."""
    sharding = mesh_lib.replicated(mesh)

    def one(x: jax.Array) -> jax.Array:
        shape = x.shape[1:]
        by_device = {s.device: s.data for s in x.addressable_shards}
        arrays = [by_device[d].reshape(shape) for d in sharding.addressable_devices]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    return jax.tree.map(one, tree)


class PmapStrategy(Strategy):
    """``jax.pmap`` over the local devices; collectives span every process's devices."""

    name = "pmap"
    axis_name = AXIS

    def __init__(self, mesh: Mesh):
        super().__init__(mesh)
        self.devices = jax.local_devices()
        self.n = len(self.devices)
        self.local_sharding = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))

    def to_device(self, state: PyTree) -> PyTree:
        return replicate(state, self.devices)

    def to_global(self, state: PyTree) -> PyTree:
        return unreplicate_global(state, self.mesh)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for key, value in local_batch.items():
            value = np.asarray(value)
            if value.shape[0] % self.n:
                raise ValueError(f"batch of {value.shape[0]} rows does not split over {self.n} local devices; "
                                 f"config.data.batch_size must be a multiple of the device count")
            out[key] = jax.device_put(value.reshape(self.n, value.shape[0] // self.n, *value.shape[1:]),
                                      self.local_sharding)
        return out

    def train_step(self, step_fn: Callable) -> Callable:
        # Metrics are pmean-ed, hence the same on every device: returned once (out_axes=None).
        return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=0, out_axes=(0, None))

    def eval_step(self, eval_fn: Callable) -> Callable:
        return jax.pmap(lambda state, batch: jax.lax.psum(eval_fn(state, batch), AXIS), axis_name=AXIS,
                        out_axes=None)

    def compile(self, fn: Callable, state: PyTree, batch: dict) -> Callable:
        # A pmap-ed function cannot be called through ``.lower().compile()`` (its host-local <-> global
        # conversion lives in the wrapper), and compiling that way does not fill the cache its first call
        # uses: it compiles in its first step (the summary's ``compile_s`` is 0, ``train_s`` includes it).
        return fn

    def fetch_state(self, tree: PyTree) -> PyTree:
        return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree))
