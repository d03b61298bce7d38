"""Run a study: several training runs of one config file, each in its own sub-workdir.

A *point* is a dict of ``get_config`` arguments (``{"method": "finetune",
"shots": 10, "seed": 0}``); its run goes to ``ROOT/<name>`` with ``point.json``
beside the workdir contract. Points whose ``summary.json`` exists are skipped,
unfinished ones resume from their checkpoints.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time

from tl_jax import config as config_lib

log = logging.getLogger("tl_jax")


def point_name(point: dict) -> str:
    """``method=finetune,shots=10,seed=0`` -> ``finetune_shots10_seed0`` (stable, filesystem-safe)."""
    parts = []
    for k, v in point.items():
        if k in ("stage", "source"):
            continue
        parts.append(str(v) if k == "method" else f"{k}{v}")
    return "_".join(parts).replace("/", "-")


def config_arg(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def run_point(config_file: str, point: dict, workdir: pathlib.Path, overrides: list[str] = ()) -> dict:
    """Train one point (or return its existing summary)."""
    from tl_jax.train.loop import train

    summary_file = workdir / "summary.json"
    if summary_file.exists():
        log.info("skip %s (finished)", workdir)
        return json.loads(summary_file.read_text())
    config = config_lib.load_config(f"{config_file}:{config_arg(point)}")
    config_lib.apply_overrides(config, overrides)
    summary = train(config, str(workdir))
    (workdir / "point.json").write_text(json.dumps(point, sort_keys=True) + "\n")
    return summary


def run_transfer_study(config_file: str, root: str, points: list[dict]) -> int:
    """Pretrain (``stage=source``) once in ``ROOT/source``, then run every target point."""
    from tl_jax.report import write_report

    t0 = time.time()
    root_dir = pathlib.Path(root).absolute()
    source = root_dir / "source"
    src_summary = run_point(config_file, {"stage": "source"}, source)
    print(f"source: test/accuracy={src_summary['test/accuracy']:.4f} ({src_summary['wall_s']:.0f} s)", flush=True)
    for i, point in enumerate(points):
        point = {**point, "source": str(source)}
        s = run_point(config_file, point, root_dir / point_name(point))
        print(f"[{i + 1}/{len(points)}] {point_name(point)}: test/accuracy={s['test/accuracy']:.4f}", flush=True)
    print(write_report(str(root_dir), group_by=["method", "shots"]))
    print(f"study finished in {time.time() - t0:.0f} s; results in {root_dir}")
    return 0
