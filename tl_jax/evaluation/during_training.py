"""Evaluation in the loop: full-split evals, the validation checks, best-step records from ``metrics.jsonl``.

:class:`LoopEvals` is what the step loop (:class:`tl_jax.train.loop.Loop`) asks at an eval step: the val /
test metrics of the current state (and of its EMA weights), ``config.evals`` due, and whether early stopping
stops here, decided from the val records logged so far.
"""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp

from tl_jax.data import eval_batches
from tl_jax.evaluation import evaluators as fewshot_evals
from tl_jax.objectives.base import Objective
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import ema as ema_lib
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_eval_step
from tl_jax.train.workdir import Workdir

log = logging.getLogger("tl_jax")


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


class LoopEvals:
    """The evaluations of one run's loop, and the val records early stopping and the best step are read from.

    ``val_split`` (``config.data.val_*``, or None): with it the periodic evals log ``val/*`` only and the final
    eval ``val/*`` and ``test/*``; without it every eval is ``test/*``. ``val_history``: the val records of
    ``metrics.jsonl`` up to the restored ``step`` and those logged since, so a resumed run stops (and picks
    its best step) as the uninterrupted one did. ``eval_model``: ``(model, model_params)`` that
    ``config.evals`` run (the full model, also when the head trains on cached features).
    """

    def __init__(self, config, wd: Workdir, strategy, objective, test_split, val_split, eval_pp, *, step: int,
                 evaluators=(), eval_model=None):
        self.config, self.wd, self.strategy = config, wd, strategy
        self.test_split, self.val_split, self.eval_pp = test_split, val_split, eval_pp
        self.evaluators = evaluators
        self.eval_step = strategy.eval_step(make_eval_step(objective))
        self.has_val = val_split is not None
        self.best_metric = es_lib.resolve_best_metric(config.train.best_metric, self.has_val)
        es = config.train.early_stopping
        self.es_rule = dict(patience=es.patience, min_delta=es.min_delta, mode=es.mode)
        self.es_metric = es.metric if self.has_val else ""
        self.val_history = logged_evals(wd, step) if self.has_val else []
        self.stopped_at = es_lib.replay(self.val_history, self.es_metric, **self.es_rule).stopped_at \
            if self.es_metric else None  # a run resumed after it stopped early does not go on
        self.model, self.model_params = eval_model or (objective.model, objective.model_params)
        self.every, self.total = config.train.eval_every, config.train.steps  # read once, not per step

    def due(self, step: int) -> bool:
        """Whether ``step`` evaluates (``config.train.eval_every``, and the last step)."""
        return bool(self.every and step % self.every == 0) or step == self.total

    def prefixes(self, step: int, final: bool = False) -> tuple[str, ...]:
        """The splits evaluated at ``step``: val and test at the last step (or ``final``: the last eval of an
        early-stopped run), else val (test without a val set)."""
        if final or step == self.total:
            return ("val", "test") if self.has_val else ("test",)
        return ("val",) if self.has_val else ("test",)

    def run(self, state, step: int, prefixes: tuple[str, ...]) -> dict:
        """``{"step", "<prefix>/<metric>"...}`` over the whole val / test split (not logged here)."""
        record = {"step": step}
        for prefix in prefixes:
            res = self._evaluate(state, prefix)
            count = res.pop("count")
            record.update({f"{prefix}/{k}": v for k, v in res.items()})
            log.info("step %d: %s (%d examples)", step, " ".join(f"{prefix}/{k}={v:.4f}" for k, v in res.items()),
                     count)
            if ema_lib.has_ema(state):  # config.train.ema_decay: the averaged weights too, as <prefix>/ema/*
                res = self._evaluate(ema_lib.ema_view(state), prefix)
                res.pop("count")
                record.update({f"{prefix}/{ema_lib.PREFIX}/{k}": v for k, v in res.items()})
        return record

    def _evaluate(self, state, prefix: str) -> dict:
        split = self.val_split if prefix == "val" else self.test_split
        return evaluate(self.eval_step, state, split, self.eval_pp, self.config.data.eval_batch_size,
                        self.strategy.mesh, put_batch=self.strategy.put_batch)

    def periodic(self, state, step: int) -> dict:
        """``config.evals`` due at ``step`` (few-shot ridge on the current features), ``{}`` if none."""
        if not self.evaluators:
            return {}
        strategy = self.strategy
        return fewshot_evals.evaluate_due(
            self.evaluators, step, self.total, self.model,
            lambda: fewshot_evals.host_variables(strategy.to_global(state), self.model_params, strategy.fetch_state))

    def stops_here(self, record: dict, step: int) -> bool:
        """Whether early stopping (``config.train.early_stopping``) stops at ``step`` with this val record."""
        if not self.es_metric:
            return False
        decided = es_lib.replay([*self.val_history, record], self.es_metric, **self.es_rule)
        if decided.stopped_at == step and step < self.total:
            self.stopped_at = step
            return True
        return False

    def log(self, record: dict) -> None:
        """Log an eval record (the main process) and keep it for early stopping and the best step."""
        if jax.process_index() == 0:
            self.wd.log(record)
        if self.has_val:
            self.val_history.append(record)

    def best(self) -> tuple[int, float] | None:
        """``(step, value)`` of the best val eval (``config.train.best_metric``), None without val or metric."""
        if not (self.has_val and self.best_metric):
            return None
        return es_lib.best_eval(self.val_history, self.best_metric, self.config.train.best_mode)
