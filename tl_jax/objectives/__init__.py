"""Objectives (``config.objective.name``): the loss and test metrics of a run.

Importing this package registers every objective; see :mod:`tl_jax.objectives.base`
for the interface.
"""
from tl_jax.objectives.base import Objective, apply_model, build_objective, default_configs, model_inputs, register

__all__ = ["Objective", "apply_model", "build_objective", "default_configs", "model_inputs", "register"]
