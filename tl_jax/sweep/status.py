"""The status of a sweep point, read from its sub-workdir alone (no JAX, nothing written but failure records).

A point ``ROOT/<name>`` is, in this order of precedence:

* ``finished``: its ``summary.json`` exists;
* ``running``: its workdir lock (``.lock.0``, :mod:`tl_jax.train.lock`) names a live process (on this
  host: the pid exists; on another host: a heartbeat younger than ``lock.STALE_S``);
* ``failed``: the sweep recorded a failure in ``failed.json`` (``{"error", "host", "pid", "time",
  "traceback"}``), written when the point's training raised and removed when it later finishes;
* ``pending``: anything else, never started or stopped by a signal or a kill (it resumes from its newest
  checkpoint, ``step`` in :func:`describe`).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import time
import traceback

from tl_jax.train import lock as workdir_lock

FAILED_FILE = "failed.json"
STATUSES = ("pending", "running", "finished", "failed")


def point_status(workdir: str | pathlib.Path) -> str:
    """One of :data:`STATUSES` for the point trained into ``workdir``."""
    wd = pathlib.Path(workdir)
    if (wd / "summary.json").is_file():
        return "finished"
    if workdir_lock.holder(wd) is not None:
        return "running"
    if (wd / FAILED_FILE).is_file():
        return "failed"
    return "pending"


def latest_step(workdir: str | pathlib.Path) -> int | None:
    """The newest complete checkpoint step of ``workdir`` (a numbered folder of ``checkpoints/``), or None."""
    ckpts = pathlib.Path(workdir) / "checkpoints"
    steps = [int(d.name) for d in ckpts.iterdir() if d.is_dir() and d.name.isdigit()] if ckpts.is_dir() else []
    return max(steps, default=None)


def read_failure(workdir: str | pathlib.Path) -> dict | None:
    try:
        return json.loads((pathlib.Path(workdir) / FAILED_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(workdir: str | pathlib.Path) -> tuple[str, str]:
    """``(status, detail)``: the holder of a running point, the error of a failed one, the step to resume."""
    status = point_status(workdir)
    if status == "running":
        h = workdir_lock.holder(workdir) or {}
        return status, f"pid {h.get('pid')} on {h.get('host')}"
    if status == "failed":
        return status, str((read_failure(workdir) or {}).get("error", ""))[:120]
    step = latest_step(workdir)
    if status == "pending" and step is not None:
        return status, f"resumes from step {step}"
    return status, ""


def record_failure(workdir: str | pathlib.Path, error: BaseException) -> pathlib.Path:
    """Write ``failed.json`` for a point whose training raised ``error`` (atomically); returns its path."""
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    record = {"error": f"{type(error).__name__}: {error}".splitlines()[0], "host": socket.gethostname(),
              "pid": os.getpid(), "time": time.time(),
              "traceback": "".join(traceback.format_exception(error))[-4000:]}
    tmp = wd / f".{FAILED_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, wd / FAILED_FILE)
    return wd / FAILED_FILE


def clear_failure(workdir: str | pathlib.Path) -> None:
    (pathlib.Path(workdir) / FAILED_FILE).unlink(missing_ok=True)
