"""The checks of config groups whose rules live with the code that reads the group.

A module that owns a config group registers its check when it is imported::

    # tl_jax/train/lp_ft.py
    config_checks.register_check("recipe", check_recipe)

and :func:`tl_jax.config.validate` runs every registered check after the
schema's own. This registry imports nothing, so a group's module (models,
train, evaluation...) can register without importing :mod:`tl_jax.config`, and
``tl_jax.config`` stays the schema without importing them. Whoever calls
``validate`` imports the owning modules first (the train setup does).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], None]  # check(config) raises ValueError with one line naming the key
_CHECKS: dict[str, Check] = {}


def register_check(name: str, check: Check) -> None:
    """Have :func:`tl_jax.config.validate` run ``check(config)``; ``name``: the group it checks (``'recipe'``).

    A second registration under ``name`` replaces the first (a reloaded module).
    """
    _CHECKS[name] = check


def registered_checks() -> dict[str, Check]:
    """The registered checks by name, in registration order."""
    return dict(_CHECKS)


def run_checks(config: Any) -> None:
    """Every registered check on ``config``; the first ``ValueError`` propagates."""
    for check in list(_CHECKS.values()):
        check(config)
