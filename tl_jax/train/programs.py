"""The compiled train step(s) the loop calls: the run's pure step, its metrics packed, compiled by the strategy.

:func:`pure_train_step` reads the config into :func:`tl_jax.train.step.make_train_step` (also vmapped by
:mod:`tl_jax.sweep.vectorized`). :class:`StepPrograms` is what :class:`tl_jax.train.loop.Loop` runs: one
program per ``grad_norm`` flag (:func:`grad_norm_flags`), each a :class:`~tl_jax.train.train_metrics.PackedMetrics`
step (one float32 vector of metrics per step) jitted or pmapped by the ``tl_jax.parallel`` strategy and
compiled on the first batch; :meth:`StepPrograms.to_host` turns the kept vectors back into metric dicts.
"""
from __future__ import annotations

import time

from tl_jax.data import device_batches
from tl_jax.train.build import param_groups
from tl_jax.train.step import make_train_step
from tl_jax.train.train_metrics import PackedMetrics, grad_norm_steps
from tl_jax.train.train_metrics import fetch as fetch_metrics


def pure_train_step(config, objective, tx, params, axis_name: str | None = None, grad_norm: bool | None = None):
    """The run's pure ``(state, batch[, hparams]) -> (state, metrics)`` (also vmapped by tl_jax/sweep).

    ``grad_norm``: see :func:`tl_jax.train.step.make_train_step` (``None``: a ``lax.cond`` on the logged steps).
    """
    return make_train_step(objective.loss, tx, nan_policy=config.train.nan_policy, axis_name=axis_name,
                           value_and_grad=getattr(objective, "value_and_grad", None),
                           trainable=param_groups(config, objective, params).trainable(),
                           grad_norm_every=config.train.log_every, last_step=config.train.steps, grad_norm=grad_norm,
                           accum_steps=config.optimizer.accum_steps, ema_decay=config.train.ema_decay)


def grad_norm_flags(config) -> tuple[bool | None, ...]:
    """The ``grad_norm`` of each program the loop compiles: ``(False, True)`` for
    ``config.train.grad_norm_program='separate'`` (the plain step, and the one the logged steps run), else
    ``(None,)`` (one program, a ``lax.cond``; also under ``nan_policy='skip'``, which needs ‖g‖ every step)."""
    tc = config.train
    return (False, True) if tc.grad_norm_program == "separate" and tc.nan_policy == "error" else (None,)


class StepPrograms:
    """``programs(state, batch, step) -> (state, packed metrics)``: the program that step ``step + 1`` runs.

    With ``config.train.grad_norm_program='separate'`` the steps that log ``train/grad_norm`` run their own
    program (``grad_norm_steps``), the others the plain one. ``device_data`` (``config.data.device_cache``):
    the loop passes recipes and the step makes the batch from the table on the devices. Every program is
    compiled ahead of its first call, on the first batch (``compile_s``: the seconds that took).
    """

    def __init__(self, config, objective, tx, params, strategy,
                 device_data: device_batches.DeviceBatches | None = None):
        self.strategy = strategy
        self.norm_step = grad_norm_steps(config)
        self.packs = {flag: PackedMetrics(_wrap(pure_train_step(config, objective, tx, params, strategy.axis_name,
                                                                grad_norm=flag), device_data))
                      for flag in grad_norm_flags(config)}
        self.steps = {flag: strategy.train_step(p) for flag, p in self.packs.items()}
        self.compile_s: float | None = None  # None until the first batch compiled every program

    def __call__(self, state, batch, step: int):
        if self.compile_s is None:
            t0 = time.time()
            self.steps = {flag: self.strategy.compile(fn, state, batch) for flag, fn in self.steps.items()}
            self.compile_s = time.time() - t0
        flag = None if None in self.steps else bool(self.norm_step(step + 1))
        return self.steps[flag](state, batch)

    def to_host(self, items: list) -> list:
        """``(step, packed metrics)`` pairs on the host, as dicts (one fetch for all)."""
        values = fetch_metrics([m for _, m in items])  # np.asarray on CPUs (device_get costs more host time)
        packed = next(p for p in self.packs.values() if p.names)  # a traced program (both pack the same names)
        return [(s, packed.unpack(v)) for (s, _), v in zip(items, values)]


def _wrap(step_fn, device_data: device_batches.DeviceBatches | None):
    """The step as the loop calls it: with ``config.data.device_cache``, the batch made inside from a recipe."""
    return device_data.wrap(step_fn) if device_data is not None else step_fn
