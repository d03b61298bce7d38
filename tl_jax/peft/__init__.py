"""Parameter-efficient fine-tuning as links of the model chain (``config.peft``; docs/peft.md).

``config.peft.lora.rank > 0`` wraps the run's model in :class:`~tl_jax.peft.lora.LoraModel` (the
``BEFORE_INIT`` link :func:`lora_link` of ``tl_jax/train/build.py``), so LoRA composes with every objective:
the objective sees one model whose params have a ``lora`` subtree. Likewise ``config.peft.adapter.dim > 0``
(bottleneck adapters, :mod:`tl_jax.peft.adapters`: an ``adapter`` subtree, :func:`adapter_link`) and
``config.peft.prompt.num_tokens > 0`` (VPT prompt tokens, :mod:`tl_jax.peft.prompts`: a ``prompt`` subtree,
:func:`prompt_link`); the three compose, in that order (LoRA innermost).

The param rules with PEFT on (:func:`param_rules`), after the objective's fixed rules:

* ``config.peft.freeze_base = True`` (default): ``[["lora/.*", 1.0], ["head/.*", 1.0], [".*", null]]``
  (``adapter/.*``, ``prompt/.*`` likewise for the transforms that are on): their params and the head train, the base is frozen (no gradient update, no optimizer state);
  the ``head/.*`` rule only when the model has a ``head``; the objective's own params (``extra_keys``: a
  DANN discriminator, ...) train too, one ``KEY/.*`` rule each. ``config.param_rules`` must stay at its default.
* ``freeze_base = False``: ``config.param_rules`` as it is: the user's table names ``lora/.*`` too (the
  default ``[[".*", 1.0]]`` trains LoRA and the whole base; the LP-FT probe's freezes LoRA at its zero init).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from tl_jax.peft.adapters import ADAPTER, AdapterModel, PLACEMENTS
from tl_jax.peft.adapters import ACTIVATIONS as ADAPTER_ACTIVATIONS
from tl_jax.peft.lora import LORA, LoraModel, count, merge_lora, scale  # noqa: F401 (public here)
from tl_jax.peft.lora_nnx import NnxLoraModel, lora_model  # noqa: F401 (public here)
from tl_jax.peft.prompts import PROMPT, PromptModel
from tl_jax.util import config_checks
from tl_jax.util.tree_paths import flatten_paths

DEFAULT_RULES = [[".*", 1.0]]  # config.param_rules' default (tl_jax/config.py)


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether LoRA is on (``config.peft.lora.rank > 0``); :func:`active_keys` lists every transform that is on."""
    return int(config.peft.lora.rank) > 0


def active_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The top-level params keys of the transforms ``config.peft`` turns on (``lora``, ``adapter``, ``prompt``)."""
    on = (enabled(config), int(config.peft.adapter.dim) > 0, int(config.peft.prompt.num_tokens) > 0)
    return [key for key, is_on in zip((LORA, ADAPTER, PROMPT), on) if is_on]


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_adapter_prompt(config: ml_collections.ConfigDict) -> None:
    """One-line errors naming the ``config.peft.adapter`` / ``config.peft.prompt`` key to fix."""
    adapter, prompt = config.peft.adapter, config.peft.prompt
    if not _is_int(adapter.dim, 0):
        raise ValueError(f"config.peft.adapter.dim must be an int >= 0 (the bottleneck width; 0: off), got "
                         f"{adapter.dim!r}")
    if adapter.placement not in PLACEMENTS:
        raise ValueError(f"config.peft.adapter.placement must be one of {PLACEMENTS}, got {adapter.placement!r}")
    if adapter.act not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"config.peft.adapter.act must be one of {tuple(ADAPTER_ACTIVATIONS)}, got {adapter.act!r}")
    if not _is_int(prompt.num_tokens, 0):
        raise ValueError(f"config.peft.prompt.num_tokens must be an int >= 0 (0: off), got {prompt.num_tokens!r}")
    if not isinstance(prompt.deep, bool):
        raise ValueError(f"config.peft.prompt.deep must be true (VPT-deep) or false (VPT-shallow), got "
                         f"{prompt.deep!r}")


def check(config: ml_collections.ConfigDict) -> None:
    """One-line errors naming the ``config.peft`` key to fix."""
    lora = config.peft.lora
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 0:
        raise ValueError(f"config.peft.lora.rank must be an int >= 0 (0: off), got {lora.rank!r}")
    check_adapter_prompt(config)
    if active_keys(config) and config.peft.freeze_base and [list(r) for r in config.param_rules] != DEFAULT_RULES:
        raise ValueError(f"config.peft.freeze_base=True sets the param rules ({', '.join(active_keys(config))} "
                         f"and head train, the rest is frozen); set config.peft.freeze_base=False to give your "
                         f"own config.param_rules")
    if not enabled(config):
        return
    if not lora.alpha > 0:
        raise ValueError(f"config.peft.lora.alpha must be > 0, got {lora.alpha!r}")
    if isinstance(lora.dropout, bool) or not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ValueError(f"config.peft.lora.dropout must be a number in [0, 1), got {lora.dropout!r}")
    if not isinstance(lora.targets, str) or not lora.targets:
        raise ValueError(f"config.peft.lora.targets must be a non-empty regex over module paths, got {lora.targets!r}")


config_checks.register_check("peft", check)


def lora_link(model: Any, stage: Any) -> Any:
    """Model-chain link (``tl_jax/train/build.py`` BEFORE_INIT): the model with LoRA when it is on."""
    if not enabled(stage.config):
        return model
    lora = stage.config.peft.lora
    return lora_model(model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rslora=lora.rslora,
                      dropout=lora.dropout)  # linen: LoraModel; NNX: NnxLoraModel (weight space)


def adapter_link(model: Any, stage: Any) -> Any:
    """Model-chain link (BEFORE_INIT, after LoRA): the model with bottleneck adapters when they are on."""
    adapter = stage.config.peft.adapter
    if int(adapter.dim) == 0:
        return model
    return AdapterModel(model, dim=int(adapter.dim), placement=adapter.placement, act=adapter.act)


def prompt_link(model: Any, stage: Any) -> Any:
    """Model-chain link (BEFORE_INIT, after the adapters): the ViT with VPT prompt tokens when they are on."""
    prompt = stage.config.peft.prompt
    if int(prompt.num_tokens) == 0:
        return model
    return PromptModel(model, num_tokens=int(prompt.num_tokens), deep=bool(prompt.deep))


def param_rules(config: ml_collections.ConfigDict, params: Any, extra_keys: Sequence[str] = ()) -> list[list]:
    """The run's rule table after the objective's fixed rules (module doc): ``config.param_rules`` as it is
    when PEFT is off. ``extra_keys``: the objective's own top-level params (a DANN discriminator, a
    multitask's heads), which train with the base frozen too."""
    user = [list(r) for r in config.param_rules]
    if not active_keys(config) or not config.peft.freeze_base:
        return user
    paths = list(flatten_paths(params))
    trained = ["head"] + sorted(extra_keys)
    return [[f"{k}/.*", 1.0] for k in active_keys(config)] + [
        [f"{k}/.*", 1.0] for k in trained if any(p.startswith(f"{k}/") for p in paths)] + [[".*", None]]


def dont_load(config: ml_collections.ConfigDict) -> list[str]:
    """``config.dont_load`` plus the PEFT params (fresh, never in a base checkpoint) of the transforms that are on."""
    return list(config.dont_load) + [f"{k}/.*" for k in active_keys(config)]


def merge(params: Any, config: ml_collections.ConfigDict) -> Any:
    """``params`` of a LoRA run folded into plain base params (:func:`tl_jax.peft.lora.merge_lora`)."""
    unfoldable = [k for k in (ADAPTER, PROMPT) if k in params]
    if unfoldable:
        raise ValueError(f"the params have {' and '.join(unfoldable)} params (config.peft.{unfoldable[0]}), which "
                         f"add computation and cannot be folded into the base weights: no merge (docs/peft.md)")
    if not enabled(config):
        raise ValueError("the run has no LoRA (config.peft.lora.rank = 0): nothing to merge")
    lora = config.peft.lora
    return merge_lora(params, scale(lora.alpha, lora.rank, lora.rslora))
