"""``tl-jax sweep``: run every point of a config file's ``get_sweep`` into ``ROOT/<name>``.

    tl-jax sweep --config experiments/freeze_depth.py[:ARG] --workdir runs/freeze [--jobs N]
        [--vectorize auto|on|off] [--config.KEY=VALUE ...]

``ARG`` goes to ``get_sweep(ARG)`` (see :mod:`tl_jax.sweep.spec` for points);
``--config.KEY=VALUE`` overrides apply to every point. Per point, in order of
``_phase``: a sub-workdir with ``summary.json`` is skipped (finished), one
without resumes from its newest checkpoint, ``point.json`` records its fields.
Points of a phase that differ only in traced numbers (:mod:`tl_jax.sweep.plan`)
may train as one vmapped step (:mod:`tl_jax.sweep.vectorized`): ``--vectorize
on`` always, ``off`` never, ``auto`` (default) after timing a few steps of
each way. The rest run one after another in this process, or with ``--jobs
N`` > 1 in up to N ``python -m tl_jax.train`` processes (logs in
``ROOT/logs/``; a point whose process fails gets ``ROOT/<name>/failed.json``,
see :mod:`tl_jax.sweep.status`). Every run uses the persistent compilation
cache. Decisions and timings go to the log and to ``ROOT/sweep.json``. Points
as array tasks (``--list``, ``--index``, ``--shard``): :mod:`tl_jax.sweep.tasks`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import pathlib
import subprocess
import sys
import time
from typing import Any

import ml_collections

from tl_jax import config as config_lib
from tl_jax.sweep import spec as spec_lib
from tl_jax.sweep.plan import STATE_KEYS, blocker, flat_config, plan_groups
from tl_jax.sweep import status as status_lib
from tl_jax.train import progress as progress_lib

log = logging.getLogger("tl_jax")
VECTORIZE = ("auto", "on", "off")


class SweepError(ValueError):
    """A sweep that cannot run, or points that failed (one line, names them)."""


@dataclasses.dataclass
class SweepPoint:
    name: str
    point: dict  # substituted, reserved keys included
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    arg: str
    overrides: list[str]

    @property
    def phase(self) -> int:
        return int(self.point.get("_phase", 0))

    @property
    def finished(self) -> bool:
        return (self.workdir / "summary.json").exists()


def _module(path: str) -> Any:
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"tl_jax_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_points(spec: str) -> tuple[str, list[dict]]:
    """``FILE[:ARG]`` -> ``(FILE, get_sweep(ARG))`` (``get_sweep()`` without an ARG)."""
    path, _, arg = spec.partition(":")
    module = _module(path)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"--config: {path} defines no get_sweep(arg); see tl_jax/sweep/spec.py")
    points = module.get_sweep(arg) if arg else module.get_sweep()
    return path, spec_lib.check_points(points, f"{path}: get_sweep")


def resolve(config_file: str, points: list[dict], root: pathlib.Path, extra: list[str] = ()) -> list[SweepPoint]:
    """Resolve and validate every point's config before anything runs (errors name the point)."""
    out = []
    for raw in spec_lib.check_points(points, f"{config_file}: points"):
        point = spec_lib.substitute(raw, str(root))
        name = spec_lib.point_name(point)
        arg, overrides = spec_lib.config_arg(point), spec_lib.overrides(point)
        try:
            config = config_lib.load_config(f"{config_file}:{arg}" if arg else config_file)
            config_lib.apply_overrides(config, overrides + list(extra))
            config_lib.validate(config)
        except ValueError as e:
            raise SweepError(f"point {name}: {e}") from None
        out.append(SweepPoint(name, point, root / name, config, arg, overrides))
    return out


def write_point_json(p: SweepPoint) -> None:
    p.workdir.mkdir(parents=True, exist_ok=True)
    fields = spec_lib.run_fields(p.point)
    if p.point.get("_report", True) is False:
        fields["_report"] = False
    (p.workdir / "point.json").write_text(json.dumps(fields, sort_keys=True) + "\n")


def _result_line(i: int, n: int, p: SweepPoint, s: dict, how: str) -> str:
    acc = s.get("test/accuracy")
    acc_s = f"test/accuracy={acc:.4f}" if isinstance(acc, float) else ""
    return f"[{i}/{n}] {p.name}: {acc_s} ({how}, {s.get('wall_s', 0.0):.0f} s)"


class Sweep:
    """Runs resolved points phase by phase; ``record`` is what ``sweep.json`` holds."""

    def __init__(self, root: pathlib.Path, points: list[SweepPoint], *, jobs: int = 1, vectorize: str = "auto",
                 probe_steps: int = 3, extra: list[str] = (), config_file: str = ""):
        if vectorize not in VECTORIZE:
            raise SweepError(f"--vectorize must be one of {VECTORIZE}, got {vectorize!r}")
        if jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {jobs}")
        self.root, self.points, self.jobs, self.vectorize = root, points, jobs, vectorize
        self.probe_steps, self.extra, self.config_file = probe_steps, list(extra), config_file
        self.record: dict = {"config": config_file, "vectorize": vectorize, "jobs": jobs, "groups": [],
                             "points": {p.name: {"point": spec_lib.run_fields(p.point), "phase": p.phase}
                                        for p in points}}
        self.done = 0
        self._timed: list[float] = []  # wall seconds of the points trained by this process, for the ETA

    def announce(self, p: SweepPoint) -> None:
        """``[k/n] name ... ETA``: before a point runs (the mean time of the points run so far x those left)."""
        left = len(self.points) - self.done
        eta = progress_lib.format_eta(sum(self._timed) / len(self._timed) * left) if self._timed else "?"
        log.info("[%d/%d] %s ... ETA %s", self.done + 1, len(self.points), p.name, eta)

    def save(self) -> None:
        (self.root / "sweep.json").write_text(json.dumps(self.record, indent=2, default=str) + "\n")

    def run(self) -> dict:
        t0 = time.time()
        self.save()  # the point order, for reports of an unfinished sweep
        for phase in sorted({p.phase for p in self.points}):
            members = [p for p in self.points if p.phase == phase]
            for p in members:
                write_point_json(p)
            todo = [p for p in members if not p.finished]
            for p in members:
                if p.finished:
                    self.done += 1
                    self.record["points"][p.name]["status"] = "skipped (finished)"
                    log.info("sweep: skip %s (summary.json exists)", p.name)
            if todo:
                self._run_phase(todo)
        self.record["wall_s"] = time.time() - t0
        self.save()
        return self.record

    def _run_phase(self, todo: list[SweepPoint]) -> None:
        sequential: list[SweepPoint] = []
        prepared: dict[str, Any] = {}
        if self.vectorize == "off" or len(todo) < 2:
            sequential = todo
        elif reason := blocker([p.config for p in todo]):
            log.info("sweep: not vectorised: %s", reason)
            sequential = todo
        else:
            groups, why = plan_groups([p.config for p in todo])
            if why:
                log.info("sweep: %s", why)
            for g in groups:
                members = [todo[i] for i in g]
                if len(members) == 1:
                    sequential += members
                    continue
                runs = self._try_vectorized(members)
                if runs is not None:  # prepared but run sequentially
                    sequential += members
                    prepared.update(zip((m.name for m in members), runs))
        self._run_sequential(sequential, prepared)

    def _try_vectorized(self, members: list[SweepPoint]) -> list | None:
        """Run ``members`` as one vmapped step if possible (and, with auto, faster); else their prepared runs."""
        from tl_jax.sweep.vectorized import CannotVectorize, VectorizedGroup, probe_sequential  # deferred: JAX
        from tl_jax.train.loop import prepare_run  # deferred: JAX + the training stack

        names = [m.name for m in members]
        entry: dict = {"points": names}
        self.record["groups"].append(entry)
        # Host batches: the vmapped step stacks the points' batches (config.data.device_cache is for one run).
        runs = [prepare_run(m.config, str(m.workdir), device_data=False) for m in members]
        try:
            group = VectorizedGroup(runs)
        except CannotVectorize as e:
            entry.update(mode="sequential", reason=str(e))
            log.info("sweep: %d points (%s, ...) run separately: %s", len(runs), names[0], e)
            return runs
        if self.vectorize == "auto":
            c_vec, t_vec = group.probe(self.probe_steps)
            c_seq, t_seq = probe_sequential(runs[0], self.probe_steps)
            n, steps = len(runs), runs[0].config.train.steps - runs[0].step0
            programs = len({json.dumps({k: v for k, v in flat_config(m.config).items() if k not in STATE_KEYS},
                                       sort_keys=True, default=str) for m in members})
            est_vec, est_seq = c_vec + steps * t_vec, programs * c_seq + n * steps * t_seq
            choice = "vectorized" if est_vec < est_seq else "sequential"
            entry.update(estimate_vectorized_s=est_vec, estimate_sequential_s=est_seq, step_vectorized_s=t_vec,
                         step_sequential_s=t_seq, compile_vectorized_s=c_vec, compile_sequential_s=c_seq)
            msg = (f"vectorize=auto: {n} points x {steps} steps: vectorized ~{est_vec:.1f} s (compile {c_vec:.1f} s "
                   f"+ {steps} x {1e3 * t_vec:.1f} ms) vs sequential ~{est_seq:.1f} s ({programs} x {c_seq:.1f} s "
                   f"compile + {n} x {steps} x {1e3 * t_seq:.1f} ms): chose {choice}")
            log.info("sweep: %s (%s, ...)", msg, names[0])
            entry["reason"] = msg
            if choice == "sequential":
                entry["mode"] = "sequential"
                return runs
        else:
            entry["reason"] = "vectorize=on"
        entry["mode"] = "vectorized"
        log.info("sweep: %d points as one vmapped step: %s", len(runs), ", ".join(names))
        summaries = group.run()
        for m, s in zip(members, summaries):
            self._finished(m, s, f"vectorized x{len(members)}")
        return None

    def _finished(self, p: SweepPoint, summary: dict, how: str) -> None:
        self.done += 1
        self.record["points"][p.name]["status"] = how
        print(_result_line(self.done, len(self.points), p, summary, how), flush=True)

    def _run_sequential(self, todo: list[SweepPoint], prepared: dict) -> None:
        from tl_jax.train.loop import train  # deferred: JAX + the training stack

        if self.jobs > 1 and len(todo) > 1:
            for run in prepared.values():
                run.ckpts.close()
            return self._run_processes(todo)
        for p in todo:
            self.announce(p)
            t0 = time.time()
            run = prepared.pop(p.name, None)
            if run is not None:
                run.t_start = time.time()
                summary = run.loop()
            else:
                summary = train(p.config, str(p.workdir))
            self._timed.append(time.time() - t0)
            self._finished(p, summary, "sequential")

    def command(self, p: SweepPoint) -> list[str]:
        """The ``python -m tl_jax.train`` command line of a point."""
        spec = f"{self.config_file}:{p.arg}" if p.arg else self.config_file
        return [sys.executable, "-m", "tl_jax.train", "--config", spec, "--workdir", str(p.workdir),
                *[f"--config.{o}" for o in p.overrides + self.extra]]

    def _run_processes(self, todo: list[SweepPoint]) -> None:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        queue, running, failed = list(todo), [], []
        log.info("sweep: %d points in up to %d processes (logs in %s)", len(todo), self.jobs, logs)
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    p = queue.pop(0)
                    f = (logs / f"{p.name}.log").open("w")
                    running.append((p, subprocess.Popen(self.command(p), stdout=f, stderr=subprocess.STDOUT), f))
                for item in list(running):
                    p, proc, f = item
                    if proc.poll() is None:
                        continue
                    running.remove(item)
                    f.close()
                    if proc.returncode == 0 and p.finished:
                        status_lib.clear_failure(p.workdir)
                        self._finished(p, json.loads((p.workdir / "summary.json").read_text()), "process")
                    else:
                        tail = (logs / f"{p.name}.log").read_text().strip().splitlines()[-1:] or [""]
                        failed.append(f"{p.name} (exit {proc.returncode}: {tail[0][:200]})")
                        status_lib.record_failure(p.workdir, SweepError(f"exit {proc.returncode}: {tail[0][:200]}"))
                        self.record["points"][p.name]["status"] = f"failed (exit {proc.returncode})"
                time.sleep(0.2)
        finally:
            for p, proc, f in running:  # interrupted: let each run checkpoint and stop (SIGTERM)
                proc.terminate()
                proc.wait(timeout=120)
                f.close()
        if failed:
            self.save()
            raise SweepError(f"{len(failed)} point(s) failed: {'; '.join(failed)}; logs in {logs}")


def run_points(config_file: str, points: list[dict], root: str, *, jobs: int = 1, vectorize: str = "auto",
               overrides: list[str] = (), probe_steps: int = 3) -> dict:
    """Run ``points`` of ``config_file`` into ``root``; returns the sweep record (also ``sweep.json``)."""
    root_dir = pathlib.Path(root).expanduser().absolute()
    resolved = resolve(config_file, points, root_dir, list(overrides))
    root_dir.mkdir(parents=True, exist_ok=True)
    return Sweep(root_dir, resolved, jobs=jobs, vectorize=vectorize, probe_steps=probe_steps, extra=list(overrides),
                 config_file=config_file).run()


def run_sweep(spec: str, root: str, **kwargs: Any) -> dict:
    """``tl-jax sweep``: the points of ``get_sweep`` in ``spec`` (``FILE[:ARG]``), see :func:`run_points`."""
    config_file, points = load_points(spec)
    return run_points(config_file, points, root, **kwargs)
