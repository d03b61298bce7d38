"""Argument checks shared by the loss functions (trace-time only, never on tracers) and the objectives' configs.

Every check raises ``ValueError`` with a one-line message that names the
argument. Values that are JAX tracers (inside ``jit``/``vmap``/``grad``) cannot
be inspected and are passed through unchecked; Python numbers, NumPy values and
concrete (non-traced) arrays are checked. :func:`config_number`, :func:`config_int`
and :func:`check_spec` check config values (plain Python).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tl_jax.util.tree_paths import path_str  # noqa: F401 (used by the loss modules)


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds concrete values (not a JAX tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_scalar(name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
                 low_open: bool = False) -> None:
    """Check a concrete scalar is finite and in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    v = float(arr)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {v!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v!r}")


def check_weights(name: str, value: Any) -> None:
    """Check concrete weights (scalar or array) are finite and non-negative."""
    if value is None or not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got non-finite entries")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0, got a negative entry ({arr.min()!r})")


def check_shape(name: str, x: Any, shape: Sequence[int | None]) -> None:
    """Check ``x.shape`` against ``shape`` (``None`` = any size on that axis)."""
    got = tuple(np.shape(x))
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        want = tuple("?" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {got}")


def check_same_keys(name: str, got: Any, ref_name: str, ref: Any) -> None:
    """Check dict ``got`` has exactly the keys of dict ``ref``; names missing/extra keys."""
    missing = sorted(set(ref) - set(got), key=str)
    extra = sorted(set(got) - set(ref), key=str)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"extra {extra}")
        raise ValueError(f"{name} keys must match {ref_name} keys: " + ", ".join(parts))


def check_2d(name: str, x: Any) -> None:
    """Check ``x`` is a 2-D array (``[B, C]``: logits, probabilities)."""
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must have shape [B, C], got {np.shape(x)}")


def config_number(name: str, value: Any, *, low: float | None = 0, low_open: bool = False) -> float:
    """``value`` as a float: a finite int/float (not a bool), ``>= low`` (``> low`` if ``low_open``; None: any)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            low is not None and (value < low or (low_open and value == low))):
        bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_spec(where: str, spec: Any, keys: Sequence[str], what: str = "") -> None:
    """Check a config entry is a dict whose keys are among ``keys`` (``what``: the message's wanted form)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be {what or f'a dict with keys {list(keys)}'}, got {spec!r}")
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; known: {list(keys)}")


def config_int(name: str, value: Any, *, low: int) -> int:
    """``value``: an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value
