"""LP-FT in one run (``config.recipe.name='lp_ft'``): linear probe, then fine-tune from the probe.

Kumar et al. (ICLR 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"): fine-tuning a pretrained backbone under a
freshly initialised head lets the head's large, random early gradients distort
the features; training the head first on the frozen features (a linear probe)
and only then fine-tuning everything starts the fine-tune at a head that already
fits, so the features move less. Two phases of one config:

1. **probe** (``WORKDIR/lp``, a workdir of its own): the config with
   ``train.steps = recipe.lp_steps``, ``optimizer.learning_rate =
   recipe.lp_learning_rate`` (null: the fine-tune's) and the params matching
   ``recipe.lp_trainable`` (default ``head/.*``) trained, everything else frozen
   (``param_rules = [[p, 1.0] for p in lp_trainable] + [['.*', null]]``): with a
   deterministic ``train_pp`` the backbone's features are computed once
   (``config.train.feature_cache``), as for any linear probe;
2. **fine-tune** (``WORKDIR``): this config, its model built and ``init_from``
   merged as usual, then EVERY param (backbone, head, objective extras) and
   BatchNorm statistic replaced by the probe's final ones (:func:`probe_variables`),
   before the optimizer state is made: the fine-tune starts exactly where the
   probe ended, with fresh optimizer moments.

``WORKDIR/config.json`` records this config (``recipe`` included), the
probe's own ``config.json`` the derived one. Exact resume across the phase
change follows from the workdir contract: a finished probe is left as it is (its
``summary.json`` is read, nothing rerun), a killed one resumes from its
checkpoint; a killed fine-tune resumes from ITS checkpoint (which overrides the
start). The fine-tune's summary also holds the probe's final metrics as
``lp/<metric>``.
"""
from __future__ import annotations

import copy
import pathlib
import re
from typing import Any

import ml_collections

from tl_jax.params.merge import merge_params
from tl_jax.train.checkpoint import load_variables
from tl_jax.util import config_checks

PROBE_DIR = "lp"
RECIPES = ("", "lp_ft")
SUMMARY_PREFIX = "lp/"


def check_recipe(config: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors for ``config.recipe`` (the key to fix named)."""
    r = config.recipe
    if r.name not in RECIPES:
        raise ValueError(f"config.recipe.name must be one of {RECIPES} ('' = one run as configured), got {r.name!r}")
    if not r.name:
        return
    if not config.init_from:
        raise ValueError("config.recipe.name='lp_ft' probes pretrained features: set config.init_from (a pretrained "
                         "workdir or checkpoint)")
    if isinstance(r.lp_steps, bool) or not isinstance(r.lp_steps, int) or r.lp_steps < 1:
        raise ValueError(f"config.recipe.lp_steps must be an int >= 1 (the probe's steps), got {r.lp_steps!r}")
    lr = r.lp_learning_rate
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"config.recipe.lp_learning_rate must be > 0 (null: config.optimizer.learning_rate), "
                         f"got {lr!r}")
    pats = r.lp_trainable
    if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"config.recipe.lp_trainable must be a non-empty list of regexes (the probe's trained "
                         f"params, e.g. ['head/.*']), got {pats!r}")
    for p in pats:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"config.recipe.lp_trainable: invalid regex {p!r}: {e}") from None


config_checks.register_check("recipe", check_recipe)  # run by tl_jax.config.validate


def is_lp_ft(config: ml_collections.ConfigDict) -> bool:
    return config.recipe.name == "lp_ft"


def probe_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).expanduser().absolute() / PROBE_DIR


def probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The probe phase's config: ``config`` with the head alone trained for ``recipe.lp_steps`` (module doc)."""
    c = copy.deepcopy(config)
    r = config.recipe
    c.recipe.name = ""
    c.train.steps = r.lp_steps
    c.train.checkpoint_every = min(c.train.checkpoint_every, r.lp_steps)
    if r.lp_learning_rate is not None:
        c.optimizer.learning_rate = float(r.lp_learning_rate)
    c.param_rules = [[p, 1.0] for p in r.lp_trainable] + [[".*", None]]
    c.peft.freeze_base = False  # config.peft: these rules alone (LoRA stays at its zero-B init in the probe)
    c.train.early_stopping.metric = ""  # the probe runs its steps; early stopping is the fine-tune's
    c.evals = []  # periodic evaluators watch the fine-tune
    return c


def probe_variables(workdir: str | pathlib.Path) -> dict:
    """``{'params', 'batch_stats'?}`` of the finished probe of ``workdir`` (its last checkpoint)."""
    return load_variables(str(probe_dir(workdir)), where="config.recipe (the LP-FT probe in WORKDIR/lp)")


def start_from_probe(params: Any, batch_stats: Any, loaded: dict, where: str) -> tuple[Any, Any]:
    """``params`` / ``batch_stats`` replaced leaf for leaf by the probe's (same paths and shapes, else one error
    listing every mismatch: :func:`tl_jax.params.merge.merge_params` with nothing kept fresh)."""
    params = merge_params(loaded["params"], params, (), source=where)
    if batch_stats:
        batch_stats = merge_params(loaded.get("batch_stats", {}), batch_stats, (), source=f"{where} (batch_stats)")
    return params, batch_stats


def with_probe_summary(summary: dict, probe_summary: dict | None) -> dict:
    """The fine-tune's summary plus the probe's final metrics as ``lp/<metric>`` (timings kept out)."""
    if not probe_summary:
        return summary
    extra = {f"{SUMMARY_PREFIX}{k}": v for k, v in probe_summary.items()
             if k not in ("wall_s", "train_s", "compile_s") and not k.startswith(SUMMARY_PREFIX)}
    return {**summary, **extra}
