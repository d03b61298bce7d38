"""One run per workdir: a lock file held by the process that trains into it.

``DIR/.lock.<process_index>`` (one per process of a multi-host run) holds the
holder's ``{"host", "pid", "started"}`` and is held with ``fcntl.flock`` for
the life of the run, and its mtime is refreshed every ``HEARTBEAT_S`` by a
daemon thread. A second process that wants the workdir is refused in one line
naming the holder when

* the flock is taken (a live process on this host, or on a file system that
  shares flocks between hosts), or
* the file names another host whose heartbeat is younger than ``STALE_S``
  (flocks are not shared over every network file system).

Otherwise the lock is free or was left by a dead process (the kernel drops a
flock when its process dies; a silent host stops its heartbeat): it is taken
over, with a warning naming the old holder. Releasing empties the file.

Within one process the lock is re-entrant (a script that trains the same
workdir twice, or a sweep that prepares a point and later runs it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any

log = logging.getLogger("tl_jax")
HEARTBEAT_S = 30.0
STALE_S = 120.0  # another host's lock without a heartbeat for this long is taken over
_HELD: dict[pathlib.Path, "WorkdirLock"] = {}


class WorkdirLockedError(ValueError):
    """The workdir is being trained into by another live process."""


def lock_path(workdir: str | pathlib.Path, process_index: int = 0) -> pathlib.Path:
    return pathlib.Path(workdir).expanduser().absolute() / f".lock.{process_index}"


def _holder_text(info: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')!r} (started {started})"


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {"raw": raw}


class WorkdirLock:
    """The lock of one workdir for one process index (use :func:`acquire`)."""

    def __init__(self, path: pathlib.Path, fd: int):
        self.path, self.fd, self.count = path, fd, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tl_jax-workdir-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the workdir was removed under us: nothing to refresh
                return

    def release(self) -> None:
        """Drop one hold; the last one empties the file and unlocks it."""
        self.count -= 1
        if self.count > 0:
            return
        self._stop.set()
        _HELD.pop(self.path, None)
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def acquire(workdir: str | pathlib.Path, process_index: int = 0) -> WorkdirLock:
    """Hold ``workdir``'s lock for this process (creating the workdir if needed).

    Raises:
        WorkdirLockedError: another live process holds it (named in the message).
    """
    path = lock_path(workdir, process_index)
    if path in _HELD:
        _HELD[path].count += 1
        return _HELD[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(f"--workdir {path.parent} is in use by {_holder_text(_read(fd))}: "
                                     f"wait for it to finish or stop it (lock {path})") from None
        old = _read(fd)
        host = socket.gethostname()
        age = time.time() - os.fstat(fd).st_mtime
        if old and old.get("host") not in (None, host) and age < STALE_S:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise WorkdirLockedError(
                f"--workdir {path.parent} is in use by {_holder_text(old)} (heartbeat {age:.0f} s ago; "
                f"taken over after {STALE_S:.0f} s without one; lock {path})")
        if old:
            log.warning("workdir lock %s was left by %s, which is gone; taking it over", path, _holder_text(old))
        me = {"host": host, "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    lock = WorkdirLock(path, fd)
    _HELD[path] = lock
    return lock


def holder(workdir: str | pathlib.Path, process_index: int = 0) -> dict[str, Any] | None:
    """Who trains into ``workdir`` now, read without locking: ``{"host", "pid", "started", "heartbeat_s"}`` or None.

    Read-only on purpose (no flock probe: a probe could make a concurrent :func:`acquire` fail). A holder is
    live when the lock file names a process that still exists on this host, or another host whose heartbeat
    (the file's mtime) is younger than ``STALE_S``; an empty file (released) or a dead holder gives None.
    """
    path = lock_path(workdir, process_index)
    try:
        raw = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    try:
        info = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return None
    if not isinstance(info, dict) or not info:
        return None
    if info.get("host") == socket.gethostname():
        pid = info.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return None
        try:
            os.kill(pid, 0)  # signal 0: does the process exist?
        except (ProcessLookupError, OverflowError):
            return None
        except PermissionError:  # exists, owned by another user
            pass
    elif age >= STALE_S:
        return None
    return {**info, "heartbeat_s": age}
