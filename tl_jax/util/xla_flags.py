"""XLA:CPU defaults that tl_jax sets in ``XLA_FLAGS`` when it is imported (before JAX starts its backend).

With jaxlib 0.10's default YNNPACK library fusions, a small CNN's train step
on XLA:CPU is slower than with XLA's own (Eigen) kernels (``BENCHMARKS.md``,
"The CPU convolution gap"). So ``import tl_jax`` appends::

    --xla_cpu_experimental_ynn_fusion_type=

(an empty list: no YNNPACK fusions) to ``XLA_FLAGS``, unless

* ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type`` (your
  setting wins), or
* ``TL_JAX_XLA_CPU_DEFAULTS=0`` is in the environment, or
* the installed jaxlib predates the flag (XLA aborts on unknown flags).

XLA reads ``XLA_FLAGS`` once, when the first backend starts: importing tl_jax
after a JAX computation has run leaves the flags as they were.
"""
from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
MIN_JAXLIB = (0, 10)  # the flag exists in jaxlib 0.10 (checked in its binary); older ones may not


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        from jaxlib import version
    except ImportError:
        return None
    parts = []
    for p in version.__version__.split(".")[:2]:
        if not p.isdigit():
            return None
        parts.append(int(p))
    return tuple(parts)


def cpu_defaults(environ: dict | None = None) -> list[str]:
    """The flags :func:`apply` would add to ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    if env.get("TL_JAX_XLA_CPU_DEFAULTS", "1") == "0":
        return []
    if YNN_FLAG.lstrip("-") in env.get("XLA_FLAGS", ""):
        return []
    version = _jaxlib_version()
    if version is None or version < MIN_JAXLIB:
        return []
    return [f"{YNN_FLAG}="]


def apply(environ: dict | None = None) -> list[str]:
    """Append :func:`cpu_defaults` to ``XLA_FLAGS``; returns the flags added."""
    env = os.environ if environ is None else environ
    added = cpu_defaults(env)
    if added:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "").strip(), *added]).strip()
    return added
