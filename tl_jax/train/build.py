"""Build a run's model, objective, optimizer and initial state from its config (``init_from`` merged in)."""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tl_jax.models import check_logits, model_from_config, norm_paths
from tl_jax.models import precision as precision_lib
from tl_jax.objectives import build_objective, model_inputs
from tl_jax.objectives.regularizers import add_regularizers
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.util.references import is_reference
from tl_jax.train import lp_ft
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.optim import make_group_tx
from tl_jax.train.state import TrainState
from tl_jax.params import param_rules as rules_lib
from tl_jax.params.merge import merge_params

log = logging.getLogger("tl_jax")
PyTree = Any


def build_model_and_state(config: ml_collections.ConfigDict, num_classes: int, sample: dict, mesh, *,
                          start_from: dict | None = None, groups_log_level: int = logging.INFO):
    """Objective (with its model), optimizer and initial replicated state, ``init_from`` merged in.

    ``start_from``: ``{'params', 'batch_stats'?}`` replacing every param (objective extras included) and
    BatchNorm statistic once the model is built (LP-FT's probe: :mod:`tl_jax.train.lp_ft`).
    ``groups_log_level``: the level of the param-groups table (``tl-jax eval``/``predict``: DEBUG, it is
    about training).
    """
    # a zoo name or the user's factory (models/references.py); config.precision: its compute dtype if it takes one
    model = model_from_config(config.model, num_classes, **precision_lib.model_kwargs(config.model, config.precision))
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng, extra_rng = jax.random.split(rng, 3)
    args, kwargs = model_inputs(sample)
    if is_reference(config.model.name):  # the user's model: logits [B, num_classes], before anything else runs
        check_logits(model, init_rng, sample, num_classes, config.model.name)
    objective = build_objective(config, model)
    # config.precision: every apply casts params and inputs to the compute dtype, outputs back to float32
    objective.model = precision_lib.wrap(objective.model, config.precision)
    variables = jax.jit(lambda r: objective.model.init(r, *args, train=False, **kwargs))(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if config.init_from:
        loaded = load_variables(config.init_from)
        mapping = [list(r) for r in config.init_map]  # config.init_map: source paths renamed (or dropped) first
        params = merge_params(loaded["params"], params, config.dont_load, source=f"init_from {config.init_from}",
                              mapping=mapping)
        if batch_stats:
            batch_stats = merge_params(loaded.get("batch_stats", {}), batch_stats, config.dont_load,
                                       source=f"init_from {config.init_from} (batch_stats)", check_rules=False,
                                       mapping=mapping)
        log.info("loaded %s (kept fresh: %s)", config.init_from, list(config.dont_load))
    params = objective.init_params(jax.random.fold_in(extra_rng, 1), params, batch_stats)
    extra, aux = objective.init_extra(extra_rng, params, batch_stats)
    clash = sorted(set(extra) & set(params))
    if clash:
        raise ValueError(f"objective {objective.name!r} adds params {clash} that the model already has")
    params = {**params, **extra}
    if start_from is not None:  # config.recipe 'lp_ft': the fine-tune starts where the probe ended
        params, batch_stats = lp_ft.start_from_probe(params, batch_stats, start_from, "the LP-FT probe (WORKDIR/lp)")
    rules = objective.fixed_rules() + [list(r) for r in config.param_rules]
    groups = objective.param_groups = rules_lib.ParamGroups.resolve(params, rules)  # the rules, matched once
    frozen_norms = groups.frozen_modules(norm_paths(batch_stats)) if batch_stats else ()
    if frozen_norms and hasattr(objective.model, "frozen_norms"):  # zoo models and NNX: inference-mode norms
        objective.model = objective.model.clone(frozen_norms=frozen_norms)
    elif frozen_norms:  # the user's linen module cannot switch them: their statistics are kept fixed instead
        log.warning("the model has no frozen_norms attribute: its BatchNorm layers %s, whose params are frozen, "
                    "still normalise with batch statistics in training; their running statistics are kept "
                    "fixed", list(frozen_norms))
        objective.loss = keep_frozen_stats(objective.loss, frozen_norms)
    tx = groups.optimizer(make_group_tx(config.optimizer, config.train.steps,
                                        mu_dtype=precision_lib.moments_dtype(config.precision)))
    log.log(groups_log_level, "param groups (config.param_rules):\n%s", groups.table())
    objective, aux = add_regularizers(objective, config, params, rules, aux)  # config.loss.{l1,l2,l2_sp}
    repl = mesh_lib.replicated(mesh)

    def init_state(params, batch_stats, aux):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=train_rng, skipped=jnp.zeros((), jnp.int32), aux=aux)

    state = jax.jit(init_state, out_shardings=repl)(params, batch_stats, aux)
    return objective, tx, state


def keep_frozen_stats(loss_fn, frozen_norms: tuple[str, ...]):
    """``loss_fn`` whose returned batch statistics keep the old values under ``frozen_norms`` (module paths)."""
    prefixes = tuple(p + "/" for p in frozen_norms)

    def loss(params, batch_stats, aux, batch, rng, step):
        value, (new_stats, metrics) = loss_fn(params, batch_stats, aux, batch, rng, step)
        kept = jax.tree_util.tree_map_with_path(
            lambda path, new, old: old if rules_lib.path_str(path).startswith(prefixes) else new, new_stats,
            batch_stats)
        return value, (kept, metrics)

    return loss


def param_groups(config: ml_collections.ConfigDict, objective: Any, params: PyTree) -> rules_lib.ParamGroups:
    """The run's resolved :class:`~tl_jax.params.param_rules.ParamGroups` (set by
    :func:`build_model_and_state`; resolved here for an objective built otherwise)."""
    groups = getattr(objective, "param_groups", None)
    if groups is None:
        groups = rules_lib.ParamGroups.resolve(params, objective.fixed_rules() + [list(r) for r in config.param_rules])
    return groups

