"""Load pretrained weights into a freshly initialised model: ``merge_params``.

This is how a 10-class source model becomes the backbone of a target model with
another head::

    variables = merge_params(loaded=source_vars, init=target_init_vars,
                             dont_load=["head/.*"])

Every path of ``init`` that is not matched by a ``dont_load`` regex must exist in
``loaded`` with the same shape; ``loaded`` paths the target does not have are
also reported (unless matched by ``dont_load``). All problems are collected and
raised as ONE error listing every mismatch, so a user fixes them in one go.
Dtypes follow ``init`` (a bf16 checkpoint loads into float32 params).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tl_jax.transfer.param_rules import flatten_paths

PyTree = Any


class MergeError(ValueError):
    """The loaded tree does not fit the initialised one."""


def merge_params(loaded: PyTree, init: PyTree, dont_load: Sequence[str] = (),
                 *, source: str = "checkpoint", check_rules: bool = True) -> PyTree:
    """Return ``init`` with every leaf not matched by ``dont_load`` taken from ``loaded``.

    Args:
      loaded: nested dict of arrays (e.g. ``{'params': ..., 'batch_stats': ...}``).
      init: the freshly initialised tree of the target model (same nesting style).
      dont_load: regexes (``re.fullmatch`` over '/'-joined paths such as
        ``params/head/kernel``) whose leaves keep their initial values.
      source: a name for the loaded tree used in the error message (file/workdir).
      check_rules: report ``dont_load`` rules that match nothing (off when the
        same rules are applied to several collections, e.g. batch stats).

    Raises:
      MergeError listing: target paths missing from ``loaded``, shape mismatches,
      and ``loaded`` paths unused by the target; also ``dont_load`` rules that
      match nothing in ``init``.
    """
    try:
        patterns = [re.compile(p) for p in dont_load]
    except re.error as e:
        raise MergeError(f"dont_load: invalid regex: {e}") from None
    flat_loaded = flatten_paths(loaded)
    flat_init = flatten_paths(init)
    skip = {p for p in flat_init if any(rx.fullmatch(p) for rx in patterns)}
    dead = [rx.pattern for rx in patterns if not any(rx.fullmatch(p) for p in flat_init)] if check_rules else []

    problems = []
    for rule in dead:
        problems.append(f"dont_load rule {rule!r} matches no param of the target model")
    for path, leaf in flat_init.items():
        if path in skip:
            continue
        if path not in flat_loaded:
            problems.append(f"missing in {source}: {path} {tuple(np.shape(leaf))}")
        elif np.shape(flat_loaded[path]) != np.shape(leaf):
            problems.append(f"shape mismatch at {path}: {source} has {tuple(np.shape(flat_loaded[path]))}, "
                            f"model expects {tuple(np.shape(leaf))}")
    for path in flat_loaded:
        if path not in flat_init and not any(rx.fullmatch(path) for rx in patterns):
            problems.append(f"unused in the model: {path} {tuple(np.shape(flat_loaded[path]))}")
    if problems:
        listing = "\n  ".join(problems)
        raise MergeError(f"cannot load {source} into the model ({len(problems)} problem(s)); "
                         f"fix the architecture or add dont_load rules:\n  {listing}")

    leaves = [flat_init[p] if p in skip else np.asarray(flat_loaded[p]).astype(np.asarray(flat_init[p]).dtype)
              for p in flat_init]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(init), leaves)
