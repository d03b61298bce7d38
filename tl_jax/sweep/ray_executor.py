"""``tl-jax sweep --executor ray [--address ADDR] [--retries R]``: one Ray task per point.

Each point that is not finished becomes one Ray task running the point's
``python -m tl_jax.train`` command (:meth:`Sweep.command`, so the same files
as a local run) in the study dir's file system, phase by phase (every task of
phase k returns before phase k+1 is submitted). A task whose command exits
non-zero is retried ``retries`` times by Ray (``max_retries`` +
``retry_exceptions``); a retry resumes from the point's checkpoint and a second
copy of a point is refused by its workdir lock. Without ``--address`` Ray
starts a local runtime (``ray.init()``). The study dir must be on a file system
every Ray worker sees.

Ray is optional: ``pip install 'tl_jax[ray]'``.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import subprocess

from tl_jax.sweep.runner import Sweep, SweepError, load_points, resolve, write_point_json
from tl_jax.sweep.status import record_failure

log = logging.getLogger("tl_jax")
INSTALL = "pip install 'tl_jax[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra to install."""
    if importlib.util.find_spec("ray") is None:
        raise SweepError(f"--executor ray needs Ray, which is not installed: {INSTALL}")
    import ray

    return ray


def _run_command(cmd: list[str], log_file: str) -> int:
    """Run one point's training command (inside a Ray worker); raises on a non-zero exit so Ray retries."""
    with open(log_file, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = pathlib.Path(log_file).read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {rc}: {tail[0][:200]}")
    return rc


def run_ray(spec: str, root: str, *, address: str | None = None, retries: int = 1, num_cpus: float = 1,
            num_gpus: float = 0, overrides: list[str] = ()) -> dict:
    """Run every unfinished point of ``spec`` as a Ray task into ``root``; returns ``{name: status}``."""
    ray = require_ray()
    if retries < 0:
        raise SweepError(f"--retries must be >= 0, got {retries}")
    config_file, raw = load_points(spec)
    root_dir = pathlib.Path(root).expanduser().absolute()
    points = resolve(config_file, raw, root_dir, list(overrides))
    sweep = Sweep(root_dir, points, extra=list(overrides), config_file=config_file, vectorize="off")
    root_dir.mkdir(parents=True, exist_ok=True)
    (root_dir / "logs").mkdir(exist_ok=True)
    sweep.save()
    if all(p.finished for p in points):
        log.info("sweep: every point is finished; nothing sent to Ray")
        return {p.name: "skipped (finished)" for p in points}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        return _run_phases(ray, sweep, points, root_dir, retries, num_cpus, num_gpus)
    finally:
        if started:
            ray.shutdown()


def _run_phases(ray, sweep: Sweep, points: list, root_dir: pathlib.Path, retries: int, num_cpus: float,
                num_gpus: float) -> dict:
    """Phase by phase: the unfinished points as Ray tasks, all awaited before the next phase."""
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries, retry_exceptions=True)(_run_command)
    status: dict[str, str] = {}
    for phase in sorted({p.phase for p in points}):
        todo = [p for p in points if p.phase == phase and not p.finished]
        status.update({p.name: "skipped (finished)" for p in points if p.phase == phase and p.finished})
        for p in todo:
            write_point_json(p)
        refs = {p.name: task.remote(sweep.command(p), str(root_dir / "logs" / f"{p.name}.log")) for p in todo}
        log.info("sweep: phase %d: %d point(s) sent to Ray", phase, len(refs))
        failed = []
        for name, ref in refs.items():
            try:
                ray.get(ref)
                status[name] = "ray"
            except Exception as e:  # noqa: BLE001 (ray wraps the task's error)
                status[name] = "failed"
                failed.append(f"{name} ({str(e).strip().splitlines()[-1][:200]})")
                record_failure(root_dir / name, SweepError(failed[-1]))
        for name, s in status.items():
            sweep.record["points"][name]["status"] = s
        sweep.save()
        if failed:
            raise SweepError(f"{len(failed)} point(s) failed after {retries} retries: {'; '.join(failed)}; "
                             f"logs in {root_dir / 'logs'}")
    return status
