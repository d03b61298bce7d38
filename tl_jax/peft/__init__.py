"""Parameter-efficient fine-tuning as a link of the model chain (``config.peft``; docs/peft.md).

``config.peft.lora.rank > 0`` wraps the run's model in :class:`~tl_jax.peft.lora.LoraModel` (the
``BEFORE_INIT`` link :func:`lora_link` of ``tl_jax/train/build.py``), so LoRA composes with every objective:
the objective sees one model whose params have a ``lora`` subtree.

The param rules with PEFT on (:func:`param_rules`), after the objective's fixed rules:

* ``config.peft.freeze_base = True`` (default): ``[["lora/.*", 1.0], ["head/.*", 1.0], [".*", null]]``:
  the LoRA params and the head train, the base is frozen (no gradient update, no optimizer state);
  the ``head/.*`` rule only when the model has a ``head``; the objective's own params (``extra_keys``: a
  DANN discriminator, ...) train too, one ``KEY/.*`` rule each. ``config.param_rules`` must stay at its default.
* ``freeze_base = False``: ``config.param_rules`` as it is: the user's table names ``lora/.*`` too (the
  default ``[[".*", 1.0]]`` trains LoRA and the whole base; the LP-FT probe's freezes LoRA at its zero init).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from tl_jax.peft.lora import LORA, LoraModel, count, merge_lora, scale  # noqa: F401 (public here)
from tl_jax.util import config_checks
from tl_jax.util.tree_paths import flatten_paths

DEFAULT_RULES = [[".*", 1.0]]  # config.param_rules' default (tl_jax/config.py)
LORA_RULE = [f"{LORA}/.*", 1.0]  # first rule of the freeze_base preset


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.peft`` adapts the model (``config.peft.lora.rank > 0``)."""
    return int(config.peft.lora.rank) > 0


def check(config: ml_collections.ConfigDict) -> None:
    """One-line errors naming the ``config.peft`` key to fix."""
    lora = config.peft.lora
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 0:
        raise ValueError(f"config.peft.lora.rank must be an int >= 0 (0: off), got {lora.rank!r}")
    if not enabled(config):
        return
    if not lora.alpha > 0:
        raise ValueError(f"config.peft.lora.alpha must be > 0, got {lora.alpha!r}")
    if isinstance(lora.dropout, bool) or not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ValueError(f"config.peft.lora.dropout must be a number in [0, 1), got {lora.dropout!r}")
    if not isinstance(lora.targets, str) or not lora.targets:
        raise ValueError(f"config.peft.lora.targets must be a non-empty regex over module paths, got {lora.targets!r}")
    if config.peft.freeze_base and [list(r) for r in config.param_rules] != DEFAULT_RULES:
        raise ValueError("config.peft.freeze_base=True sets the param rules (lora/.* and head/.* train, the rest is "
                         "frozen); set config.peft.freeze_base=False to give your own config.param_rules")


config_checks.register_check("peft", check)


def lora_link(model: Any, stage: Any) -> Any:
    """Model-chain link (``tl_jax/train/build.py`` BEFORE_INIT): the model with LoRA when it is on."""
    if not enabled(stage.config):
        return model
    lora = stage.config.peft.lora
    return LoraModel(model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rslora=lora.rslora,
                     dropout=lora.dropout)


def param_rules(config: ml_collections.ConfigDict, params: Any, extra_keys: Sequence[str] = ()) -> list[list]:
    """The run's rule table after the objective's fixed rules (module doc): ``config.param_rules`` as it is
    when PEFT is off. ``extra_keys``: the objective's own top-level params (a DANN discriminator, a
    multitask's heads), which train with the base frozen too."""
    user = [list(r) for r in config.param_rules]
    if not enabled(config):
        return user
    if not config.peft.freeze_base:
        return user
    paths = list(flatten_paths(params))
    trained = ["head"] + sorted(extra_keys)
    return [LORA_RULE] + [[f"{k}/.*", 1.0] for k in trained if any(p.startswith(f"{k}/") for p in paths)] + [
        [".*", None]]


def dont_load(config: ml_collections.ConfigDict) -> list[str]:
    """``config.dont_load`` plus the LoRA params (fresh, never in a base checkpoint) when LoRA is on."""
    return list(config.dont_load) + ([f"{LORA}/.*"] if enabled(config) else [])


def merge(params: Any, config: ml_collections.ConfigDict) -> Any:
    """``params`` of a LoRA run folded into plain base params (:func:`tl_jax.peft.lora.merge_lora`)."""
    if not enabled(config):
        raise ValueError("the run has no LoRA (config.peft.lora.rank = 0): nothing to merge")
    lora = config.peft.lora
    return merge_lora(params, scale(lora.alpha, lora.rank, lora.rslora))
