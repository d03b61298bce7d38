"""Model selection and early stopping on the validation metrics, as pure functions of the logged evals.

Everything here is a function of the eval records of ``metrics.jsonl``
(``{"step": s, "val/accuracy": ..., ...}``), so a resumed run derives the same
state from the records the loop kept (it truncates the file to the restored
step) as the run that never stopped held in memory.

* Best checkpoint: ``config.train.best_metric`` (``'auto'``: ``val/accuracy``
  with a validation set, else none; :func:`resolve_best_metric`).
  :func:`best_eval` is the record orbax's ``BestN`` keeps: the highest value
  (``best_mode='max'``) or the lowest (``'min'``), ties going to the latest step.
* Early stopping (``config.train.early_stopping``): after each eval, the value
  ``v`` of ``metric`` improves on the best so far ``b`` when ``v > b + min_delta``
  (``mode='max'``) or ``v < b - min_delta`` (``'min'``); the first eval always
  improves. ``since_best`` counts the evals since the last improvement, and the
  run stops at the eval where ``since_best`` reaches ``patience``
  (:func:`update`, :func:`replay`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

VAL, TEST = "val/", "test/"


def resolve_best_metric(best_metric: str, has_val: bool) -> str | None:
    """The metric best-checkpoint retention ranks by (``None``: keep the newest checkpoints only).

    ``'auto'``: ``val/accuracy`` when the run has a validation set, else none;
    ``''``: none; any other name as it is (``config.validate`` refuses ``test/*``
    when a validation set exists).
    """
    if best_metric == "auto":
        return VAL + "accuracy" if has_val else None
    return best_metric or None


def check_logged(metric: str | None, key: str, names: Iterable[str]) -> None:
    """Raise a one-line ``ValueError`` naming ``config.<key>`` if ``metric`` is not among the logged ``names``."""
    names = sorted(names)
    if metric and metric not in names:
        raise ValueError(f"config.{key}={metric!r} is never logged; this run's eval metrics are {names}")


def eval_records(records: Iterable[dict], metric: str, up_to: int | None = None) -> list[dict]:
    """The records holding ``metric`` (at steps ``<= up_to``), in step order, one per step (the last logged)."""
    by_step: dict[int, dict] = {}
    for r in records:
        if metric in r and (up_to is None or r["step"] <= up_to):
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def best_eval(records: Sequence[dict], metric: str, mode: str) -> tuple[int, float] | None:
    """``(step, value)`` of the best ``metric`` among ``records`` (ties: the latest step), or ``None``."""
    best = None
    for r in eval_records(records, metric):
        v = float(r[metric])
        if best is None or (v >= best[1] if mode == "max" else v <= best[1]):
            best = (int(r["step"]), v)
    return best


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """The rule's state after some evals: best value and its step, evals since it, step it stopped at."""

    best: float | None = None
    best_step: int | None = None
    since_best: int = 0
    stopped_at: int | None = None


def improves(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (any value beats ``None``)."""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def update(state: EarlyStopping, step: int, value: float, *, patience: int, min_delta: float,
           mode: str) -> EarlyStopping:
    """The state after the eval at ``step`` gave ``value``; ``stopped_at=step`` once ``since_best >= patience``."""
    if state.stopped_at is not None:
        return state
    if improves(value, state.best, mode=mode, min_delta=min_delta):
        return EarlyStopping(best=float(value), best_step=int(step), since_best=0)
    since = state.since_best + 1
    return dataclasses.replace(state, since_best=since, stopped_at=int(step) if since >= patience else None)


def replay(records: Iterable[dict], metric: str, *, patience: int, min_delta: float, mode: str,
           up_to: int | None = None) -> EarlyStopping:
    """The state after every eval of ``metric`` in ``records`` (steps ``<= up_to``), in step order."""
    state = EarlyStopping()
    for r in eval_records(records, metric, up_to):
        state = update(state, int(r["step"]), float(r[metric]), patience=patience, min_delta=min_delta, mode=mode)
    return state
