"""How the loop runs the pure step on the devices: sharded ``jit`` (default) or ``pmap``.

A :class:`Strategy` owns the device mesh and everything that differs between
the two modes, so the loop itself is the same for both:

==========================  ================================  ==================================
                            ``JitStrategy`` (``'jit'``)       ``PmapStrategy`` (``'pmap'``)
==========================  ================================  ==================================
state on the devices        one global array per leaf:        a leading device axis
                            replicated, or FSDP-sharded on    ``[local_devices, ...]``
                            ``model``                         (``jax.pmap`` layout)
batch on the devices        global ``[B, ...]`` sharded on    ``[local_devices, B_dev, ...]``
                            the mesh
cross-device reduction      inserted by XLA                   ``lax.pmean`` (``axis_name``),
                                                              BatchNorm statistics synced
checkpoints                 the state as is                   device 0's copy, as global arrays
==========================  ================================  ==================================

:func:`tl_jax.parallel.choose.make_strategy` builds one from ``config.parallel`` and checks the mesh.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tl_jax.parallel import mesh as mesh_lib

log = logging.getLogger("tl_jax")
PyTree = Any
MODES = ("jit", "pmap")


class Strategy:
    """The interface the loop uses; see the table in the module docstring."""

    name: str = ""
    axis_name: str | None = None  # passed to make_train_step (lax.pmean under pmap)

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def init_state(self, state: PyTree) -> PyTree:
        """The global layout of a freshly built (replicated) state: what checkpoints hold."""
        return state

    def to_device(self, state: PyTree) -> PyTree:
        """Global layout -> the layout the step takes."""
        return state

    def to_global(self, state: PyTree) -> PyTree:
        """The step's layout -> global arrays (every leaf a global ``jax.Array``, for orbax)."""
        return state

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loop_batch(self, local_batch: dict[str, np.ndarray]) -> Any:
        """A batch made in the loop's own thread, as the compiled step takes it (default: :meth:`put_batch`)."""
        return self.put_batch(local_batch)

    def train_step(self, step_fn: Callable) -> Callable:
        """``(state, batch) -> (state, metrics)`` with the metrics as scalars (one copy)."""
        raise NotImplementedError

    def eval_step(self, eval_fn: Callable) -> Callable:
        """A step returning the eval sums of the global batch (summed over devices) as scalars."""
        raise NotImplementedError

    def compile(self, fn: Callable, state: PyTree, batch: dict) -> Callable:
        """Compile ahead of the first step where the mode allows it."""
        return fn

    def fetch_state(self, tree: PyTree) -> PyTree:
        """Host numpy values of (parts of) the state in the step's layout, one copy per leaf."""
        return jax.device_get(tree)


class JitStrategy(Strategy):
    """One SPMD program over the ``('data', 'model')`` mesh."""

    name = "jit"

    def __init__(self, mesh: Mesh, fsdp_min_size: int = 2**18):
        super().__init__(mesh)
        self.fsdp_min_size = int(fsdp_min_size)
        self.replicated = mesh_lib.replicated(mesh)
        self.state_shardings: PyTree = None

    def init_state(self, state: PyTree) -> PyTree:
        self.state_shardings = mesh_lib.state_shardings(state, self.mesh, self.fsdp_min_size)
        n, size = mesh_lib.sharded_summary(self.state_shardings, state)
        if not n:
            return state
        log.info("FSDP: %d state tensors (%s elements) sharded over model=%d (config.parallel.fsdp_min_size=%d)",
                 n, f"{size:,}", self.mesh.shape[mesh_lib.MODEL], self.fsdp_min_size)
        return jax.jit(lambda s: s, out_shardings=self.state_shardings)(state)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return mesh_lib.shard_batch(local_batch, self.mesh)

    def loop_batch(self, local_batch: dict[str, np.ndarray]) -> Any:
        # One process: the numpy batch as it is; the compiled step places it by its input shardings
        # inside the call (0.09 ms of host time per demo step, against 0.28 ms for a device_put first).
        return local_batch if jax.process_count() == 1 else self.put_batch(local_batch)

    def train_step(self, step_fn: Callable) -> Callable:
        state_out = self.state_shardings if self.state_shardings is not None else self.replicated
        return jax.jit(step_fn, donate_argnums=0, out_shardings=(state_out, self.replicated))

    def eval_step(self, eval_fn: Callable) -> Callable:
        return jax.jit(eval_fn, out_shardings=self.replicated)

    def compile(self, fn: Callable, state: PyTree, batch: dict) -> Callable:
        if any(isinstance(v, np.ndarray) for v in jax.tree.leaves(batch)):  # a loop_batch: lower it sharded
            sharding = mesh_lib.batch_sharding(self.mesh)  # (device arrays, e.g. a device_cache table, as placed)
            batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype),
                                                                sharding=sharding)
                                 if isinstance(v, np.ndarray) else v, batch)
        return fn.lower(state, batch).compile()
