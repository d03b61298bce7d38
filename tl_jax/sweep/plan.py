"""Which points of a sweep can share one vectorised (``jax.vmap``-ed) train step.

Points whose resolved configs differ only in *traced* keys run as one program:

==============================  ===========================================  ==========================
key                             enters the step as                           must agree (else split)
==============================  ===========================================  ==========================
``seed``, ``data.data_seed``,   the point's own initial state, dropout key   nothing
``data.shots_seed``,            and batch stream (built per point, stacked)
``init_from``
``optimizer.learning_rate``     a per-param factor on the update             nothing
``param_rules``                 the same factor (multipliers)                regexes, frozen rules, which
                                                                             rules share a multiplier,
                                                                             multipliers that are 0
``loss.l1``/``l2``/``l2_sp``    ``aux['hparams']`` read by the regularisers  whether each is 0 (on/off)
objective keys                  ``aux['hparams']`` read by the objective     list lengths
(``Objective.traced_keys``,
e.g. multitask λ)
==============================  ===========================================  ==========================

Every other key (model, data set, freezing, steps, ...) changes shapes or code:
points that differ there are separate groups, and :func:`plan_groups` says why.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from tl_jax import config as config_lib

STATE_KEYS = ("seed", "data.data_seed", "data.shots_seed", "init_from")
LR_KEY = "optimizer.learning_rate"
RULES_KEY = "param_rules"
REG_KEYS = ("loss.l1", "loss.l2", "loss.l2_sp")


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'optimizer.learning_rate': 0.001, 'param_rules': [...], ...}`` (lists kept whole)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(config_lib.to_dict(config), "")
    return out


def loss_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The traced keys read by the loss: the regularisers' and the objective's own."""
    from tl_jax.objectives.base import traced_keys  # deferred: JAX (planning needs none)

    return REG_KEYS + tuple(traced_keys(config))


def traced_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Every key a vectorised sweep may vary for this config."""
    return STATE_KEYS + (LR_KEY, RULES_KEY) + loss_keys(config)


def rules_signature(rules: Any) -> Any:
    """What of ``param_rules`` fixes the code: regexes, frozen rules, zero and shared multipliers."""
    sig = []
    for i, (regex, mult) in enumerate(rules):
        if mult is None:
            sig.append([regex, "frozen"])
        elif mult == 0:
            sig.append([regex, "zero"])
        else:
            first = next(j for j, (_, m) in enumerate(rules) if m == mult)
            sig.append([regex, f"group{first}"])
    return sig


def signature(key: str, value: Any) -> Any:
    """The part of a traced key's value that changes shapes or code (None: nothing)."""
    if key in STATE_KEYS or key == LR_KEY:
        return None
    if key == RULES_KEY:
        return rules_signature(value)
    if key in REG_KEYS:
        return bool(value and value > 0)
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def structure_key(config: ml_collections.ConfigDict) -> str:
    """Equal for two configs iff they can run in one vectorised step."""
    flat = flat_config(config)
    for key in traced_keys(config):
        if key in flat:
            flat[key] = ["<traced>", signature(key, flat[key])]
    return json.dumps(flat, sort_keys=True, default=str)


def swept_keys(configs: list[ml_collections.ConfigDict]) -> list[str]:
    """Dotted keys whose values are not the same in every config."""
    flats = [flat_config(c) for c in configs]
    keys = sorted(set().union(*flats))
    return [k for k in keys if any(f.get(k, "<absent>") != flats[0].get(k, "<absent>") for f in flats[1:])]


def blocker(configs: list[ml_collections.ConfigDict]) -> str | None:
    """Why these configs cannot be vectorised at all (devices, processes, parallel mode), or None."""
    import jax

    c = configs[0]
    if c.parallel.mode != "jit":
        return f"config.parallel.mode={c.parallel.mode!r} (vectorised sweeps need 'jit')"
    if jax.process_count() > 1:
        return f"{jax.process_count()} processes (vectorised sweeps run in one process)"
    if jax.device_count() > 1:
        return f"{jax.device_count()} devices (a vectorised sweep runs on one device; each run would use all)"
    with_val = [c for c in configs if c.data.val_fraction is not None or c.data.val_split is not None]
    if with_val or any(c.train.early_stopping.metric for c in configs):
        return ("a validation set or early stopping (config.data.val_fraction / val_split, "
                "config.train.early_stopping): vectorised sweeps evaluate the test split only")
    return None


def plan_groups(configs: list[ml_collections.ConfigDict]) -> tuple[list[list[int]], str]:
    """Split points into groups that may share one vmapped step; returns ``(groups, explanation)``.

    ``groups`` are lists of indices into ``configs`` in first-seen order; the
    explanation names the keys that forced separate groups (empty if none).
    """
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_key.setdefault(structure_key(c), []).append(i)
    groups = list(by_key.values())
    if len(groups) <= 1:
        return groups, ""
    reps = [configs[g[0]] for g in groups]
    flats = [flat_config(c) for c in reps]
    splitters = []
    for key in swept_keys(reps):
        if key in traced_keys(reps[0]):
            sigs = {json.dumps(signature(key, f.get(key)), default=str) for f in flats}
            if len(sigs) > 1:
                splitters.append(f"config.{key} (its {'on/off' if key in REG_KEYS else 'structure'})")
        else:
            splitters.append(f"config.{key}")
    return groups, ("separate runs where " + ", ".join(splitters) + " differ (changes shapes or code)"
                    if splitters else "")
