"""Data parallelism with ``jax.jit`` over a device ``Mesh``.

The mesh has a ``data`` axis over all devices (of all processes). The global
batch ``[B, ...]`` is sharded along ``data`` (``NamedSharding(mesh, P('data'))``)
and built from each process's local slice with
``jax.make_array_from_process_local_data``; the train state is replicated
(``P()``). Gradients of the mean loss over the global batch are then exactly the
single-device gradients; XLA inserts the all-reduce.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh named ``data`` over the first ``num_devices`` (default: all) devices."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if n < 1 or n > len(devices):
        raise ValueError(f"mesh of {n} devices requested but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]), (DATA,))


def check_batch(global_batch: int, mesh: Mesh, where: str = "config.data.batch_size") -> int:
    """Per-process batch size; errors if the global batch does not split evenly."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        raise ValueError(f"{where}={global_batch} is not divisible by the {n_dev} devices of the mesh; "
                         f"use a multiple of {n_dev}")
    return global_batch // jax.process_count()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a host/device pytree replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded on ``data`` from this process's slice of the batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
