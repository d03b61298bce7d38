"""Which params train, at which learning rate: one regex table, first match wins.

A rule table is a list of ``(regex, multiplier)`` pairs over '/'-joined param
paths (``backbone/conv1/kernel``)::

    [("backbone/.*", None),   # None: frozen (no update, no optimizer state)
     ("head/.*", 1.0)]        # trainable, learning rate x 1.0

For a param ``p`` the first rule whose regex ``re.fullmatch``-es ``p`` decides.
Every param must be matched by some rule, and every rule must match some param
(otherwise it is dead, usually a typo); both are errors naming the path/rule.

``build_optimizer`` turns the table into ONE optax transformation with
``optax.partition``: frozen params get ``optax.set_to_zero()`` and so hold no
optimizer state; a group with multiplier ``m`` gets ``make_tx(m)`` (the base
optimizer with learning rate ``m * lr(step)``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from tl_jax.util.tree_paths import flatten_paths, path_str  # noqa: F401 (re-exported)

PyTree = Any
Rule = tuple[str, float | None]
FROZEN = "frozen"


class ParamRuleError(ValueError):
    """A rule table that does not cover the params exactly."""


def normalize_rules(rules: Sequence[Sequence[Any]], where: str = "config.param_rules") -> list[Rule]:
    """Validate and compile-check a rule table; returns ``[(regex, mult|None)]``."""
    out: list[Rule] = []
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence) or not rules:
        raise ParamRuleError(f"{where} must be a non-empty list of [regex, multiplier|null] pairs, got {rules!r}")
    for i, rule in enumerate(rules):
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise ParamRuleError(f"{where}[{i}] must be a [regex, multiplier|null] pair, got {rule!r}")
        pattern, mult = rule
        if not isinstance(pattern, str):
            raise ParamRuleError(f"{where}[{i}]: regex must be a string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ParamRuleError(f"{where}[{i}]: invalid regex {pattern!r}: {e}") from None
        if mult is not None:
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
                raise ParamRuleError(
                    f"{where}[{i}] ({pattern!r}): multiplier must be a finite number >= 0 or null (frozen), got {mult!r}")
            mult = float(mult)
        out.append((pattern, mult))
    return out


def match_rules(params: PyTree, rules: Sequence[Sequence[Any]], where: str = "config.param_rules") -> dict[str, float | None]:
    """``{param_path: multiplier | None}`` by first match; errors on gaps and dead rules."""
    table = normalize_rules(rules, where)
    compiled = [re.compile(p) for p, _ in table]
    used = [False] * len(table)
    result: dict[str, float | None] = {}
    unmatched = []
    for path in flatten_paths(params):
        for i, rx in enumerate(compiled):
            if rx.fullmatch(path):
                result[path] = table[i][1]
                used[i] = True
                break
        else:
            unmatched.append(path)
    if unmatched:
        raise ParamRuleError(
            f"{where}: no rule matches param(s) {', '.join(unmatched)}; add a rule (e.g. ['.*', 1.0] last)")
    dead = [f"[{i}] {table[i][0]!r}" for i in range(len(table)) if not used[i]]
    if dead:
        raise ParamRuleError(
            f"{where}: rule(s) {', '.join(dead)} match no param (typo, or shadowed by an earlier rule); "
            f"param paths look like {next(iter(result))!r}")
    return result


def group_label(mult: float | None) -> str:
    return FROZEN if mult is None else f"lr_x{mult:g}"


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """A rule table resolved against one params tree, once: each param path's multiplier (``None`` = frozen).

    Everything a run derives from ``param_rules`` reads this one value: the optimizer's partition,
    the trainable mask of the step, the BatchNorm layers to freeze, the groups table of the log,
    the learning rates the trackers show and the feature cache's eligibility. It holds paths and
    shapes only, so linen and NNX models (the same path-keyed params) share it.
    """

    multipliers: dict[str, float | None]  # '/'-joined param path -> multiplier, in the tree's leaf order
    sizes: dict[str, int]  # param path -> number of elements
    treedef: Any  # the params' pytree structure

    @classmethod
    def resolve(cls, params: PyTree, rules: Sequence[Sequence[Any]], where: str = "config.param_rules"
                ) -> "ParamGroups":
        """Match ``rules`` against ``params`` (errors on unmatched params and dead rules, naming them)."""
        leaves = flatten_paths(params)
        return cls(match_rules(params, rules, where), {k: int(np.prod(np.shape(v))) for k, v in leaves.items()},
                   jax.tree_util.tree_structure(params))

    def _tree(self, values: list) -> PyTree:
        return jax.tree_util.tree_unflatten(self.treedef, values)

    def labels(self) -> PyTree:
        """Pytree of group labels ('frozen', 'lr_x1', 'lr_x0.1', ...) shaped like the params."""
        return self._tree([group_label(m) for m in self.multipliers.values()])

    def trainable(self) -> PyTree:
        """Bool pytree: True where the param trains."""
        return self._tree([m is not None for m in self.multipliers.values()])

    def trained(self) -> dict[str, float]:
        """``{group label: multiplier}`` of the groups that train."""
        return {group_label(m): m for m in self.multipliers.values() if m is not None}

    def frozen_modules(self, modules: Sequence[str]) -> tuple[str, ...]:
        """The given module paths (e.g. BatchNorm layers) whose params are ALL frozen."""
        out = []
        for mod in modules:
            owned = [m for p, m in self.multipliers.items() if p.startswith(mod + "/")]
            if owned and all(m is None for m in owned):
                out.append(mod)
        return tuple(out)

    def optimizer(self, make_tx: Callable[[float], optax.GradientTransformation]) -> optax.GradientTransformation:
        """One ``optax.partition`` over the groups: frozen -> ``set_to_zero`` (no state), else ``make_tx(m)``."""
        transforms: dict[str, optax.GradientTransformation] = {}
        for m in self.multipliers.values():
            transforms.setdefault(group_label(m), optax.set_to_zero() if m is None else make_tx(m))
        return optax.partition(transforms, self.labels())

    def table(self) -> str:
        """Markdown table: one row per group with its #tensors and #params."""
        rows: dict[str, list[int]] = {}
        for path, m in self.multipliers.items():
            r = rows.setdefault(group_label(m), [0, 0])
            r[0] += 1
            r[1] += self.sizes[path]
        total = sum(r[1] for r in rows.values()) or 1
        lines = ["| group | tensors | params | share |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {n} | {size:,} | {100 * size / total:.1f}% |" for label, (n, size) in rows.items()]
        return "\n".join(lines)


def label_tree(params: PyTree, rules: Sequence[Sequence[Any]], where: str = "config.param_rules") -> PyTree:
    """Pytree of group labels ('frozen', 'lr_x1', 'lr_x0.1', ...) shaped like ``params``."""
    return ParamGroups.resolve(params, rules, where).labels()


def trainable_mask(params: PyTree, rules: Sequence[Sequence[Any]]) -> PyTree:
    """Bool pytree: True where the param trains (multiplier not None)."""
    return ParamGroups.resolve(params, rules).trainable()


def frozen_module_paths(params: PyTree, rules: Sequence[Sequence[Any]], modules: Sequence[str]) -> tuple[str, ...]:
    """The given module paths (e.g. BatchNorm layers) whose params are ALL frozen."""
    return ParamGroups.resolve(params, rules).frozen_modules(modules)


def build_optimizer(params: PyTree, rules: Sequence[Sequence[Any]],
                    make_tx: Callable[[float], optax.GradientTransformation]) -> optax.GradientTransformation:
    """One ``optax.partition`` over the rule groups; frozen -> ``set_to_zero``.

    ``make_tx(m)`` builds the optimizer for a group whose learning rate is
    multiplied by ``m``. A multiplier of 0.0 is allowed (trainable with zero lr,
    still holding state); use ``None`` to freeze.
    """
    return ParamGroups.resolve(params, rules).optimizer(make_tx)


def summary_table(params: PyTree, rules: Sequence[Sequence[Any]]) -> str:
    """Markdown table: one row per rule group with its #tensors and #params."""
    return ParamGroups.resolve(params, rules).table()
