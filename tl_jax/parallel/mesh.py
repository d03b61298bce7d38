"""Data parallelism with ``jax.jit`` over a device ``Mesh`` (+ FSDP-style param sharding).

The mesh has two named axes, ``data`` and ``model`` (``config.parallel.mesh``,
e.g. ``{'data': -1, 'model': 1}``; ``-1`` = all remaining devices), laid over
all devices of all processes. The global batch ``[B, ...]`` is sharded along
both axes (``NamedSharding(mesh, P(('data', 'model')))``: every device gets
``B / num_devices`` distinct rows) and built from each process's local slice
with ``jax.make_array_from_process_local_data``. The train state is replicated
(``P()``), except that with ``model > 1`` every state leaf with at least
``config.parallel.fsdp_min_size`` elements (big kernels, their optimizer
moments) is split along one of its dimensions over ``model`` (FSDP / ZeRO-3
style: XLA all-gathers the weights for the forward pass and reduce-scatters
their gradients). Gradients of the mean loss over the global batch are then
exactly the single-device gradients (up to float summation order); XLA
inserts the collectives.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh named ``data`` over the first ``num_devices`` (default: all) devices."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if n < 1 or n > len(devices):
        raise ValueError(f"mesh of {n} devices requested but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]), (DATA,))


def mesh_shape(axes: Mapping[str, int], num_devices: int, where: str = "config.parallel.mesh") -> dict[str, int]:
    """Resolve ``{'data': -1, 'model': 2}`` against ``num_devices``; errors name ``where``."""
    axes = dict(axes)
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"{where} has unknown axes {unknown}; the axes are {list(AXES)}")
    sizes = {a: int(axes.get(a, 1)) for a in AXES}
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"{where}={sizes}: axis sizes must be >= 1 or -1 (all remaining devices), got {bad}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"{where}={sizes}: at most one axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{where}={sizes}: the {num_devices} devices do not split into groups of {fixed} "
                             f"(the product of the other axis sizes)")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"{where}={sizes} spans {fixed} devices but there are {num_devices}; make the product of "
                         f"the axis sizes {num_devices}, or set one axis to -1")
    return sizes


def build_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
               where: str = "config.parallel.mesh") -> Mesh:
    """The 2-D ``('data', 'model')`` mesh over ``devices`` (default: all devices of all processes).

    Devices are laid out process-major (``jax.devices()`` order), so each process
    owns a contiguous block of rows of the global batch; on TPU the order follows
    the physical topology (``mesh_utils.create_device_mesh``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices), where)
    shape = (sizes[DATA], sizes[MODEL])
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


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
    """Leading (batch) dimension split over every axis of the mesh."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a host/device pytree replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded on the batch axis from this process's slice of the batch."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # the local batch is the global one: one device_put (half the host time)
        return jax.device_put(local_batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of a pytree of (possibly sharded, multi-process) arrays; every process gets all of it."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def fsdp_spec(shape: Sequence[int], model_size: int, min_size: int) -> P:
    """``P()`` or a spec splitting the largest dimension divisible by ``model_size`` over ``model``.

    Leaves smaller than ``min_size`` elements (biases, norms, scalars) stay
    replicated; ties go to the last dimension (a kernel's output features).
    """
    if model_size == 1 or not shape or math.prod(shape) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % model_size == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda i: (shape[i], i))
    return P(*[MODEL if i == dim else None for i in range(len(shape))])


def state_shardings(tree: PyTree, mesh: Mesh, min_size: int) -> PyTree:
    """A ``NamedSharding`` per leaf: FSDP over ``model`` for big leaves, replicated otherwise."""
    model_size = mesh.shape.get(MODEL, 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), model_size, min_size)), tree)


def sharded_summary(shardings: PyTree, tree: PyTree) -> tuple[int, int]:
    """``(tensors, elements)`` of ``tree`` that ``shardings`` split over ``model``."""
    n, size = 0, 0
    for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(tree)):
        if any(p is not None for p in s.spec):
            n, size = n + 1, size + int(np.prod(np.shape(x)))
    return n, size
