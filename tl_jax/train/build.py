"""Build a run's model, objective, optimizer and initial state from its config (``init_from`` merged in).

The model is finished first, through an explicit chain of model transforms (links), and the
objective is then built once with it and stays immutable::

    config.model (zoo name or the user's reference; its logits checked)
      → the objective's own link: its heads (multitask, joint: one head per task)
      → BEFORE_INIT:  LoRA, adapters, prompts (config.peft, tl_jax/peft), precision (config.precision)
      → the starting variables: init, config.init_from, the objective's init_params / init_extra,
        the LP-FT probe's params (start_from)
      → param groups: config.param_rules (after the objective's fixed rules) resolved once
      → AFTER_GROUPS: frozen norms (inference-mode BatchNorm where the params are frozen),
                      pmap BatchNorm axis (config.parallel.mode = 'pmap')
      → the objective with the finished model, the groups, the config.loss penalty terms and,
        for a user's module that cannot switch its norms, the BatchNorm statistics its loss keeps

A link is ``link(model, stage) -> model``; adding a transform (pretrained weights, LoRA, adapters)
is one more entry in :data:`BEFORE_INIT` or :data:`AFTER_GROUPS`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tl_jax import peft as peft_lib
from tl_jax.models import check_logits, model_from_config, norm_paths
from tl_jax.models import precision as precision_lib
from tl_jax.models.inputs import model_inputs
from tl_jax.objectives import build_objective
from tl_jax.objectives.base import Objective
from tl_jax.objectives.regularizers import penalties as regularizer_penalties
from tl_jax.params import param_rules as rules_lib
from tl_jax.params.merge import merge_params
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import lp_ft
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.optim import make_group_tx
from tl_jax.train.state import TrainState
from tl_jax.util.log_once import warn_once
from tl_jax.util.references import is_reference

log = logging.getLogger("tl_jax")
PyTree = Any
PMAP_AXIS = mesh_lib.DATA  # the axis name of the pmap strategy (tl_jax/parallel/pmap.py)


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a model link may read: the run's config and, after the variables exist, their BatchNorm
    statistics and resolved param groups."""

    config: ml_collections.ConfigDict
    batch_stats: PyTree = None
    groups: rules_lib.ParamGroups | None = None

    def frozen_norms(self) -> tuple[str, ...]:
        """Module paths of the BatchNorm layers whose params are all frozen."""
        return self.groups.frozen_modules(norm_paths(self.batch_stats)) if self.batch_stats else ()


Link = Callable[[Any, Stage], Any]


def precision_link(model: Any, stage: Stage) -> Any:
    """config.precision: every apply casts params and inputs to the compute dtype, outputs back to float32."""
    return precision_lib.wrap(model, stage.config.precision)


def frozen_norms_link(model: Any, stage: Stage) -> Any:
    """Zoo models and NNX: BatchNorm layers with frozen params normalise in inference mode."""
    frozen = stage.frozen_norms()
    return model.clone(frozen_norms=frozen) if frozen and hasattr(model, "frozen_norms") else model


def pmap_model(model: Any) -> Any:
    """``model`` whose BatchNorm statistics span the pmap axis (global-batch statistics), when it can."""
    if hasattr(model, "norm_axis_name"):
        return model.clone(norm_axis_name=PMAP_AXIS)
    if getattr(model, "norm_module_paths", lambda: ())():
        warn_once(log, "config.parallel.mode='pmap': %s has no norm_axis_name, so its BatchNorm statistics "
                  "are per device (use mode='jit' for global-batch statistics)", type(model).__name__)
    return model


def pmap_link(model: Any, stage: Stage) -> Any:
    """config.parallel.mode = 'pmap': BatchNorm statistics over all devices (:func:`pmap_model`)."""
    return pmap_model(model) if stage.config.parallel.mode == "pmap" else model


BEFORE_INIT: tuple[Link, ...] = (peft_lib.lora_link, peft_lib.adapter_link, peft_lib.prompt_link,  # config.peft
                                  precision_link)  # the model whose variables are initialised
AFTER_GROUPS: tuple[Link, ...] = (frozen_norms_link, pmap_link)  # links that read the param groups


def chain(model: Any, links: tuple[Link, ...], stage: Stage) -> Any:
    """``model`` through ``links`` in order."""
    for link in links:
        model = link(model, stage)
    return model


def kept_stats(model: Any, stage: Stage) -> tuple[str, ...]:
    """Frozen BatchNorm layers of a user's module that cannot switch them: the loss keeps their statistics."""
    frozen = stage.frozen_norms()
    if not frozen or hasattr(model, "frozen_norms"):  # those are switched by frozen_norms_link
        return ()
    warn_once(log, "the model has no frozen_norms attribute: its BatchNorm layers %s, whose params are frozen, "
              "still normalise with batch statistics in training; their running statistics are kept "
              "fixed", list(frozen))
    return frozen


def starting_variables(setup: Objective, config: ml_collections.ConfigDict, sample: dict, init_rng: jax.Array,
                       extra_rng: jax.Array, start_from: dict | None) -> tuple[PyTree, PyTree, dict]:
    """``(params, batch_stats, aux)`` the run starts from: init, ``init_from`` merged, the objective's
    ``init_params``/``init_extra``, and LP-FT's probe (``start_from``) replacing everything."""
    args, kwargs = model_inputs(sample)
    variables = jax.jit(lambda r: setup.model.init(r, *args, train=False, **kwargs))(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if config.init_from:
        loaded = load_variables(config.init_from)
        mapping = [list(r) for r in config.init_map]  # config.init_map: source paths renamed (or dropped) first
        params = merge_params(loaded["params"], params, peft_lib.dont_load(config),  # + lora/.* when on
                              source=f"init_from {config.init_from}", mapping=mapping)
        if batch_stats:
            batch_stats = merge_params(loaded.get("batch_stats", {}), batch_stats, config.dont_load,
                                       source=f"init_from {config.init_from} (batch_stats)", check_rules=False,
                                       mapping=mapping)
        log.info("loaded %s (kept fresh: %s)", config.init_from, list(config.dont_load))
    params = setup.init_params(jax.random.fold_in(extra_rng, 1), params, batch_stats)
    extra, aux = setup.init_extra(extra_rng, params, batch_stats)
    clash = sorted(set(extra) & set(params))
    if clash:
        raise ValueError(f"objective {setup.name!r} adds params {clash} that the model already has")
    params = {**params, **extra}
    if start_from is not None:  # config.recipe 'lp_ft': the fine-tune starts where the probe ended
        params, batch_stats = lp_ft.start_from_probe(params, batch_stats, start_from, "the LP-FT probe (WORKDIR/lp)")
    return params, batch_stats, aux


def build_model_and_state(config: ml_collections.ConfigDict, num_classes: int, sample: dict, mesh, *,
                          start_from: dict | None = None, groups_log_level: int = logging.INFO):
    """Objective (with its finished model), optimizer and initial replicated state, ``init_from`` merged in.

    ``start_from``: ``{'params', 'batch_stats'?}`` replacing every param (objective extras included) and
    BatchNorm statistic once the model is built (LP-FT's probe: :mod:`tl_jax.train.lp_ft`).
    ``groups_log_level``: the level of the param-groups table (``tl-jax eval``/``predict``: DEBUG, it is
    about training).
    """
    # a zoo name or the user's factory (models/references.py); config.precision: its compute dtype if it takes one
    model = model_from_config(config.model, num_classes, **precision_lib.model_kwargs(config.model, config.precision))
    init_rng, train_rng, extra_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    if is_reference(config.model.name):  # the user's model: logits [B, num_classes], before anything else runs
        check_logits(model, init_rng, sample, num_classes, config.model.name)
    setup = build_objective(config, model)  # the objective's own link: its heads (multitask, joint)
    setup = setup.replace(model=chain(setup.model, BEFORE_INIT, Stage(config)))
    params, batch_stats, aux = starting_variables(setup, config, sample, init_rng, extra_rng, start_from)
    rules = setup.fixed_rules() + peft_lib.param_rules(config, params, setup.extra_keys)  # config.peft's defaults
    groups = rules_lib.ParamGroups.resolve(params, rules)
    stage = Stage(config, batch_stats, groups)
    model = chain(setup.model, AFTER_GROUPS, stage)
    tx = groups.optimizer(make_group_tx(config.optimizer, config.train.steps,
                                        mu_dtype=precision_lib.moments_dtype(config.precision)))
    log.log(groups_log_level, "param groups (config.param_rules):\n%s", groups.table())
    penalties, aux = regularizer_penalties(config, params, groups, aux, setup.name)  # config.loss.{l1,l2,l2_sp}
    objective = setup.replace(model=model, param_groups=groups, penalties=penalties,
                              frozen_stats=kept_stats(setup.model, stage))
    repl = mesh_lib.replicated(mesh)

    def init_state(params, batch_stats, aux):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=train_rng, skipped=jnp.zeros((), jnp.int32), aux=aux)

    state = jax.jit(init_state, out_shardings=repl)(params, batch_stats, aux)
    return objective, tx, state


def param_groups(config: ml_collections.ConfigDict, objective: Any, params: PyTree) -> rules_lib.ParamGroups:
    """The run's resolved :class:`~tl_jax.params.param_rules.ParamGroups` (given to the objective by
    :func:`build_model_and_state`; resolved here for an objective built otherwise)."""
    groups = getattr(objective, "param_groups", None)
    if groups is None:
        groups = rules_lib.ParamGroups.resolve(params, objective.fixed_rules() + peft_lib.param_rules(
            config, params, getattr(objective, "extra_keys", ())))
    return groups
