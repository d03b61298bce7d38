"""The train step's metrics on their way to ``metrics.jsonl``: packed per step, checked and logged per window.

The loop keeps each step's metrics on the device (:class:`PackedMetrics`: one
float32 vector per step) until its window of ``config.train.log_every`` steps
closes, fetches the window in one transfer once the next step is queued, and
:func:`log_window` checks it for NaN/Inf (``config.train.nan_policy``) and logs
the window's mean as one JSON line.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.state import TrainState
from tl_jax.train.step import SKIPPED, is_grad_norm_step
from tl_jax.train.workdir import Workdir
from tl_jax.params import param_rules as rules_lib

PyTree = Any
GRAD_NORM = "train/grad_norm"


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient (``nan_policy='error'``)."""


def first_nonfinite_path(tree: PyTree) -> str | None:
    for path, leaf in rules_lib.flatten_paths(mesh_lib.to_host(tree)).items():  # FSDP-sharded leaves too
        if not np.all(np.isfinite(leaf)):
            return path
    return None


def grad_norm_steps(config) -> Any:
    """``step -> bool``: the steps whose ``train/grad_norm`` the run's step computes."""
    every = 1 if config.train.nan_policy == "skip" else config.train.log_every
    return functools.partial(is_grad_norm_step, every=every, last_step=config.train.steps)


def fetch(values: list) -> list:
    """Host values of per-step metric vectors (replicated ``jax.Array`` s; other items, e.g. dicts restored
    from a checkpoint, as they are), in order.

    On CPU devices a vector already lives in host memory and ``np.asarray`` reads it, where
    ``jax.device_get`` would first queue an asynchronous host copy of each (host time that competes with
    XLA's threads for the cores; BENCHMARKS.md has the measurement). On accelerators ``device_get``
    overlaps the transfers: kept there.
    """
    arrays = [v for v in values if isinstance(v, jax.Array)]
    if arrays and any(d.platform != "cpu" for d in arrays[0].devices()):
        return jax.device_get(values)
    return [np.asarray(v) if isinstance(v, jax.Array) else v for v in values]


class PackedMetrics:
    """A pure step whose metrics come back as one float32 vector ``[K]``: one device array per step.

    The loop keeps every step's metrics until its window is logged; fetching
    ``K`` scalars per step cost ~0.2 ms of host time per demo step, one vector
    a fifth of it. ``names`` (sorted metric keys) are known once the step is
    traced; :meth:`unpack` turns a fetched vector back into the dict (values
    exact: float32 metrics, and counts below 2**24).
    """

    def __init__(self, step_fn: Any):
        self.step_fn = step_fn
        self.names: tuple[str, ...] = ()

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
        new, metrics = self.step_fn(state, batch)
        self.names = tuple(sorted(metrics))
        return new, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in self.names])

    def unpack(self, value: Any) -> dict:
        """A fetched vector as ``{name: value}`` (a dict, e.g. restored from a checkpoint, as it is)."""
        return value if isinstance(value, dict) else dict(zip(self.names, value))


def log_window(pending: list, wd: Workdir, is_main: bool, nan_policy: str, state: TrainState, norm_steps=None) -> dict:
    """Check a window's per-step metrics (``(step, dict)`` on the host), log their mean.

    ``train/grad_norm`` is the mean over the window's steps that computed it
    (``norm_steps(step)``, see :func:`tl_jax.train.step.is_grad_norm_step`;
    default: all); ``train/skipped_steps`` is the count after the window's
    last step. ``state`` (any later one) only names the first non-finite param
    in the error.
    """
    host = [m for _, m in pending]
    for (step, _), m in zip(pending, host):
        if nan_policy == "error" and not m["train/finite"]:
            where = first_nonfinite_path(state.params)
            raise NonFiniteError(f"non-finite loss or gradient at step {step} (train/loss={float(m['train/loss'])}); "
                                 f"first non-finite param: {where or 'none (the loss/grad was)'}; "
                                 f"set config.train.nan_policy='skip' to skip such updates")
    record = {"step": pending[-1][0]}
    for key in host[-1]:
        if key == GRAD_NORM and norm_steps is not None:
            values = [np.float64(m[key]) for (s, _), m in zip(pending, host) if norm_steps(s)]
            if values:
                record[key] = float(np.mean(values))
        elif key == SKIPPED:
            record[key] = int(host[-1][key])
        elif key != "train/finite":
            record[key] = float(np.mean([np.float64(m[key]) for m in host]))
    if is_main:
        wd.log(record)
    return record


class MetricsWindow:
    """The per-step metrics not logged yet: ``(step, metrics)`` in step order, device vectors until fetched
    (dicts when restored from a checkpoint).

    The loop :meth:`add` s each step's metrics and :meth:`close` s the window at a logged step (every
    ``config.train.log_every`` and the last); the closed window is logged (:meth:`log`) one step later, once
    the next step is queued behind it, so the devices never wait for the host, or at once where the loop
    syncs anyway (an eval, a checkpoint). ``to_host``: ``(step, vector)`` pairs -> ``(step, dict)`` pairs.
    """

    def __init__(self, pending: list | None, to_host, wd: Workdir, nan_policy: str, norm_steps):
        self.pending = [tuple(p) for p in pending or []]
        self.closed = 0  # pending[:closed]: a window that ended at an earlier step, not logged yet
        self.to_host, self.wd, self.nan_policy, self.norm_steps = to_host, wd, nan_policy, norm_steps
        self.is_main = jax.process_index() == 0

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))

    def close(self) -> None:
        """The window ends at the newest step."""
        self.closed = len(self.pending)

    def log(self, state: TrainState, n: int | None = None) -> dict:
        """Check and log ``pending[:n]`` (default: the closed window) as one record (:func:`log_window`)."""
        n = self.closed if n is None else n
        record = log_window(self.to_host(self.pending[:n]), self.wd, self.is_main, self.nan_policy, state,
                            norm_steps=self.norm_steps)
        self.pending, self.closed = self.pending[n:], 0
        return record

    def for_checkpoint(self) -> list:
        """The not-yet-logged metrics as JSON (``[[step, {name: value}]...]``): they travel with a checkpoint,
        so a run resumed from any step logs exactly the same windows."""
        return [[s, {k: float(v) for k, v in m.items()}] for s, m in self.to_host(self.pending)]
