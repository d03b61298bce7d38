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
(zstd, orbax's default: 7-14 % fewer bytes for the demo's float32 training
state, at 20-40 ms more CPU per save of its 19 MB, ``benchmarks/checkpoint_bench.py``;
any checkpoint restores either way, its codec is in its metadata).

Retention keeps the newest ``keep`` steps AND the best step by
``best_metric`` (highest for ``best_mode='max'``, lowest for ``'min'``;
orbax's ``best_fn`` + ``max_to_keep`` alone can delete the step just saved:
see FIELD-NOTES), so a resume never goes back. Dropped steps are deleted in a
background thread (:meth:`Checkpoints.close` waits for it).

A damaged newest checkpoint is reported by name and the next older one is
tried (:meth:`Checkpoints.restore_latest`).
"""
from __future__ import annotations

import logging
import pathlib
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)
PyTree = Any


ASYNC_MIN_BYTES = 256 * 2**20  # 'auto' saves states at least this big asynchronously, even on CPUs


def use_async_save(setting: Any, state: PyTree, platform: str | None = None) -> bool:
    """Whether ``config.train.checkpoint_async`` (``'auto'`` | ``True`` | ``False``) saves in the background.

    ``'auto'``: in the background unless the devices are CPUs and ``state`` holds
    fewer than ``ASYNC_MIN_BYTES``. On a CPU backend XLA's threads already use
    every core, so orbax's writer threads (~20-40 ms of CPU per save, ~2 ms per
    array, ~1.5 ms per MB: ``benchmarks/checkpoint_bench.py``) preempt them. On
    the 2-core demo (19 MB state) the two cost the loop alike: a save every 60
    steps, 15 saves each way (2026-11-27), 164 ms (median) asynchronously and
    124 ms synchronously; a save every 50 steps, 6 fresh-process rounds of 10
    saves each way against the hand-written loop (2026-11-28), pooled loop
    ratios 0.918 asynchronously (rounds 0.87-0.97) and 0.907 synchronously
    (0.89-0.92), a difference within the rounds' spread. Synchronous is kept
    there: its cost stays in the save (the devices idle while it writes), not
    spread over the steps after it. On accelerators the host cores are free,
    and big states are worth overlapping anyway (seconds of writing).
    ``platform`` defaults to the first local device's.
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
        # Background delete: the steps retention drops are removed in a thread, not before save() returns
        # (~15 ms of a ~100 ms synchronous save of the demo's state, measured 2026-11-28).
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


def resolve_init_dir(path: str) -> pathlib.Path:
    """``init_from`` may be a workdir, its ``checkpoints/`` dir, or one step dir."""
    p = pathlib.Path(path).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"config.init_from: {path!r} does not exist")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "state").is_dir():
        return p
    steps = sorted((int(d.name) for d in p.iterdir() if d.is_dir() and d.name.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"config.init_from: {path!r} holds no checkpoint (expected a workdir, its "
                                f"checkpoints/ dir, or a step dir)")
    return p / str(steps[0])


def load_variables(path: str) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` (numpy) from a tl_jax checkpoint or workdir."""
    step_dir = resolve_init_dir(path)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(step_dir / "state")
    variables = {"params": restored["params"]}
    if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
    return jax.tree.map(np.asarray, variables)
