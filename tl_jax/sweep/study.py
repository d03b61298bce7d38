"""Run a study: several training runs of one config file, each in its own sub-workdir.

A *point* is a dict of ``get_config`` arguments (``{"method": "finetune",
"shots": 10, "seed": 0}``); its run goes to ``ROOT/<name>`` with ``point.json``
beside the workdir contract. Points whose ``summary.json`` exists are skipped,
unfinished ones resume from their checkpoints. The general machinery (phases,
``--jobs``, vectorised groups) is :mod:`tl_jax.sweep`; this module keeps the
small helpers the experiment scripts use.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import sys
import time
from types import ModuleType

from tl_jax import config as config_lib
from tl_jax.sweep import spec as spec_lib
from tl_jax.sweep.report import write_report
from tl_jax.sweep.runner import run_points
from tl_jax.sweep.spec import config_arg, point_name  # the experiments import them from here

log = logging.getLogger("tl_jax")


def sibling_module(file: str, name: str) -> ModuleType:
    """The experiment file ``name`` beside ``file`` (the caller's ``__file__``) as a module, loaded once per
    process. Config files are loaded by path, not as a package, so one experiment reuses another this way."""
    path = pathlib.Path(file).resolve().with_name(name)
    key = f"tl_jax_experiment_{path.parent.name}_{path.stem}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def run_point(config_file: str, point: dict, workdir: pathlib.Path, overrides: list[str] = ()) -> dict:
    """Train one point (or return its existing summary)."""
    from tl_jax.train.loop import train  # deferred: JAX + the training stack

    workdir = pathlib.Path(workdir)
    summary_file = workdir / "summary.json"
    if summary_file.exists():
        log.info("skip %s (finished)", workdir)
        return json.loads(summary_file.read_text())
    arg = config_arg(point)
    config = config_lib.load_config(f"{config_file}:{arg}" if arg else config_file)
    config_lib.apply_overrides(config, list(overrides) + spec_lib.overrides(point))
    summary = train(config, str(workdir))
    (workdir / "point.json").write_text(json.dumps(spec_lib.run_fields(point), sort_keys=True) + "\n")
    return summary


def mean_over_seeds(config_file: str, point: dict, seeds, root: pathlib.Path, metric: str, *, prefix: str = "",
                    hidden: dict | None = None) -> float:
    """Mean of ``summary[metric]`` over one run of ``point`` per seed of ``seeds`` (``point["seed"]`` set to
    each), run ``i`` in ``ROOT/<prefix><point_name(point_i)>``; ``hidden`` entries (paths: a source, a
    teacher) reach ``get_config`` but not the run's name. Finished runs are read back, not re-run.
    The experiments' ``--tune`` grids call it with a validation metric."""
    scores = []
    for seed in seeds:
        one = {**point, "seed": seed}
        summary = run_point(config_file, {**one, **(hidden or {})}, pathlib.Path(root) / f"{prefix}{point_name(one)}")
        scores.append(summary[metric])
    return sum(scores) / len(scores)


def run_transfer_study(config_file: str, root: str, points: list[dict], *, vectorize: str = "off",
                       jobs: int = 1, group_by: tuple[str, ...] = ("method", "shots")) -> int:
    """Pretrain (``stage=source``) once in ``ROOT/source``, then run every target point, then the report.

    The target points get ``source=ROOT/source``. ``vectorize``/``jobs``: see
    :mod:`tl_jax.sweep.runner` (the demo keeps ``off``: on 2 CPU cores separate
    runs are faster).
    """
    t0 = time.time()
    sweep = [{"stage": "source", "_name": "source", "_report": False}]
    sweep += [{**p, "source": "{workdir}/source", "_phase": 1} for p in points]
    run_points(config_file, sweep, root, vectorize=vectorize, jobs=jobs)
    root_dir = pathlib.Path(root).absolute()
    print(write_report(str(root_dir), group_by=list(group_by)))
    print(f"study finished in {time.time() - t0:.0f} s; results in {root_dir}")
    return 0
