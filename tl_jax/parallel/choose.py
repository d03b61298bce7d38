"""``make_strategy(config)``: the :class:`~tl_jax.parallel.strategy.Strategy` that ``config.parallel`` names.

``'jit'``: :class:`~tl_jax.parallel.strategy.JitStrategy` (one program sharded over the mesh, FSDP over
``model``); ``'pmap'``: :class:`~tl_jax.parallel.pmap.PmapStrategy`. Checks the mesh and that every
process has the same number of devices.
"""
from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.pmap import PmapStrategy
from tl_jax.parallel.strategy import MODES, JitStrategy, Strategy

log = logging.getLogger("tl_jax")


def make_strategy(config: ml_collections.ConfigDict) -> Strategy:
    """The strategy of ``config.parallel`` over all devices of all processes."""
    pc = config.parallel
    if pc.mode not in MODES:
        raise ValueError(f"config.parallel.mode must be one of {MODES}, got {pc.mode!r}")
    mesh = mesh_lib.build_mesh(dict(pc.mesh))
    counts = {jax.local_device_count()}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = set(np.asarray(multihost_utils.process_allgather(np.int32(jax.local_device_count()))).ravel())
    if len(counts) > 1:
        raise ValueError(f"every process needs the same number of devices, got {sorted(counts)}")
    if pc.mode == "pmap":
        if mesh.shape[mesh_lib.MODEL] != 1:
            raise ValueError(f"config.parallel.mesh.model={mesh.shape[mesh_lib.MODEL]}: param sharding over "
                             f"'model' needs config.parallel.mode='jit'")
        strategy: Strategy = PmapStrategy(mesh)
    else:
        if pc.fsdp_min_size < 1:
            raise ValueError(f"config.parallel.fsdp_min_size must be >= 1, got {pc.fsdp_min_size}")
        strategy = JitStrategy(mesh, pc.fsdp_min_size)
    log.info("parallel: mode=%s mesh=%s over %d devices, %d process(es)", pc.mode, dict(mesh.shape),
             mesh.devices.size, jax.process_count())
    return strategy
