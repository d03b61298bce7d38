"""Sweep points as tasks: ``tl-jax sweep --list``, ``--index K|auto`` and ``--shard I/N``.

An array job (SLURM ``--array``, a Kubernetes indexed Job) starts one task per
index; each task runs its point(s) of the sweep into the shared study dir:

* ``--index K`` runs point K (0-based, the order of ``get_sweep``); ``--index
  auto`` reads K from ``SLURM_ARRAY_TASK_ID``, else ``JOB_COMPLETION_INDEX``
  (``TPU_WORKER_ID`` is not used: it numbers the hosts of one multi-host run);
* ``--shard I/N`` runs the points ``i`` with ``i % N == I``, in phase order.

Both are idempotent, so a retried or restarted task is safe: a finished point
(``summary.json``) is skipped, a running one (its workdir lock names a live
process, :mod:`tl_jax.sweep.status`) is left alone with a log line, any other
one trains, resuming from its newest checkpoint. The task holds the point's
workdir lock from the "is it finished?" check to the end of its training, so
two tasks never train one point. A point whose training raises gets
``ROOT/<name>/failed.json`` and status ``failed`` (a later task retries it;
the record is removed once it finishes); the task goes on with its other
points and exits with an error naming the failed ones.

Phases: before a point of phase k trains, every point of a lower phase must
be finished. Until then the task waits, polling every ``poll_s`` seconds with a
log line, or with ``wait=False`` raises :class:`NotReady` (the CLI exits with
``EX_TEMPFAIL`` = 75, or ``--no-wait-code``). A failed lower-phase point is an
error (nothing would ever finish it).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time

from tl_jax.sweep import spec as spec_lib
from tl_jax.sweep import status as status_lib
from tl_jax.sweep.runner import SweepError, SweepPoint, load_points, resolve, write_point_json
from tl_jax.train import lock as workdir_lock

log = logging.getLogger("tl_jax")
EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, try again later"
ARRAY_VARS = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


class NotReady(Exception):
    """A point's earlier phases are not finished and the task was told not to wait."""

    def __init__(self, message: str, exit_code: int = EX_TEMPFAIL):
        super().__init__(message)
        self.exit_code = exit_code


def parse_index(text: str, n: int, environ: dict | None = None) -> int:
    """``'K'`` or ``'auto'`` (the first set variable of :data:`ARRAY_VARS`) -> K in ``[0, n)``."""
    env = os.environ if environ is None else environ
    where = "--index"
    if text == "auto":
        var = next((v for v in ARRAY_VARS if env.get(v, "").strip()), None)
        if var is None:
            raise SweepError(f"--index auto: none of {', '.join(ARRAY_VARS)} is set (run it as an array task, "
                             f"or give --index K)")
        text, where = env[var].strip(), f"--index auto ({var})"
    try:
        k = int(text)
    except ValueError:
        raise SweepError(f"{where}: expected an integer or 'auto', got {text!r}") from None
    if not 0 <= k < n:
        raise SweepError(f"{where} {k} is out of range: the sweep has {n} points (0..{n - 1})")
    return k


def parse_shard(text: str) -> tuple[int, int]:
    """``'I/N'`` -> ``(I, N)`` with ``0 <= I < N``."""
    i, sep, n = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(i), int(n)
    except ValueError:
        raise SweepError(f"--shard must be I/N (e.g. 0/4, I counted from 0), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise SweepError(f"--shard {text}: need 0 <= I < N (I counted from 0)")
    return i, n


def shard_indices(i: int, n: int, points: list[SweepPoint]) -> list[int]:
    """The indices ``k`` with ``k % n == i``, ordered by (phase, k)."""
    return sorted((k for k in range(len(points)) if k % n == i), key=lambda k: (points[k].phase, k))


def status_table(points: list[SweepPoint]) -> str:
    """``index name phase status detail`` per point, then the counts per status."""
    rows = [(str(k), p.name, str(p.phase), *status_lib.describe(p.workdir)) for k, p in enumerate(points)]
    head = ("index", "name", "phase", "status", "detail")
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(4)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "")
             for r in [head, *rows]]
    counts = {s: sum(r[3] == s for r in rows) for s in status_lib.STATUSES}
    lines.append(f"{len(points)} points: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(line.rstrip() for line in lines)


def write_plan(root: pathlib.Path, points: list[SweepPoint], config_file: str) -> None:
    """``ROOT/sweep.json`` with the point order (what the report expects), unless it already lists these points.

    Written atomically: concurrent tasks write the same content."""
    path = root / "sweep.json"
    names = [p.name for p in points]
    try:
        if list(json.loads(path.read_text()).get("points", {})) == names:
            return
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    record = {"config": config_file, "mode": "tasks",
              "points": {p.name: {"point": spec_lib.run_fields(p.point), "phase": p.phase} for p in points}}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".sweep.json.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Tasks:
    """Runs chosen points of a resolved sweep in this process (see the module docstring)."""

    def __init__(self, root: pathlib.Path, points: list[SweepPoint], *, config_file: str = "", wait: bool = True,
                 poll_s: float = 10.0, no_wait_code: int = EX_TEMPFAIL):
        self.root, self.points, self.config_file = root, points, config_file
        self.wait, self.poll_s, self.no_wait_code = wait, poll_s, no_wait_code
        self.outcome: dict[str, str] = {}

    def blockers(self, p: SweepPoint) -> list[tuple[SweepPoint, str]]:
        """Points of a lower phase than ``p`` that are not finished, with their status."""
        out = [(q, status_lib.point_status(q.workdir)) for q in self.points if q.phase < p.phase]
        return [(q, s) for q, s in out if s != "finished"]

    def wait_for_phase(self, p: SweepPoint) -> None:
        """Return once every lower-phase point is finished (or raise: not waiting, or one failed)."""
        said = 0.0
        while blocking := self.blockers(p):
            failed = [q.name for q, s in blocking if s == "failed"]
            if failed:
                raise SweepError(f"point {p.name} (phase {p.phase}) needs {', '.join(failed)}, which failed (see "
                                 f"{self.root / failed[0] / status_lib.FAILED_FILE}); rerun it with --index")
            names = ", ".join(f"{q.name} ({s})" for q, s in blocking[:5]) + (", ..." if len(blocking) > 5 else "")
            msg = (f"point {p.name} (phase {p.phase}) waits for {len(blocking)} point(s) of an earlier phase: "
                   f"{names}")
            if not self.wait:
                raise NotReady(f"{msg}; exiting with {self.no_wait_code} (--no-wait): start this task again later",
                               self.no_wait_code)
            if time.time() - said >= 60:
                log.info("sweep: %s; checking every %g s", msg, self.poll_s)
                said = time.time()
            time.sleep(self.poll_s)

    def run(self, indices: list[int]) -> dict[str, str]:
        """Run the points at ``indices`` in order; returns ``{name: outcome}``.

        Outcomes: ``trained``, ``finished`` (was already), ``running`` (left alone), ``failed``.
        Raises SweepError naming the failed points after trying every one."""
        for k in indices:
            p = self.points[k]
            if p.finished:
                log.info("sweep: skip %s (point %d, finished)", p.name, k)
                self.outcome[p.name] = "finished"
                continue
            self.wait_for_phase(p)
            write_plan(self.root, self.points, self.config_file)
            self.outcome[p.name] = self.run_point(k, p)
        failed = [n for n, o in self.outcome.items() if o == "failed"]
        if failed:
            errors = "; ".join(f"{n}: {(status_lib.read_failure(self.root / n) or {}).get('error', '?')}"
                               for n in failed)
            raise SweepError(f"{len(failed)} point(s) failed (recorded in ROOT/<name>/failed.json): {errors}")
        return self.outcome

    def run_point(self, k: int, p: SweepPoint) -> str:
        """Train point ``k`` under its workdir lock, unless it is finished or another process holds it."""
        from tl_jax.train.loop import train  # deferred: JAX + the training stack

        try:
            held = workdir_lock.acquire(p.workdir)
        except workdir_lock.WorkdirLockedError as e:
            log.info("sweep: leave %s (point %d) alone: %s", p.name, k, e)
            return "running"
        try:
            if p.finished:  # finished by another task between our first look and the lock
                log.info("sweep: skip %s (point %d, finished)", p.name, k)
                return "finished"
            write_point_json(p)
            log.info("sweep: point %d (of 0..%d): %s (phase %d)", k, len(self.points) - 1, p.name, p.phase)
            try:
                summary = train(p.config, str(p.workdir))
            except Exception as e:  # noqa: BLE001 (recorded; Preempted/KeyboardInterrupt still stop the task)
                from tl_jax.train.preemption import Preempted  # deferred: with the training stack

                if isinstance(e, Preempted):
                    raise
                path = status_lib.record_failure(p.workdir, e)
                log.error("sweep: point %s failed: %s (recorded in %s)", p.name, e, path)
                return "failed"
            status_lib.clear_failure(p.workdir)
            acc = summary.get("test/accuracy")
            print(f"[point {k}] {p.name}: " + (f"test/accuracy={acc:.4f} " if isinstance(acc, float) else "")
                  + f"({summary.get('wall_s', 0.0):.0f} s)", flush=True)
            return "trained"
        finally:
            while held.count > 1:  # a hold that train() took and did not give back (it raised while preparing)
                held.release()
            held.release()


def run_tasks(spec: str, root: str, *, index: str | None = None, shard: str | None = None, list_only: bool = False,
              overrides: list[str] = (), **kwargs) -> dict[str, str] | str:
    """``tl-jax sweep --list | --index K | --shard I/N``: the status table, or the outcome of each point run.

    Every argument is checked (and every point's config resolved) before anything is written."""
    shard_in = parse_shard(shard) if shard is not None else None
    config_file, raw = load_points(spec)
    root_dir = pathlib.Path(root).expanduser().absolute()
    points = resolve(config_file, raw, root_dir, list(overrides))
    if list_only:
        return status_table(points)
    indices = [parse_index(index, len(points))] if index is not None else shard_indices(*shard_in, points)
    if not indices:
        log.info("sweep: shard %s has no points (the sweep has %d)", shard, len(points))
    return Tasks(root_dir, points, config_file=config_file, **kwargs).run(indices)
