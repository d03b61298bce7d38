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

A ``mapping`` renames the loaded paths before matching (``config.init_map``):
a list of ``[regex, replacement]`` pairs; each loaded path takes the first rule
whose regex ``fullmatch``-es it and becomes ``match.expand(replacement)``, or is
dropped when the replacement is ``None``; unmatched paths keep their name. A
distillation student starts from teacher layers 0, 2, 4 as its layers 0, 1, 2
with :func:`layer_subset`::

    mapping = layer_subset([0, 2, 4])   # backbone/layer_2/(.*) -> backbone/layer_1/\\1, ..., others dropped
    merge_params(teacher_vars, student_init, dont_load=["head/.*"], mapping=mapping)

A renaming rule that matches no loaded path (a layer the source lacks), or
whose every renamed path is absent from ``init`` (a layer the target lacks), is
a one-line :class:`MergeError` naming the rule.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tl_jax.params.param_rules import flatten_paths
from tl_jax.util import config_checks

PyTree = Any


class MergeError(ValueError):
    """The loaded tree does not fit the initialised one."""


def merge_params(loaded: PyTree, init: PyTree, dont_load: Sequence[str] = (),
                 *, source: str = "checkpoint", check_rules: bool = True,
                 mapping: Sequence[Sequence[Any]] = ()) -> PyTree:
    """Return ``init`` with every leaf not matched by ``dont_load`` taken from ``loaded``.

    Args:
      loaded: nested dict of arrays (e.g. ``{'params': ..., 'batch_stats': ...}``).
      init: the freshly initialised tree of the target model (same nesting style).
      dont_load: regexes (``re.fullmatch`` over '/'-joined paths such as
        ``params/head/kernel``) whose leaves keep their initial values.
      source: a name for the loaded tree used in the error message (file/workdir).
      check_rules: report ``dont_load`` and ``mapping`` rules that match nothing (off when
        the same rules are applied to several collections, e.g. batch stats).
      mapping: ``[regex, replacement | None]`` pairs renaming (or dropping) ``loaded``
        paths before matching (see the module doc); ``()`` = paths as they are.

    Raises:
      MergeError listing: target paths missing from ``loaded``, shape mismatches,
      and ``loaded`` paths unused by the target; also ``dont_load`` rules that
      match nothing in ``init``.
    """
    try:
        patterns = [re.compile(p) for p in dont_load]
    except re.error as e:
        raise MergeError(f"dont_load: invalid regex: {e}") from None
    flat_init = flatten_paths(init)
    flat_loaded = map_paths(flatten_paths(loaded), mapping, flat_init, source=source, check_rules=check_rules)
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


def _compile_mapping(mapping: Sequence[Sequence[Any]], where: str) -> list[tuple[re.Pattern, str | None]]:
    rules = []
    for i, rule in enumerate(mapping):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
                and (rule[1] is None or isinstance(rule[1], str))):
            raise MergeError(f"{where}[{i}] must be [regex, replacement or null], got {rule!r}")
        try:
            rules.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise MergeError(f"{where}[{i}]: invalid regex {rule[0]!r}: {e}") from None
    return rules


def check_config(config: Any) -> None:
    """``config.init_map``: a list of ``[regex, replacement or null]`` pairs (one line per problem).

    Run by :func:`tl_jax.config.validate` (registered below), before anything is loaded.
    """
    if not isinstance(config.init_map, (list, tuple)):
        raise MergeError(f"config.init_map must be a list of [regex, replacement or null] pairs, "
                         f"got {config.init_map!r}")
    _compile_mapping(config.init_map, "config.init_map")


config_checks.register_check("init_map", check_config)


def map_paths(flat: dict[str, Any], mapping: Sequence[Sequence[Any]], target: dict[str, Any] | None = None, *,
              source: str = "checkpoint", check_rules: bool = True, where: str = "config.init_map") -> dict[str, Any]:
    """``{path: leaf}`` with each path renamed by the first ``mapping`` rule that fullmatches it.

    ``None`` as replacement drops the path. With ``check_rules``: a renaming rule that matches
    no path of ``flat`` (the source lacks it), or none of whose renamed paths is in ``target``
    (the target lacks it), and two paths renamed to one, are one-line :class:`MergeError`s.
    """
    if not mapping:
        return flat
    rules = _compile_mapping(mapping, where)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    hits: list[list[str]] = [[] for _ in rules]
    for path, leaf in flat.items():
        new = path
        for k, (rx, repl) in enumerate(rules):
            m = rx.fullmatch(path)
            if m:
                new = None if repl is None else m.expand(repl)
                hits[k].append(new)
                break
        if new is None:
            continue
        if new in out:
            raise MergeError(f"{where}: {origin[new]} and {path} of {source} are both mapped to {new}; "
                             f"drop one (replacement null)")
        out[new], origin[new] = leaf, path
    if check_rules:
        for (rx, repl), renamed in zip(rules, hits):
            if repl is None:
                continue  # a drop rule may match nothing (the source has no extra layers)
            if not renamed:
                raise MergeError(f"{where} rule {rx.pattern!r} matches no param of {source}: it lacks "
                                 f"{_prefix(rx.pattern)}")
            if target is not None and not any(p in target for p in renamed):
                raise MergeError(f"{where} rule {rx.pattern!r} -> {repl!r} maps to params the model lacks "
                                 f"(e.g. {renamed[0]}): no {_prefix(repl)} in the model")
    return out


def _prefix(path: str) -> str:
    """The literal start of a path or regex up to its last '/' before any regex syntax ('backbone/layer_7/')."""
    literal = re.split(r"[\\()\[\].*+?{}|^$]", path, maxsplit=1)[0]
    return literal[:literal.rfind("/") + 1] or literal or path


def layer_subset(layers: Sequence[int], prefix: str = "backbone/layer_") -> list[list[Any]]:
    """The ``mapping`` that loads source layers ``layers`` as target layers ``0..len(layers)-1``.

    ``layer_subset([0, 2, 4])`` -> ``[["backbone/layer_0/(.*)", "backbone/layer_0/\\1"],
    ["backbone/layer_2/(.*)", "backbone/layer_1/\\1"], ["backbone/layer_4/(.*)", "backbone/layer_2/\\1"],
    ["backbone/layer_\\d+/.*", None]]`` (the other source layers dropped). ``prefix``: the
    layer paths' common start (``backbone/layer_`` for tl_jax's bert and vit).
    """
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) \
            or len(set(layers)) != len(layers):
        raise MergeError(f"layer_subset: layers must be distinct non-negative ints, got {list(layers)!r}")
    p = re.escape(prefix)
    return [[f"{p}{src}/(.*)", f"{prefix}{dst}/\\1"] for dst, src in enumerate(layers)] + [[f"{p}\\d+/.*", None]]
