"""Exponential moving average of the weights (``config.train.ema_decay``).

After every update ``ema ← d·ema + (1 − d)·params`` (``d`` = ``ema_decay`` in
[0, 1); 0 = off), started at the initial params, so after ``t`` updates
``ema_t = d^t θ_0 + (1 − d) Σ_{s=1..t} d^{t−s} θ_s``. The average lives in the
train state (:class:`EmaTrainState`, a :class:`~tl_jax.train.state.TrainState`
with one more field), so it is checkpointed with the rest and a resumed run
continues it exactly; runs without it keep the plain ``TrainState`` and their
checkpoints are unchanged. The loop evaluates it beside the raw weights at
every eval as ``<split>/ema/<metric>`` (with the run's BatchNorm statistics:
the average is over the params only).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tl_jax.train.state import TrainState
from tl_jax.util import config_checks

PyTree = Any
PREFIX = "ema"  # eval metrics: test/ema/accuracy, val/ema/accuracy


@struct.dataclass
class EmaTrainState(TrainState):
    """A :class:`TrainState` with ``ema``: the moving average of ``params`` (a tree like them, float32 leaves
    as the params')."""

    ema: PyTree = None


def check_decay(decay: Any) -> float:
    """``decay`` if it is a number in [0, 1), else a one-line ValueError naming ``config.train.ema_decay``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"config.train.ema_decay must be a number in [0, 1) (0 = off; e.g. 0.999), got {decay!r}")
    return float(decay)


def check_config(config: Any) -> None:
    """``config.train.ema_decay`` (:func:`check_decay`); run by :func:`tl_jax.config.validate`."""
    check_decay(config.train.ema_decay)


config_checks.register_check("train.ema_decay", check_config)


def attach(state: TrainState, decay: float) -> TrainState:
    """``state`` with an EMA of its params started at their current values (``decay`` > 0), else ``state``."""
    if not check_decay(decay):
        return state
    fields = {f: getattr(state, f) for f in ("step", "params", "batch_stats", "opt_state", "rng", "skipped", "aux")}
    return EmaTrainState(**fields, ema=jax.tree.map(jnp.copy, state.params))


def has_ema(state: Any) -> bool:
    return getattr(state, "ema", None) is not None


def update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """``d·ema + (1 − d)·params``, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def ema_view(state: TrainState) -> TrainState:
    """``state`` with ``params`` replaced by their EMA (same tree structure: the eval step does not recompile)."""
    return state.replace(params=state.ema)
