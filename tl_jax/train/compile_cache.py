"""JAX's persistent compilation cache, so repeated runs of a config do not recompile."""
from __future__ import annotations

import os
import pathlib

import jax

_enabled: str | None = None


def default_dir() -> str:
    return os.environ.get("TL_JAX_COMPILE_CACHE") or str(pathlib.Path.home() / ".cache" / "tl_jax" / "jax")


def enable(directory: str | None = None) -> str:
    """Cache every compiled program in ``directory`` (default ``$TL_JAX_COMPILE_CACHE``
    or ``~/.cache/tl_jax/jax``); idempotent. Returns the directory used."""
    global _enabled
    directory = directory or default_dir()
    if _enabled != directory:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _enabled = directory
    return directory
