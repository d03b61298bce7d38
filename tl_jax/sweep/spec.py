"""Sweep specifications: which runs a study is made of.

A config file may define ``get_sweep(arg)`` next to ``get_config(arg)``; it
returns a list of *points*, one dict per run. The convention, like a command
line of ``tl-jax train``:

* a plain key (``method``, ``shots``, ``seed``) is a ``get_config`` argument:
  the point's plain keys become ``--config FILE:method=finetune,shots=10,seed=0``;
* a key starting with ``config.`` is a config override, exactly like
  ``--config.optimizer.learning_rate=3e-4`` (any value JSON can hold: numbers,
  lists, null);
* keys starting with ``_`` steer the sweep and are not part of the run:
  ``_name`` (the sub-workdir name, default :func:`point_name`), ``_phase``
  (int, default 0: every point of phase k finishes before phase k+1 starts,
  e.g. pretraining before fine-tuning), ``_report`` (False: left out of the
  report's tables, e.g. the pretraining run) and ``_resources`` (what
  ``--executor ray`` reserves for the point's task: ``{"cpus": 4, "gpus": 1}``,
  default :data:`DEFAULT_RESOURCES`; an array task gets its share from the
  scheduler instead);
* in string values ``{workdir}`` is replaced by the sweep's root directory
  (``source="{workdir}/source"`` names the sibling pretraining run).

Helpers build the lists::

    product(dict(stage="target"), method=["scratch", "finetune"], shots=[1, 10])  # grid, last varies fastest
    zip_(**{"config.optimizer.learning_rate": [1e-3, 3e-4]}, lam=[0.1, 1.0])     # pairs
    product(zip_(...), seeds(3))                                                     # x 3 seeds
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tl_jax.config import ConfigError

Point = dict[str, Any]
OVERRIDE_PREFIX = "config."
RESERVED = ("_name", "_phase", "_report", "_resources")
DEFAULT_RESOURCES = {"cpus": 1.0, "gpus": 0.0}  # one Ray task per point: what Ray reserves for it
NAME_SKIP = ("stage", "source")  # keys left out of default names (constant within a study / a path)


def _as_sweep(part: Any, where: str) -> list[Point]:
    if isinstance(part, Mapping):
        return [dict(part)]
    if isinstance(part, Iterable) and not isinstance(part, (str, bytes)):
        out = list(part)
        for p in out:
            if not isinstance(p, Mapping):
                raise ConfigError(f"{where}: a sweep is a list of dicts, got an item {p!r}")
        return [dict(p) for p in out]
    raise ConfigError(f"{where}: expected a dict or a list of dicts, got {part!r}")


def _axis(key: str, values: Any, where: str) -> list[Point]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ConfigError(f"{where}: axis {key!r} needs a list of values, got {values!r} "
                          f"(put a fixed value in a dict: {where}({{{key!r}: {values!r}}}, ...))")
    return [{key: v} for v in values]


def _merge(parts: Sequence[Point], where: str) -> Point:
    out: Point = {}
    for p in parts:
        clash = sorted(set(out) & set(p))
        if clash:
            raise ConfigError(f"{where}: key {clash[0]!r} is set by two factors")
        out.update(p)
    return out


def product(*sweeps: Any, **axes: Any) -> list[Point]:
    """Cartesian product of sub-sweeps (dicts or lists of dicts) and axes (``key=[values]``).

    Factors are the positional sweeps, then the axes in order; the last varies fastest.
    """
    factors = [_as_sweep(s, "product") for s in sweeps] + [_axis(k, v, "product") for k, v in axes.items()]
    return [_merge(combo, "product") for combo in itertools.product(*factors)]


def zip_(*sweeps: Any, **axes: Any) -> list[Point]:
    """Element-wise combination: the i-th point merges the i-th entry of every factor (equal lengths)."""
    factors = [_as_sweep(s, "zip_") for s in sweeps] + [_axis(k, v, "zip_") for k, v in axes.items()]
    lengths = {len(f) for f in factors}
    if len(lengths) > 1:
        names = [f"#{i}" for i in range(len(sweeps))] + list(axes)
        raise ConfigError("zip_: factors have different lengths: "
                          + ", ".join(f"{n}={len(f)}" for n, f in zip(names, factors)))
    return [_merge(combo, "zip_") for combo in zip(*factors)]


def seeds(n: int, key: str = "seed", start: int = 0) -> list[Point]:
    """``[{key: start}, ..., {key: start + n - 1}]``: repetitions of every other point."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"seeds(n): n must be a positive integer, got {n!r}")
    return [{key: start + i} for i in range(n)]


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def point_name(point: Point) -> str:
    """Stable sub-workdir name: ``{method: finetune, shots: 10, seed: 0}`` -> ``finetune_shots10_seed0``.

    ``_name`` wins; ``stage``/``source`` are left out; ``method`` is written bare;
    ``config.a.b`` keys use their last part (``learning_rate0.001``).
    """
    if "_name" in point:
        return str(point["_name"])
    parts = []
    for k, v in point.items():
        if k in NAME_SKIP or k.startswith("_"):
            continue
        short = k.rsplit(".", 1)[-1]
        parts.append(_fmt(v) if k == "method" else f"{short}{_fmt(v)}")
    name = "_".join(parts) or "point"
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


def check_points(points: Any, where: str) -> list[Point]:
    """Validate a ``get_sweep`` result; returns the points (dicts) with unique names."""
    if not isinstance(points, (list, tuple)) or not points:
        raise ConfigError(f"{where} must return a non-empty list of dicts, got {points!r}")
    seen: dict[str, int] = {}
    for i, p in enumerate(points):
        if not isinstance(p, Mapping):
            raise ConfigError(f"{where}[{i}] must be a dict, got {p!r}")
        for k, v in p.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{where}[{i}]: keys must be non-empty strings, got {k!r}")
            if k.startswith("_") and k not in RESERVED:
                raise ConfigError(f"{where}[{i}]: unknown reserved key {k!r}; known: {list(RESERVED)}")
            if not k.startswith(("_", OVERRIDE_PREFIX)) and isinstance(v, str) and "," in v:
                raise ConfigError(f"{where}[{i}]: get_config argument {k}={v!r} contains ',' "
                                  f"(use a config.KEY override for such values)")
        if not isinstance(p.get("_phase", 0), int):
            raise ConfigError(f"{where}[{i}]: _phase must be an int, got {p['_phase']!r}")
        resources(p, f"{where}[{i}]")
        name = point_name(p)
        if name in seen:
            raise ConfigError(f"{where}: points {seen[name]} and {i} have the same name {name!r}; "
                              f"give one a '_name'")
        seen[name] = i
    return [dict(p) for p in points]


def resources(point: Point, where: str = "point") -> dict[str, float]:
    """The point's ``_resources`` over :data:`DEFAULT_RESOURCES`: ``{"cpus": float, "gpus": float}``.

    Raises a one-line :class:`ConfigError` for anything but a dict of those keys with numbers >= 0."""
    given = point.get("_resources", {})
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where}: _resources must be a dict like {{'cpus': 4, 'gpus': 1}}, got {given!r}")
    out = dict(DEFAULT_RESOURCES)
    for k, v in given.items():
        if k not in DEFAULT_RESOURCES:
            raise ConfigError(f"{where}: _resources key {k!r} is not one of {list(DEFAULT_RESOURCES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"{where}: _resources[{k!r}] must be a number >= 0, got {v!r}")
        out[k] = float(v)
    return out


def substitute(point: Point, root: str) -> Point:
    """``{workdir}`` in string values (also inside lists) -> ``root``."""
    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("{workdir}", root)
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    return {k: sub(v) for k, v in point.items()}


def run_fields(point: Point) -> Point:
    """The point without its reserved ``_`` keys (what ``point.json`` records, plus ``_report``)."""
    return {k: v for k, v in point.items() if not k.startswith("_")}


def config_arg(point: Point) -> str:
    """The ``get_config`` argument of a point: its plain keys as ``k=v,...``."""
    return ",".join(f"{k}={_fmt(v) if isinstance(v, (list, tuple)) else v}" for k, v in point.items()
                    if not k.startswith(("_", OVERRIDE_PREFIX)))


def overrides(point: Point) -> list[str]:
    """The point's ``config.`` keys as ``['a.b=JSON', ...]`` (for ``apply_overrides`` or ``--config.a.b=``)."""
    return [f"{k[len(OVERRIDE_PREFIX):]}={json.dumps(v)}" for k, v in point.items() if k.startswith(OVERRIDE_PREFIX)]
