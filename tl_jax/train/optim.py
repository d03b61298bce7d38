"""Optimizer and learning-rate schedule from ``config.optimizer`` (all optax).

``make_group_tx(config.optimizer, total_steps)`` returns ``m -> tx`` used by
:func:`tl_jax.transfer.param_rules.build_optimizer`: the group with learning
rate multiplier ``m`` gets the base optimizer with ``lr_m(t) = m · lr(t)``.
"""
from __future__ import annotations

from collections.abc import Callable

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


def make_group_tx(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable[[float], optax.GradientTransformation]:
    """``m -> optax transformation`` for a param group with lr multiplier ``m``."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {cfg.learning_rate}")
    schedule = make_schedule(cfg, total_steps)

    def make_tx(mult: float) -> optax.GradientTransformation:
        lr = lambda t: mult * schedule(t)  # noqa: E731
        if cfg.name == "adam":
            tx = optax.adam(lr)
        elif cfg.name == "adamw":
            tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
        else:
            tx = optax.sgd(lr, momentum=cfg.momentum or None)
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

