"""Multi-host runs: ``jax.distributed.initialize`` from ``config.parallel`` or the environment.

:func:`initialize` must run before any JAX computation (and before
``jax.devices()``): the CLI calls it right after parsing the config. It decides
from ``config.parallel.distributed``:

* ``False``: never (one process);
* ``True``: always; unset values come from the config, then the environment
  (``TL_JAX_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_ADDRESS``,
  ``TL_JAX_NUM_PROCESSES``, ``TL_JAX_PROCESS_ID``), then JAX's own cluster
  auto-detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes);
* ``'auto'`` (default): as ``True`` when a coordinator address or a process
  count > 1 is given (config or environment), or a multi-task SLURM / Open MPI
  job is detected; otherwise one process. On a Cloud TPU pod, whose workers
  are found through the metadata server, set ``distributed=True``.

The launch settings (``distributed``, ``coordinator_address``,
``num_processes``, ``process_id``, timeouts) differ per process and per launch,
so :func:`run_identity` drops them from the config a workdir records.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger("tl_jax")

LAUNCH_KEYS = ("distributed", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout_s",
               "initialization_timeout_s")
_ENV = {"coordinator_address": ("TL_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("TL_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("TL_JAX_PROCESS_ID", "JAX_PROCESS_ID")}


def _from_env(key: str, environ: Mapping[str, str]) -> str | None:
    for name in _ENV[key]:
        if environ.get(name):
            return environ[name]
    return None


def _int(value: Any, key: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"config.parallel.{key} (or ${_ENV[key][0]}) must be an int, got {value!r}") from None


def cluster_detected(environ: Mapping[str, str]) -> bool:
    """A multi-task SLURM or Open MPI job (cheap env checks, no network)."""
    slurm = all(k in environ for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST"))
    if slurm and _int(environ["SLURM_NTASKS"], "num_processes") > 1:
        return True
    return "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def settings(parallel: Any, environ: Mapping[str, str] | None = None) -> dict | None:
    """``jax.distributed.initialize`` kwargs from ``config.parallel`` + env, or ``None`` (one process)."""
    environ = os.environ if environ is None else environ
    mode = parallel.distributed
    if mode not in ("auto", True, False):
        raise ValueError(f"config.parallel.distributed must be 'auto', true or false, got {mode!r}")
    if mode is False:
        return None
    addr = parallel.coordinator_address or _from_env("coordinator_address", environ)
    n = _int(parallel.num_processes if parallel.num_processes is not None
             else _from_env("num_processes", environ), "num_processes")
    pid = _int(parallel.process_id if parallel.process_id is not None
               else _from_env("process_id", environ), "process_id")
    if mode == "auto" and not (addr or (n or 1) > 1 or cluster_detected(environ)):
        return None
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"config.parallel.process_id={pid} must be in [0, num_processes={n})")
    for key in ("heartbeat_timeout_s", "initialization_timeout_s"):
        if parallel[key] < 1:
            raise ValueError(f"config.parallel.{key} must be >= 1, got {parallel[key]}")
    return dict(coordinator_address=addr, num_processes=n, process_id=pid,
                heartbeat_timeout_seconds=int(parallel.heartbeat_timeout_s),
                initialization_timeout=int(parallel.initialization_timeout_s))


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover  (private API moved)
        return False


def initialize(parallel: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Join the multi-process run if ``config.parallel`` / the environment says so; idempotent.

    Returns whether this process is part of an initialized multi-process run.
    Raises ``ValueError`` (one line) if asked to initialize after JAX has
    already started its backends in this process.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = settings(parallel, environ)
    if kwargs is None:
        return False
    if _backends_started():
        raise ValueError("config.parallel.distributed: jax.distributed.initialize must run before any JAX "
                         "computation; call tl_jax.parallel.distributed.initialize(config.parallel) first "
                         "(the tl-jax CLI does)")
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d (coordinator %s), %d local / %d global devices",
             jax.process_index(), jax.process_count(), kwargs["coordinator_address"] or "auto-detected",
             jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_identity(cfg_dict: dict) -> dict:
    """The config a workdir records and compares: without the per-launch keys of ``parallel`` and ``tracking``."""
    out = {k: v for k, v in cfg_dict.items() if k != "tracking"}  # trackers are views of a run, not its identity
    if isinstance(out.get("parallel"), dict):
        out["parallel"] = {k: v for k, v in out["parallel"].items() if k not in LAUNCH_KEYS}
    return out
