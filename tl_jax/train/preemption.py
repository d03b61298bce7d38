"""Graceful preemption and fault injection.

SIGTERM (what TPU/GPU schedulers send before preempting) and SIGINT (Ctrl-C)
do not kill the run: :class:`StopSignal` records them, the loop finishes the
current step, saves a checkpoint, waits for it to be complete and raises
:class:`Preempted`; the CLI prints where the checkpoint is and exits with
128 + the signal number. On several hosts the stop point is agreed on with
``multihost_utils.reached_preemption_sync_point`` so every process saves the
same step.

``TL_JAX_FAULT`` injects faults for the reliability tests (never set it in real
runs): ``kill_after_step=K`` SIGKILLs the process right after step K, and
``kill_during_save=K`` right after the (async) save of step K has started.
"""
from __future__ import annotations

import os
import signal
import time
import threading

import jax


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignal:
    """Records SIGTERM/SIGINT while installed (a context manager)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """True when this step is where every process stops."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step)) or self.signum is not None
        return self.signum is not None


def _fault(kind: str) -> int | None:
    spec = os.environ.get("TL_JAX_FAULT", "")
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key.strip() == kind and value.strip().isdigit():
            return int(value)
    return None


def maybe_kill(kind: str, step: int) -> None:
    """SIGKILL this process if ``TL_JAX_FAULT`` asks for it at ``step``."""
    if _fault(kind) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_pause(step: int) -> None:
    """Sleep ``TL_JAX_FAULT``'s ``pause_s`` seconds (default 60) after ``pause_after_step`` (tests: a live run)."""
    if _fault("pause_after_step") == step:
        time.sleep(_fault("pause_s") or 60)
