"""Sweeps: many runs of one config file (``get_sweep``), vectorised where the swept values allow.

* :mod:`tl_jax.sweep.spec`: points, ``product``/``zip_``/``seeds``, names;
* :mod:`tl_jax.sweep.runner`: ``tl-jax sweep`` (skip, resume, ``--jobs``, ``--vectorize``);
* :mod:`tl_jax.sweep.plan`: which points can share one vmapped step;
* :mod:`tl_jax.sweep.vectorized`: that step, writing every point's workdir.
"""
from tl_jax.sweep.spec import point_name, product, seeds, zip_

__all__ = ["point_name", "product", "seeds", "zip_"]
