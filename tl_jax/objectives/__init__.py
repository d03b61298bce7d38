"""Objectives (``config.objective.name``): the loss and test metrics of a run.

Importing this package registers every objective; see :mod:`tl_jax.objectives.base`
for the interface.
"""
from tl_jax.objectives.base import Objective, apply_model, build_objective, default_configs, model_inputs, register
from tl_jax.objectives import multitask  # noqa: F401,E402  (registers 'multitask')
from tl_jax.objectives import multidomain  # noqa: F401,E402  (registers 'multidomain')
from tl_jax.objectives import distill  # noqa: F401,E402  (registers 'distill')
from tl_jax.objectives import residual  # noqa: F401,E402  (registers 'residual_output', 'residual_params')
from tl_jax.objectives import domain_adaptation  # noqa: F401,E402  (registers 'dann', 'coral', 'mmd')
from tl_jax.objectives import da_methods  # noqa: F401,E402  (registers 'cdan', 'mcc', 'mdd', 'self_training')
from tl_jax.objectives import finetune_methods  # noqa: F401,E402  (registers 'bss', 'delta', 'co_tuning')
from tl_jax.objectives import feature_distill  # noqa: F401,E402  (registers 'feature_distill')
from tl_jax.objectives import joint  # noqa: F401,E402  (registers 'joint')

__all__ = ["Objective", "apply_model", "build_objective", "default_configs", "model_inputs", "register"]
