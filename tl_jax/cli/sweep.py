"""``tl-jax sweep``: every point of a config file's ``get_sweep`` into its own sub-workdir.

    tl-jax sweep --config experiments/freeze_depth.py --workdir runs/freeze [--jobs 2] [--vectorize auto]
    tl-jax sweep --config ... --workdir ROOT --list | --index K|auto | --shard I/N   (array tasks: docs/cluster.md)
    tl-jax sweep --config ... --workdir ROOT --executor ray [--address HOST:PORT]

Finished points are skipped, unfinished ones resumed; at the end the study's
report is written (:mod:`tl_jax.sweep.report`) unless ``--no-report``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tl_jax.cli.args import split_overrides
from tl_jax.sweep.ray_executor import run_ray
from tl_jax.sweep.report import write_report
from tl_jax.sweep.runner import run_sweep
from tl_jax.sweep.tasks import NotReady, run_tasks


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax sweep", description="Run every point of a config file's get_sweep "
                                "into its own sub-workdir (skips finished points, resumes unfinished ones).",
                                epilog="Any --config.KEY=VALUE overrides a config key of every point. Array jobs: "
                                "see docs/cluster.md.")
    p.add_argument("--config", required=True, help="experiments/FILE.py[:ARG]; ARG goes to get_sweep(ARG)")
    p.add_argument("--workdir", required=True, help="the study dir: one sub-workdir per point, sweep.json, reports")
    p.add_argument("--jobs", type=int, default=1, help="points run in up to N parallel processes (default 1)")
    p.add_argument("--vectorize", default="auto", choices=("auto", "on", "off"),
                   help="train points that differ only in traced numbers as one vmapped step: auto (default) "
                        "times a few steps of each way and takes the faster")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--list", action="store_true", help="print each point's index, name, phase and status "
                      "(pending/running/finished/failed) and exit")
    task.add_argument("--index", default=None, metavar="K|auto", help="run point K only (auto: "
                      "$SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX)")
    task.add_argument("--shard", default=None, metavar="I/N", help="run the points k with k %% N == I")
    p.add_argument("--no-wait", action="store_true", help="with --index/--shard: exit (status --no-wait-code) "
                   "instead of waiting when an earlier phase is not finished")
    p.add_argument("--no-wait-code", type=int, default=75, help="exit status of --no-wait (default 75, EX_TEMPFAIL)")
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between checks of earlier phases (default 10)")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="where points run: local "
                   "(default) or ray (one Ray task per point, reserving the point's _resources, default 1 CPU; "
                   "pip install 'tl_jax[ray]')")
    p.add_argument("--address", default=None, help="--executor ray: the cluster address (default: a local runtime)")
    p.add_argument("--retries", type=int, default=1, help="--executor ray: retries of a failed point (default 1)")
    return p


def cmd_sweep(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    args = sweep_parser().parse_args(rest)
    # Deferred (JAX): `tl-jax sweep --help` runs without it. Every point's config is validated before any
    # point runs; tl_jax.train.loop imports the modules that register their config checks (config.validate).
    import tl_jax.train.loop  # noqa: F401

    tasks = args.list or args.index is not None or args.shard is not None
    if args.executor == "ray":
        if tasks:
            raise ValueError("--executor ray runs the whole sweep: drop --list/--index/--shard")
        run_ray(args.config, args.workdir, address=args.address, retries=args.retries, overrides=overrides)
    elif tasks:
        if args.jobs != 1:
            raise ValueError("--jobs is for a whole sweep in one task: with --index/--shard start more tasks")
        try:
            out = run_tasks(args.config, args.workdir, index=args.index, shard=args.shard, list_only=args.list,
                            overrides=overrides, wait=not args.no_wait, poll_s=args.poll_s,
                            no_wait_code=args.no_wait_code)
        except NotReady as e:
            print(f"tl-jax sweep: {e}", file=sys.stderr)
            return e.exit_code
        if args.list:
            print(out)
        return 0  # no report: other tasks may still run (tl-jax report ROOT when all are done)
    else:
        run_sweep(args.config, args.workdir, jobs=args.jobs, vectorize=args.vectorize, overrides=overrides)
    if not args.no_report:
        try:
            print(write_report(args.workdir))
        except (KeyError, FileNotFoundError) as e:
            logging.getLogger("tl_jax").warning("no report: %s", e)
    return 0
