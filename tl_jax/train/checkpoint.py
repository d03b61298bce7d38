"""Orbax checkpoints of a run: train state + data-iterator position, saved together.

One checkpoint step holds two items written atomically by one
``CheckpointManager.save``:

* ``state``: the :class:`~tl_jax.train.state.TrainState` (step, params, batch
  stats, optimizer state, rng), restored into an abstract target so optax
  states come back as their NamedTuples and arrays with their shardings;
* ``data``: the grain iterator state (JSON), so a resumed run sees exactly the
  batches it would have seen.

Saves are asynchronous (orbax writes in background threads while training
goes on) or synchronous, by ``config.train.checkpoint_async`` (:func:`use_async_save`).
Arrays are written uncompressed unless ``config.train.checkpoint_compression``
(zstd, orbax's default): float32 weights and optimizer moments compress
poorly, so the codec costs more CPU per save than it saves bytes. Any
checkpoint restores either way (its codec is in its metadata).

Retention keeps the newest ``keep`` steps AND the best step by
``best_metric`` (highest for ``best_mode='max'``, lowest for ``'min'``;
orbax's ``best_fn`` + ``max_to_keep`` alone can delete the step just saved:
see FIELD-NOTES), so a resume never goes back. Dropped steps are deleted in a
background thread (:meth:`Checkpoints.close` waits for it).

A damaged newest checkpoint is reported by name and the next older one is
tried (:meth:`Checkpoints.restore_latest`).
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tl_jax.util.quiet import absl_errors_only

log = logging.getLogger(__name__)
PyTree = Any


ASYNC_MIN_BYTES = 256 * 2**20  # 'auto' saves states at least this big asynchronously, even on CPUs


def use_async_save(setting: Any, state: PyTree, platform: str | None = None) -> bool:
    """Whether ``config.train.checkpoint_async`` (``'auto'`` | ``True`` | ``False``) saves in the background.

    ``'auto'``: in the background unless the devices are CPUs and ``state`` holds
    fewer than ``ASYNC_MIN_BYTES``. Synchronous on CPUs: XLA's threads already
    use every core and orbax's writer threads would compete with them, so a
    background save costs the loop about what a synchronous one does, only
    spread over the steps after it; synchronous keeps the cost inside the save.
    On accelerators the host cores are free, and big states are worth
    overlapping anyway (seconds of writing). BENCHMARKS.md (goal 1) has the
    measurements. ``platform`` defaults to the first local device's.
    """
    if setting in (True, False):
        return setting
    if setting != "auto":
        raise ValueError(f"config.train.checkpoint_async must be 'auto', true or false, got {setting!r}")
    platform = platform or jax.local_devices()[0].platform
    nbytes = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return platform != "cpu" or nbytes >= ASYNC_MIN_BYTES


class Checkpoints:
    """A run's ``checkpoints/`` directory."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, compression: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        if best_mode not in ("max", "min"):
            raise ValueError(f"config.train.best_mode must be 'max' or 'min', got {best_mode!r}")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(1, keep))]
        if best_metric:
            # BestN keeps the last n after sorting: ascending (reverse=False) keeps the largest.
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        # Background delete: the steps retention drops are removed in a thread, not before save() returns.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, enable_background_delete=True, create=True)
        # The state through orbax's PyTree handler (StandardSave's, with its zstd codec made optional).
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.PyTreeCheckpointHandler(use_compression=compression), data=ocp.JsonCheckpointHandler())
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, data_state: dict, metrics: dict | None = None) -> None:
        """Start an (async) save of ``state`` and ``data_state`` at ``step``."""
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        data=ocp.args.JsonSave(data_state)),
                          metrics=metrics)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, target: PyTree) -> tuple[PyTree, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)  # each array's dtype and sharding
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_latest(self, target: PyTree) -> tuple[int, PyTree, dict] | None:
        """Newest restorable step. A damaged step is named in a warning, moved
        aside to ``damaged-<step>-<time>`` (kept for inspection, never deleted)
        and the next older one is tried."""
        for step in reversed(self.all_steps()):
            try:
                state, data = self.restore(step, target)
                return step, state, data
            except Exception as e:  # noqa: BLE001  (TensorStore raises bare Exception)
                bad = self.directory / str(step)
                aside = self.directory / f"damaged-{step}-{int(time.time())}"
                msg = (f"checkpoint {bad} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                       f"moved to {aside.name}; trying an older one")
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
                if jax.process_index() == 0:
                    bad.rename(aside)
                self._reload()
        return None

    def _reload(self) -> None:
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_init_dir(path: str, where: str = "config.init_from") -> pathlib.Path:
    """The step dir ``init_from`` names: a workdir, its ``checkpoints/`` dir or one step dir,
    optionally followed by ``:latest`` (default), ``:best`` or ``:STEP`` (see :func:`parse_step_spec`)."""
    base, which = parse_step_spec(path)
    p = pathlib.Path(base).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"{where}: {base!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{where}: {base!r} is a file; expected a workdir, its checkpoints/ dir, or a step dir")
    if (p / "state").is_dir():  # a step dir (or a converted weights dir): the suffix may only name it
        if which == "latest" or (p.name.isdigit() and which == int(p.name)):
            return p
        raise ValueError(f"{where}: {path!r} names one checkpoint step dir ({p}); a ':{which}' suffix "
                         f"needs a workdir or its checkpoints/ dir")
    return select_step(p, which, where=where)


def load_variables(path: str, where: str = "config.init_from") -> dict:
    """``{'params': ..., 'batch_stats': ...}`` (numpy) from a tl_jax checkpoint or workdir
    (``PATH[:best|latest|STEP]``; errors name ``where``).

    Every point of a sweep task restores the same source checkpoint, so the last one read is kept for the
    process (keyed by its files' names, sizes, mtimes and inodes: a rewritten checkpoint is read again);
    each call gets its own copy of the arrays."""
    step_dir = resolve_init_dir(path, where)
    key = _files_key(step_dir / "state")
    if key is None or _LAST_LOADED.get("key") != key:
        variables = _restore_model_variables(step_dir / "state")
        _LAST_LOADED.clear()
        if key is not None:
            _LAST_LOADED.update(key=key, variables=variables)
        return jax.tree.map(np.array, variables)  # copies: the kept arrays never reach a caller
    return jax.tree.map(np.array, _LAST_LOADED["variables"])


def _restore_model_variables(state_dir: pathlib.Path) -> dict:
    """``params`` and (if any) ``batch_stats`` of a saved train state as numpy arrays; the optimizer state,
    RNG and auxiliary trees (2-3x the params for Adam) are not read (orbax's partial restore)."""
    # absl_errors_only: a state dir has no _CHECKPOINT_METADATA of its own, which orbax logs as a warning
    with absl_errors_only(), ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        keep = {k: tree[k] for k in ("params", "batch_stats") if k in tree and tree[k]}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), keep)
        return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=keep, restore_args=args,
                                                                     partial_restore=True))


_LAST_LOADED: dict = {}  # load_variables: {"key": the checkpoint files' identity, "variables": numpy trees}


def _files_key(directory: pathlib.Path) -> tuple | None:
    """``(path, size, mtime_ns, inode)`` of every file under ``directory`` (None if it cannot be read)."""
    try:
        files = []
        for f in sorted(directory.rglob("*")):
            st = f.stat()
            if f.is_file():
                files.append((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError:
        return None
    return tuple(files) or None

# -- Choosing a step: latest | best | STEP ------------------------------------------------------------------------

STEP_WORDS = ("latest", "best")


def parse_step_spec(spec: str) -> tuple[str, str | int]:
    """``'PATH:best'`` -> ``('PATH', 'best')``; ``'PATH:120'`` -> ``('PATH', 120)``;
    ``'PATH'`` -> ``('PATH', 'latest')``.

    Only a suffix after the LAST ``':'`` that is ``latest``, ``best`` or digits is
    taken, so paths holding other colons are left whole.
    """
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and (tail in STEP_WORDS or tail.isdigit()):
        return head, int(tail) if tail.isdigit() else tail
    return str(spec), "latest"


def run_dir(path: str | pathlib.Path) -> pathlib.Path | None:
    """The run folder of checkpoint ``path`` (a workdir, its checkpoints/ or a step dir; a ``:best``/``:STEP``
    suffix is allowed): the first of the path and its two parents that holds ``config.json``; None if none."""
    p = pathlib.Path(parse_step_spec(str(path))[0]).expanduser().absolute()
    return next((d for d in (p, p.parent, p.parent.parent) if (d / "config.json").is_file()), None)


def saved_model_config(path: str) -> dict | None:
    """The ``model`` group of the ``config.json`` of checkpoint ``path``'s run (:func:`run_dir`), or None."""
    d = run_dir(path)
    return None if d is None else json.loads((d / "config.json").read_text())["model"]


def parse_which(which: str | int, where: str = "--checkpoint") -> str | int:
    """``'latest'`` | ``'best'`` | a step number (int or digits) -> ``'latest'``/``'best'``/int."""
    if isinstance(which, int) and not isinstance(which, bool) and which >= 0:
        return which
    if isinstance(which, str) and (which in STEP_WORDS or which.isdigit()):
        return int(which) if which.isdigit() else which
    raise ValueError(f"{where} must be 'latest', 'best' or a step number, got {which!r}")


def checkpoints_dir(path: str | pathlib.Path, where: str = "--workdir") -> pathlib.Path:
    """``path/checkpoints`` for a workdir, else ``path`` itself (a ``checkpoints/`` dir)."""
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"{where}: {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{where}: {str(path)!r} is a file; expected a workdir or its checkpoints/ dir")
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def complete_steps(ckpt_dir: pathlib.Path) -> list[int]:
    """Steps with a finished checkpoint: dirs named by digits holding ``state/`` (orbax writes into
    ``N.orbax-checkpoint-tmp-*`` and renames when done, so half-written steps are never listed)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit() and (d / "state").is_dir())


def step_metrics(step_dir: pathlib.Path) -> dict | None:
    """The metrics orbax stored with one step: its ``metrics`` item (written when the manager tracks a
    best step with ``best_fn``), else the ``metrics`` field of ``_CHECKPOINT_METADATA``; None if neither."""
    item = step_dir / "metrics" / "metrics"
    if item.is_file():
        return dict(json.loads(item.read_text()))
    meta = step_dir / "_CHECKPOINT_METADATA"
    if meta.is_file():
        metrics = json.loads(meta.read_text()).get("metrics")
        if metrics:
            return dict(metrics)
    return None


def logged_metrics(workdir: pathlib.Path) -> dict[int, dict]:
    """``{step: merged records}`` of the workdir's ``metrics.jsonl`` (empty if absent)."""
    out: dict[int, dict] = {}
    f = workdir / "metrics.jsonl"
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(record, dict) and "step" in record:
            out.setdefault(int(record["step"]), {}).update(record)
    return out


def best_rule(workdir: pathlib.Path) -> tuple[str, str]:
    """``(metric, mode)`` of the run's ``config.train.best_metric`` / ``best_mode`` (its config.json).

    ``'auto'`` is ``val/accuracy`` when the run had a validation set (``config.data.val_fraction`` or
    ``val_split``), else ``''``: no best step was tracked (as ``tl_jax.train.early_stopping.resolve_best_metric``).
    """
    f = workdir / "config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    train, data = cfg.get("train", {}), cfg.get("data", {})
    metric, mode = train.get("best_metric", "test/accuracy"), train.get("best_mode", "max")
    if metric == "auto":
        has_val = data.get("val_fraction") is not None or data.get("val_split") is not None
        metric = "val/accuracy" if has_val else ""
    return metric or "", mode


def best_step(ckpt_dir: pathlib.Path, steps: list[int], metric: str, mode: str,
              where: str = "--checkpoint") -> int:
    """The step whose recorded ``metric`` is highest (``mode='max'``) or lowest (``'min'``).

    Per step, the metric comes from orbax's record (:func:`step_metrics`), else from the
    ``metrics.jsonl`` record of that step: the value the loop passed to ``Checkpoints.save``
    (the eval at the checkpoint's own step). Ties go to the newest step.
    """
    if not metric:
        raise ValueError(f"{where}=best: the run tracked no best checkpoint (config.train.best_metric names no "
                         f"metric in {ckpt_dir.parent / 'config.json'}); use 'latest' or a step of {steps}")
    logged = logged_metrics(ckpt_dir.parent)
    scored = []
    for s in steps:
        m = step_metrics(ckpt_dir / str(s)) or logged.get(s, {})
        value = m.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scored.append((float(value) if mode == "max" else -float(value), s))
    if not scored:
        raise ValueError(f"{where}=best: no checkpoint of {ckpt_dir} has a recorded {metric!r} (steps {steps}); "
                         f"use 'latest' or a step number")
    return max(scored)[1]


def select_step(path: str | pathlib.Path, which: str | int = "latest", *, where: str = "--checkpoint",
                best_metric: str | None = None, best_mode: str | None = None) -> pathlib.Path:
    """The step dir of a workdir (or its ``checkpoints/`` dir) chosen by ``which``.

    ``'latest'``: the newest complete step; ``'best'``: the step with the best recorded
    ``config.train.best_metric`` by ``best_mode`` (read from the workdir's config.json unless
    given); an int: that step. Errors are one line naming ``where`` and the path (listing the
    available steps).
    """
    which = parse_which(which, where)
    ckpt_dir = checkpoints_dir(path, where)
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"{where}: {ckpt_dir} holds no checkpoint (expected a workdir, its checkpoints/ "
                                f"dir, or a step dir)")
    if which == "latest":
        step = steps[-1]
    elif which == "best":
        metric, mode = best_rule(ckpt_dir.parent)
        step = best_step(ckpt_dir, steps, best_metric or metric, best_mode or mode, where)
    elif which in steps:
        step = which
    else:
        raise ValueError(f"{where}: no checkpoint step {which} in {ckpt_dir}; available steps: {steps}")
    return ckpt_dir / str(step)


def restore_state(step_dir: pathlib.Path, target: PyTree) -> PyTree:
    """The ``state`` item of one step dir, restored into ``target``'s structure, dtypes and shardings
    (as :meth:`Checkpoints.restore` does, read-only: no manager, nothing written)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            return ckptr.restore(pathlib.Path(step_dir) / "state",
                                 args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args))
    except Exception as e:  # noqa: BLE001  (TensorStore raises bare Exception; a changed model: ValueError)
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise ValueError(f"checkpoint {step_dir} cannot be restored into the run's state "
                         f"({type(e).__name__}: {first})") from None
