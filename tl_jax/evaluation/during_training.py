"""Evaluation in the loop: full-split evals, the validation checks, best-step records from ``metrics.jsonl``."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from tl_jax.data import eval_batches
from tl_jax.objectives.base import Objective
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import early_stopping as es_lib
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_eval_step
from tl_jax.train.workdir import Workdir


def evaluate(eval_step, state: TrainState, split, preprocess, batch_size: int, mesh, *,
             put_batch=None) -> dict[str, float]:
    """``{metric: Σ sums / Σ count}`` over the WHOLE split (last batch padded and masked).

    ``put_batch`` places a process's batch on the devices (default: sharded over ``mesh``).
    """
    put_batch = put_batch or (lambda b: mesh_lib.shard_batch(b, mesh))
    sums = None
    for batch in eval_batches(split, preprocess, batch_size=batch_size // jax.process_count(),
                              process_index=jax.process_index(), process_count=jax.process_count()):
        out = eval_step(state, put_batch(batch))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {**{k: float(v) / n for k, v in sums.items() if k != "count"}, "count": int(sums["count"])}


def check_validation(config, objective, state: TrainState, val_split, eval_pp) -> None:
    """One-line errors for a validation set the run cannot use: an objective that evaluates its own data
    (``eval_data``: domain adaptation, multi-domain), or a ``best_metric`` / ``early_stopping.metric`` that
    the objective's ``eval_sums`` never produces (traced on one example with ``jax.eval_shape``: nothing runs)."""
    key = "config.data.val_fraction" if config.data.val_fraction is not None else "config.data.val_split"
    if type(objective).eval_data is not Objective.eval_data:
        raise ValueError(f"{key}: objective {objective.name!r} evaluates its own test data (eval_data); a "
                         f"validation set is only supported for objectives evaluated on config.data's splits")
    batch = next(eval_batches(val_split, eval_pp, batch_size=1))
    sums = jax.eval_shape(make_eval_step(objective), state, batch)
    names = [f"val/{k}" for k in sums if k != "count"]
    es_lib.check_logged(es_lib.resolve_best_metric(config.train.best_metric, True), "train.best_metric", names)
    es_lib.check_logged(config.train.early_stopping.metric, "train.early_stopping.metric", names)


def logged_evals(wd: Workdir, step: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``step`` holding ``val/*`` metrics (lines cut short are skipped)."""
    if not wd.metrics_file.exists():
        return []
    out = []
    for line in wd.metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash (the main process truncates it away)
            continue
        if record.get("step", 0) <= step and any(k.startswith(es_lib.VAL) for k in record):
            out.append(record)
    return out


def best_record(last_eval: dict | None, step: int, metric: str | None) -> dict | None:
    if metric is None or last_eval is None or last_eval.get("step") != step or metric not in last_eval:
        return None
    return {metric: last_eval[metric]}
