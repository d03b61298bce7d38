"""Optimizer and learning-rate schedule from ``config.optimizer`` (all optax).

``make_group_tx(config.optimizer, total_steps)`` returns ``m -> tx`` used by
:func:`tl_jax.params.param_rules.build_optimizer`: the group with learning
rate multiplier ``m`` gets the base optimizer with ``lr_m(t) = m · lr(t)``.

``mu_dtype`` (``config.precision.moments``): the dtype of the first moments,
Adam/AdamW's ``mu`` (optax's ``mu_dtype``) and SGD's momentum trace (optax's
``accumulator_dtype``); ``None`` keeps the params' float32. Adam's second
moment ``nu`` always stays float32: with ``b2 = 0.999`` each step moves it by
``(1 - b2)(g² - nu)``, about 2^-10 of its value, below bfloat16's resolution
(an update < 2^-9 of a bfloat16 number rounds away), so a bfloat16 ``nu`` would
stop tracking ``g²``; ``mu`` moves by ``1 - b1 = 10 %`` per step and keeps
working in bfloat16, at half the bytes. The update itself is computed from the
float32 gradient and the moments before they are stored, so only the stored
``mu`` is rounded.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "warmup_cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """``constant``: lr; ``cosine``: lr·½(1+cos(πt/T)); ``warmup_cosine``: linear warmup then cosine."""
    lr = float(cfg.learning_rate)
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(1, total_steps))
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, max(cfg.warmup_steps + 1, total_steps))
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")


def make_group_tx(cfg: ml_collections.ConfigDict, total_steps: int, mu_dtype: Any = None
                  ) -> Callable[[float], optax.GradientTransformation]:
    """``m -> optax transformation`` for a param group with lr multiplier ``m`` (first moments in ``mu_dtype``)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {cfg.learning_rate}")
    schedule = make_schedule(cfg, total_steps)

    def make_tx(mult: float) -> optax.GradientTransformation:
        lr = lambda t: mult * schedule(t)  # noqa: E731
        if cfg.name == "adam":
            tx = optax.adam(lr, mu_dtype=mu_dtype)
        elif cfg.name == "adamw":
            tx = optax.adamw(lr, weight_decay=cfg.weight_decay, mu_dtype=mu_dtype)
        else:
            tx = optax.sgd(lr, momentum=cfg.momentum or None, accumulator_dtype=mu_dtype)
        if cfg.grad_clip_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
        return tx

    return make_tx


def learning_rates(cfg: ml_collections.ConfigDict, total_steps: int, multipliers: dict[str, float]
                   ) -> Callable[[int], dict[str, float]]:
    """``step -> {'train/lr/<group>': m · lr(step)}`` for each trained group (host floats, for the trackers).

    ``multipliers``: ``{group label: m}`` of the groups that train (frozen ones have no learning rate).
    """
    schedule = make_schedule(cfg, total_steps)

    def at(step: int) -> dict[str, float]:
        lr = float(schedule(step))
        return {f"train/lr/{label}": m * lr for label, m in multipliers.items()}

    return at

