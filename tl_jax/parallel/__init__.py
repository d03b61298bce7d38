"""Devices and hosts: the mesh, sharded jit / pmap strategies, data per process, multi-host init.

* :mod:`tl_jax.parallel.mesh`: the ``('data', 'model')`` mesh, batch and FSDP shardings;
* :mod:`tl_jax.parallel.choose`: :func:`make_strategy` (``config.parallel.mode``);
* :mod:`tl_jax.parallel.strategy`: the strategy interface and the jit strategy;
* :mod:`tl_jax.parallel.pmap`: the ``jax.pmap`` strategy;
* :mod:`tl_jax.parallel.data`: which rows of the global batch each process reads;
* :mod:`tl_jax.parallel.distributed`: ``jax.distributed.initialize`` from the config or the environment.
"""
from tl_jax.parallel.choose import make_strategy
from tl_jax.parallel.strategy import JitStrategy, Strategy

__all__ = ["JitStrategy", "Strategy", "make_strategy"]
