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


# jax.monitoring duration events that together are "compiling": tracing to a jaxpr, lowering to
# MLIR, and the backend compile (or the persistent-cache load that replaces it).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileTimer:
    """Context manager summing the seconds JAX spends compiling while it is open (any jit, any thread).

    ``with CompileTimer() as ct: ...; ct.seconds`` -> trace + lower + compile (or cache-load) time,
    e.g. to report ``compile_s`` apart from ``train_s``.
    """

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:  # noqa: ARG002
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.count += event == COMPILE_EVENTS[-1]

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
