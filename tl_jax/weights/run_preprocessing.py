"""A run that starts from converted weights normalises its images as those weights expect, by default.

``tl-jax weights convert`` records the source model's input normalisation in
``tl_jax_weights.json`` (``"preprocessing": {"mean", "std", ...}``, pixels in
``[0, 1]``: :mod:`tl_jax.weights.hf_preprocessing`). When ``config.init_from``
names such a checkpoint, :func:`apply_weights_preprocessing` (called by the
train setup before the config is validated and recorded) makes that the
default of ``config.data.train_pp`` and ``config.data.eval_pp``:

* a pipeline with no ``normalize`` op gets ``{"op": "normalize", "mean": ...,
  "std": ...}`` appended (logged once), so the recorded ``config.json`` says
  what ran;
* a pipeline with its own ``normalize`` op keeps it (the override) and, when
  its mean/std differ from the weights', a warning names both.

Why appended: the zoo's pipelines end in ``rescale`` to ``[0, 1]`` (or a
resize / crop), and the weights' mean/std are for ``[0, 1]`` pixels. The image
size is not changed: a ViT resizes its position table to the data's size
(:mod:`tl_jax.models.vit_posemb`).

``tl-jax rank`` / ``fewshot`` do the same to the target's ``eval_pp`` for each
candidate converted (or trained from converted weights):
:func:`tl_jax.transferability.extract.candidate_eval_pp`.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import numpy as np

from tl_jax.util.log_once import warn_once

log = logging.getLogger("tl_jax")
META_FILE = "tl_jax_weights.json"  # tl_jax.weights.convert.META_FILE (not imported: that pulls in the models)
PIPELINES = ("train_pp", "eval_pp")


def weights_preprocessing(init_from: str) -> dict | None:
    """The ``preprocessing`` record of the converted checkpoint ``init_from`` (``DIR`` or ``DIR:STEP``), or None."""
    if not init_from:
        return None
    folder = pathlib.Path(str(init_from))
    if not (folder / META_FILE).is_file() and ":" in str(init_from):
        folder = pathlib.Path(str(init_from).rsplit(":", 1)[0])
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config.init_from: {meta_path} is not valid JSON ({e}); re-run tl-jax weights convert"
                         ) from None
    pre = meta.get("preprocessing")
    return pre if isinstance(pre, dict) and "mean" in pre and "std" in pre else None


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.allclose(np.broadcast_to(np.asarray(a, float), np.shape(b)), np.asarray(b, float),
                                rtol=1e-4, atol=1e-6))
    except ValueError:
        return False


def normalize_op(pre: dict) -> dict:
    """The ``normalize`` op of a ``preprocessing`` record (mean/std as float lists, pixels in ``[0, 1]``)."""
    return {"op": "normalize", "mean": np.atleast_1d(np.asarray(pre["mean"], float)).tolist(),
            "std": np.atleast_1d(np.asarray(pre["std"], float)).tolist()}


def with_weights_normalisation(ops: Any, pre: dict, where: str, weights: str, origin: str) -> tuple[list, bool]:
    """``(pipeline, appended?)``: ``ops`` with the weights' ``normalize`` op appended when it has none (logged
    once), else ``ops`` as given (the override), with a warning once when its mean/std differ from the weights'.

    ``where`` names the pipeline (``config.data.eval_pp``), ``weights`` the converted folder, ``origin`` how it
    was named (``init_from PATH``, ``--candidates PATH``)."""
    op = normalize_op(pre)
    ops = [dict(o) for o in (ops or [])]
    own = [o for o in ops if o.get("op") == "normalize"]
    if not own:
        warn_once(log, "%s: the weights' normalisation %s appended (%s, from %s); a normalize op of "
                  "your own overrides it", where, json.dumps(op), origin, pre.get("source", "?"), level=logging.INFO)
        return [*ops, op], True
    if not (_same(own[-1].get("mean"), op["mean"]) and _same(own[-1].get("std"), op["std"])):
        warn_once(log, "%s normalises with mean=%s std=%s but the weights in %s expect mean=%s std=%s (%s); "
                  "drop your normalize op to use theirs", where, own[-1].get("mean"), own[-1].get("std"),
                  weights, op["mean"], op["std"], pre.get("source", "?"))
    return ops, False


def apply_weights_preprocessing(config: Any) -> list[str]:
    """Adds the weights' normalisation to ``config.data.{train,eval}_pp`` where they have none (module doc).

    Returns the pipelines it changed (``['config.data.train_pp', ...]``); warns once per differing pipeline.
    """
    pre = weights_preprocessing(config.init_from)
    if pre is None:
        return []
    changed = []
    for key in PIPELINES:
        where = f"config.data.{key}"
        ops, appended = with_weights_normalisation(config.data[key], pre, where, str(config.init_from),
                                                   f"init_from {config.init_from}")
        if appended:
            config.data[key] = ops
            changed.append(where)
    return changed
