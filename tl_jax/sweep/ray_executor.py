"""``tl-jax sweep --executor ray [--address ADDR] [--retries R]``: one Ray task per point.

Each point that is not finished becomes one Ray task running the point's
``python -m tl_jax.train`` command (:meth:`Sweep.command`, so the same files
as a local run; the task is :func:`tl_jax.sweep.ray_task.run_command`, whose
module a fresh Ray worker imports without JAX) in the study dir's file
system, phase by phase (every task of
phase k returns before phase k+1 is submitted). The task reserves the point's
``_resources`` (``{"cpus": 4, "gpus": 1}``, default 1 CPU and no GPU:
:func:`tl_jax.sweep.spec.resources`); Ray runs as many tasks at once as the
nodes' CPUs and GPUs allow and gives each its GPUs (``CUDA_VISIBLE_DEVICES``).
A point that no node can hold would wait forever: on the local runtime that is
a one-line error before anything runs, on a cluster (``--address``, which an
autoscaler may grow) a warning naming the points. A task whose command exits
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
import os
import pathlib

from tl_jax.sweep import spec as spec_lib
from tl_jax.sweep.ray_task import run_command
from tl_jax.sweep.runner import Sweep, SweepError, SweepPoint, load_points, resolve, write_point_json
from tl_jax.sweep.status import record_failure

log = logging.getLogger("tl_jax")
INSTALL = "pip install 'tl_jax[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra to install."""
    if importlib.util.find_spec("ray") is None:
        raise SweepError(f"--executor ray needs Ray, which is not installed: {INSTALL}")
    import ray

    return ray


def check_fits(nodes: list[dict], points: list[SweepPoint], *, local: bool) -> None:
    """Refuse (local runtime) or warn about (cluster) points whose ``_resources`` no alive node has.

    ``nodes``: ``ray.nodes()``. Ray would keep such a task pending forever on a fixed set of nodes."""
    sizes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in nodes if n.get("Alive")]
    largest = f"{max((c for c, _ in sizes), default=0):g} CPUs, {max((g for _, g in sizes), default=0):g} GPUs"
    where = "the local Ray runtime" if local else "the Ray cluster now"
    for p in points:
        r = spec_lib.resources(p.point, f"point {p.name}")
        if any(c >= r["cpus"] and g >= r["gpus"] for c, g in sizes):
            continue
        msg = (f"point {p.name} asks Ray for {r['cpus']:g} CPUs and {r['gpus']:g} GPUs (_resources) but no node of "
               f"{where} has them (largest: {largest})")
        if local:
            raise SweepError(f"{msg}: lower the point's _resources, or give --address of a cluster that has such "
                             f"a node")
        log.warning("sweep: %s; Ray waits until a node that fits joins (an autoscaler may add one)", msg)


def run_ray(spec: str, root: str, *, address: str | None = None, retries: int = 1, overrides: list[str] = ()) -> dict:
    """Run every unfinished point of ``spec`` as a Ray task into ``root``; returns ``{name: status}``."""
    ray = require_ray()
    if retries < 0:
        raise SweepError(f"--retries must be >= 0, got {retries}")
    config_file, raw = load_points(spec)
    root_dir = pathlib.Path(root).expanduser().absolute()
    points = resolve(config_file, raw, root_dir, list(overrides))
    sweep = Sweep(root_dir, points, extra=list(overrides), config_file=config_file, vectorize="off")
    if all(p.finished for p in points):
        sweep.save()
        log.info("sweep: every point is finished; nothing sent to Ray")
        return {p.name: "skipped (finished)" for p in points}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        local = started and not (address or os.environ.get("RAY_ADDRESS"))
        check_fits(ray.nodes(), [p for p in points if not p.finished], local=local)
        root_dir.mkdir(parents=True, exist_ok=True)
        (root_dir / "logs").mkdir(exist_ok=True)
        sweep.save()
        return _run_phases(ray, sweep, points, root_dir, retries)
    finally:
        if started:
            ray.shutdown()


def _run_phases(ray, sweep: Sweep, points: list, root_dir: pathlib.Path, retries: int) -> dict:
    """Phase by phase: the unfinished points as Ray tasks (each with its resources), all awaited before the next
    phase."""
    task = ray.remote(max_retries=retries, retry_exceptions=True)(run_command)
    status: dict[str, str] = {}
    for phase in sorted({p.phase for p in points}):
        todo = [p for p in points if p.phase == phase and not p.finished]
        status.update({p.name: "skipped (finished)" for p in points if p.phase == phase and p.finished})
        for p in todo:
            write_point_json(p)
        refs = {}
        for p in todo:
            r = spec_lib.resources(p.point)
            sweep.record["points"][p.name]["resources"] = r
            refs[p.name] = task.options(num_cpus=r["cpus"], num_gpus=r["gpus"]).remote(
                sweep.command(p), str(root_dir / "logs" / f"{p.name}.log"))
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
