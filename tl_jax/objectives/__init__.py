"""Objectives (``config.objective.name``): one module per method or close family.

Each module holds a method's pure loss functions (maths in their docstrings) at
the top and its :class:`~tl_jax.objectives.base.Objective` subclass, decorated
with :func:`~tl_jax.objectives.base.register`, at the bottom. Importing this
package imports every module in it, so each method registers itself: a new
method is one new file here (plus its test file and a docs entry), no list to
edit. See :mod:`tl_jax.objectives.base` for the interface.
"""
import importlib
import pkgutil

from tl_jax.objectives.base import Objective, apply_model, build_objective, default_configs, model_inputs, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Objective", "apply_model", "build_objective", "default_configs", "model_inputs", "register"]
