"""An Optuna (TPE) search over a config file's ``get_search`` space.

    tl-jax search --config experiments/FILE.py[:ARG] --workdir ROOT --trials N [--config.KEY=VALUE ...]

(the command line: :mod:`tl_jax.cli.search`). A config file may define ``get_search(arg)`` next to ``get_config``::

    from tl_jax.sweep.search import loguniform

    def get_search(arg=None):
        return {"space": {"config.optimizer.learning_rate": loguniform(1e-4, 1e-1)},
                "metric": "val/accuracy", "direction": "maximize",
                "fixed": {"stage": "target", "config.data.val_fraction": 0.1}}

``space`` maps point keys (as in a sweep point, :mod:`tl_jax.sweep.spec`: a
``config.`` override or a ``get_config`` argument) to :func:`loguniform`,
:func:`uniform`, :func:`choice` or :func:`intrange`; ``fixed`` keys go into
every trial; ``metric`` must be a validation metric (``val/*``: the test set
stays unseen by the selection) read from the trial's ``summary.json``;
``direction`` is ``maximize`` or ``minimize``; optional ``seed`` (0) and
``startup_trials`` (random trials before TPE, Optuna's default 10).

Trial k trains into ``ROOT/trial_<k>`` (a workdir like any run: resume,
reports). Optuna's record is ``ROOT/optuna.journal`` (a JournalStorage file, no
database), so a second invocation adds ``--trials`` more trials to the same
study; a trial whose process died is run again under the same workdir (resuming
from its checkpoint). Every space key is checked against the config before
anything is written. At the end the best trial, its value and its
``tl-jax train`` command are printed, and ``ROOT/search.json`` lists the trials.
Pruning inside a run is not done: the loop has no per-eval callback yet.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shlex
from typing import Any

from tl_jax.config import ConfigError
from tl_jax.sweep import spec as spec_lib
from tl_jax.sweep import status as status_lib
from tl_jax.sweep.runner import SweepError, _module, resolve, write_point_json

log = logging.getLogger("tl_jax")
DIRECTIONS = ("maximize", "minimize")
JOURNAL = "optuna.journal"
STUDY_NAME = "tl_jax"


@dataclasses.dataclass(frozen=True)
class Dist:
    """One axis of the space: ``kind`` in (loguniform, uniform, choice, intrange) and its arguments."""
    kind: str
    args: tuple

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(name, *self.args, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(name, *self.args)
        if self.kind == "intrange":
            return trial.suggest_int(name, self.args[0], self.args[1], step=self.args[2])
        return trial.suggest_categorical(name, list(self.args))

    def example(self) -> Any:
        """A value of the space (its lower end, or first choice): used to check the key before any trial."""
        return self.args[0]


def _numbers(kind: str, low: float, high: float, positive: bool = False) -> None:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not ok or low >= high or (positive and low <= 0):
        need = "0 < low < high" if positive else "low < high"
        raise ConfigError(f"{kind}({low!r}, {high!r}): need finite numbers with {need}")


def loguniform(low: float, high: float) -> Dist:
    """A float drawn uniformly in log space between ``low`` and ``high`` (learning rates, weights)."""
    _numbers("loguniform", low, high, positive=True)
    return Dist("loguniform", (float(low), float(high)))


def uniform(low: float, high: float) -> Dist:
    _numbers("uniform", low, high)
    return Dist("uniform", (float(low), float(high)))


def intrange(low: int, high: int, step: int = 1) -> Dist:
    """An int in ``[low, high]`` (both included) on a grid of ``step``."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)) or low >= high or step < 1:
        raise ConfigError(f"intrange({low!r}, {high!r}, step={step!r}): need ints with low < high and step >= 1")
    return Dist("intrange", (low, high, step))


def choice(*values: Any) -> Dist:
    """One of ``values`` (numbers, strings, bools or None: what Optuna stores), e.g. ``choice("sgd", "adam")``."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = tuple(values[0])
    if len(values) < 2 or not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        raise ConfigError(f"choice{values!r}: need two or more numbers, strings, bools or None")
    return Dist("choice", tuple(values))


@dataclasses.dataclass
class Search:
    space: dict[str, Dist]
    metric: str
    direction: str = "maximize"
    fixed: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    startup_trials: int = 10


def check_search(raw: Any, where: str = "get_search") -> Search:
    """Validate ``get_search``'s dict (one-line errors naming the field)."""
    known = {f.name for f in dataclasses.fields(Search)}
    if not isinstance(raw, dict) or not {"space", "metric"} <= set(raw):
        raise ConfigError(f"{where} must return a dict with 'space' and 'metric' (and optionally {sorted(known)})")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known: {sorted(known)}")
    s = Search(**raw)
    if not isinstance(s.space, dict) or not s.space:
        raise ConfigError(f"{where}: 'space' must be a non-empty dict of key -> loguniform/uniform/choice/intrange")
    for k, d in s.space.items():
        if not isinstance(d, Dist):
            raise ConfigError(f"{where}: space[{k!r}] must be loguniform/uniform/choice/intrange(...), got {d!r}")
        if k.startswith("_"):
            raise ConfigError(f"{where}: space key {k!r}: reserved keys cannot be searched")
    if not isinstance(s.metric, str) or not s.metric.startswith("val/"):
        raise ConfigError(f"{where}: metric {s.metric!r} is not a validation metric: search on val/* (set "
                          f"config.data.val_fraction or val_split) so the test set stays out of the selection")
    if s.direction not in DIRECTIONS:
        raise ConfigError(f"{where}: direction must be one of {DIRECTIONS}, got {s.direction!r}")
    clash = sorted(set(s.space) & set(s.fixed))
    if clash:
        raise ConfigError(f"{where}: key {clash[0]!r} is both in 'space' and in 'fixed'")
    return s


def load_search(spec: str) -> tuple[str, Search]:
    """``FILE[:ARG]`` -> ``(FILE, get_search(ARG))``, checked."""
    path, _, arg = spec.partition(":")
    module = _module(path)
    if not hasattr(module, "get_search"):
        raise ConfigError(f"--config: {path} defines no get_search(arg); see tl_jax/sweep/search.py")
    return path, check_search(module.get_search(arg) if arg else module.get_search(), f"{path}: get_search")


def trial_point(search: Search, params: dict, name: str) -> dict:
    """The sweep point of one trial: ``fixed`` + the sampled ``params``, named ``name``."""
    return {**search.fixed, **params, "_name": name}


def check_space(config_file: str, search: Search, root: pathlib.Path, overrides: list[str]) -> None:
    """Resolve one point per space key (its example value) so a key that is not a config key fails now."""
    for key, dist in search.space.items():
        try:
            resolve(config_file, [trial_point(search, {key: dist.example()}, "check")], root, overrides)
        except ValueError as e:
            raise ConfigError(f"{config_file}: get_search space key {key!r}: "
                              f"{str(e).removeprefix('point check: ')}") from None
    (point,) = resolve(config_file, [trial_point(search, {k: d.example() for k, d in search.space.items()}, "check")],
                       root, overrides)
    dc = point.config.data
    if dc.val_fraction is None and dc.val_split is None:
        raise ConfigError(f"{config_file}: get_search metric {search.metric!r} needs a validation set: set "
                          f"config.data.val_fraction or config.data.val_split (in 'fixed' or --config.data...)")


def train_command(config_file: str, point: dict, workdir: pathlib.Path, overrides: list[str]) -> str:
    """The ``tl-jax train`` command that reproduces one trial."""
    arg = spec_lib.config_arg(point)
    args = ["tl-jax", "train", "--config", f"{config_file}:{arg}" if arg else config_file, "--workdir", str(workdir),
            *[f"--config.{o}" for o in spec_lib.overrides(point) + list(overrides)]]
    return shlex.join(args)


def require_optuna():
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("tl-jax search needs Optuna, which is not installed: pip install 'tl_jax[search]'")
    import optuna

    return optuna


def _open_study(optuna, root: pathlib.Path, search: Search):
    """The study of ``ROOT/optuna.journal`` (created or continued); the sampler's seed moves on with the trials."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(root / JOURNAL)))
    try:
        old = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        n, direction = len(old.trials), old.direction.name.lower()
    except KeyError:
        n, direction = 0, search.direction
    if direction != search.direction:
        raise ConfigError(f"{root / JOURNAL} is a search to {direction}, get_search says {search.direction}: "
                          f"use another --workdir")
    sampler = optuna.samplers.TPESampler(seed=search.seed + n, n_startup_trials=search.startup_trials)
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=search.direction,
                               sampler=sampler, load_if_exists=True)


def _requeue_dead(optuna, study, root: pathlib.Path) -> None:
    """Trials left RUNNING by a process that died: failed in the record, queued again under their workdir."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name = t.user_attrs.get("workdir", f"trial_{t.number}")
        if status_lib.point_status(root / name) != "running":
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"workdir": name})
            log.info("search: %s (trial %d) was left unfinished: queued again, it resumes", name, t.number)


def run_search(spec: str, root: str, *, trials: int, overrides: list[str] = ()) -> dict:
    """Run ``trials`` more trials of ``spec``'s ``get_search`` into ``root``; returns ``search.json``'s record."""
    # Deferred (JAX and the training stack): loading and checking a search space runs without them.
    from tl_jax.train.loop import train
    from tl_jax.train.preemption import Preempted  # deferred (JAX), as above

    optuna = require_optuna()
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    config_file, search = load_search(spec)
    root_dir = pathlib.Path(root).expanduser().absolute()
    overrides = list(overrides)
    check_space(config_file, search, root_dir, overrides)  # before anything is written
    root_dir.mkdir(parents=True, exist_ok=True)
    study = _open_study(optuna, root_dir, search)
    _requeue_dead(optuna, study, root_dir)

    def objective(trial) -> float:
        params = {k: d.suggest(trial, k) for k, d in search.space.items()}
        name = trial.user_attrs.get("workdir") or f"trial_{trial.number}"
        trial.set_user_attr("workdir", name)
        (point,) = resolve(config_file, [trial_point(search, params, name)], root_dir, overrides)
        write_point_json(point)
        try:
            summary = train(point.config, str(point.workdir))
        except Preempted:
            study.enqueue_trial(params, user_attrs={"workdir": name})  # the next invocation resumes it
            raise
        except Exception as e:  # noqa: BLE001 (a failed trial is recorded; the search goes on)
            path = status_lib.record_failure(point.workdir, e)
            log.error("search: %s failed: %s (recorded in %s)", name, e, path)
            return float("nan")
        status_lib.clear_failure(point.workdir)
        if not isinstance(summary.get(search.metric), (int, float)):
            raise SweepError(f"{name}/summary.json has no {search.metric!r}; it has {sorted(summary)}")
        return float(summary[search.metric])

    study.optimize(objective, n_trials=trials)
    return write_record(study, search, config_file, root_dir, overrides)


def write_record(study, search: Search, config_file: str, root: pathlib.Path, overrides: list[str]) -> dict:
    """``ROOT/search.json``: every trial, and the best one with its ``tl-jax train`` command."""
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "workdir": t.user_attrs.get("workdir")} for t in study.trials]
    record: dict = {"config": config_file, "metric": search.metric, "direction": search.direction, "trials": rows}
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        name = best.user_attrs.get("workdir", f"trial_{best.number}")
        point = trial_point(search, best.params, name)
        record["best"] = {"number": best.number, "value": best.value, "params": best.params, "workdir": name,
                          "command": train_command(config_file, {k: v for k, v in point.items() if k != "_name"},
                                                   root / name, overrides)}
    (root / "search.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def best_lines(record: dict) -> str:
    """What ``tl-jax search`` prints at the end."""
    n = sum(r["state"] == "complete" for r in record["trials"])
    if "best" not in record:
        return f"no trial finished ({len(record['trials'])} tried)"
    b = record["best"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items())
    return (f"best of {n} finished trials: {b['workdir']}: {record['metric']}={b['value']:.4f} ({params})\n"
            f"  {b['command']}")

