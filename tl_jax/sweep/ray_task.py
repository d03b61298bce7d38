"""What a Ray worker runs for one sweep point (:mod:`tl_jax.sweep.ray_executor`): the point's command.

Ray imports a task's module in the worker before running it; this one imports only the standard library
(and ``tl_jax.sweep``'s light ``__init__``), so a fresh worker starts its first point without loading JAX
and the training stack (about 3 s on 2 cores): the command's own process does that.
"""
from __future__ import annotations

import pathlib
import signal
import subprocess
import time


def run_command(cmd: list[str], log_file: str) -> float:
    """Run one point's training command, output appended to ``log_file``; returns its wall seconds.

    Raises ``RuntimeError('exit N (SIGNAME): last log line')`` on a non-zero exit, so Ray retries."""
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = pathlib.Path(log_file).read_text().strip().splitlines()[-1:] or [""]
        how = f" ({signal.Signals(-rc).name})" if -rc in signal.valid_signals() else ""
        raise RuntimeError(f"exit {rc}{how}: {tail[0][:200]}")
    return time.perf_counter() - t0
