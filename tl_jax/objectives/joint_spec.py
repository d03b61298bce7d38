"""Config parsing and task labels of the ``joint`` objective (:mod:`tl_jax.objectives.joint`).

* :func:`parse_domains`, :func:`parse_tasks`, :func:`parse_weights`: the config group
  ``config.objective.joint`` into domains, tasks and the λ matrix ``[D, T]``, with
  one-line errors naming the key.
* :func:`task_values`: a task's labels over a whole split (a label function on the
  label array, or a label field read from the examples), int64 ``[N]``.
* :class:`TaskSource` / :class:`TaskExample`: examples carrying ``label/<task>``
  (int32) through preprocessing, tagged with their ``domain``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from tl_jax.util import references
from tl_jax.data import DataSplit
from tl_jax.data.sources import ExampleSource
from tl_jax.objectives._checks import check_spec, config_int
from tl_jax.objectives.multitask import TASKS

KEY = "config.objective.joint"
DOMAIN_KEYS = ("name", "dataset", "train_split", "test_split", "train_pp", "eval_pp", "shots", "shots_seed")
TASK_KEYS = ("name", "field", "fn", "num_classes")


@dataclasses.dataclass(frozen=True)
class Domain:
    """One domain of ``joint`` / ``multidomain`` (domain 0 comes from ``config.data``)."""

    name: str
    dataset: str
    train_split: str
    test_split: str
    train_pp: list
    eval_pp: list
    shots: int | None
    shots_seed: int
    where: str  # config key for error messages


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    field: str | None      # a label field of the examples, or
    fn: str | None         # a built-in name (TASKS) or an import reference
    num_classes: int | None
    where: str


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x


def parse_domains(config: ml_collections.ConfigDict) -> list[Domain]:
    """config.data as domain 0, then ``config.objective.joint.domains`` (see module doc)."""
    dc, raw = config.data, [_plain(s) for s in config.objective.joint.domains]
    first = Domain(dc.name, dc.name, dc.train_split, dc.test_split, list(dc.train_pp), list(dc.eval_pp), dc.shots,
                   dc.shots_seed, "config.data")
    if raw and isinstance(raw[0], dict) and raw[0].get("dataset") == "config.data":
        extra = sorted(set(raw[0]) - {"name", "dataset"})
        if extra:
            raise ValueError(f"{KEY}.domains[0] names config.data and may only set 'name'; drop {extra} "
                             "(set them in config.data)")
        first = dataclasses.replace(first, name=str(raw[0].get("name", dc.name)))
        raw = raw[1:]
        offset = 1
    else:
        offset = 0
    domains = [first]
    for i, spec in enumerate(raw, start=offset):
        where = f"{KEY}.domains[{i}]"
        check_spec(where, spec, DOMAIN_KEYS)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"{where}.name must be a non-empty string (the domain's name in logs)")
        domains.append(Domain(spec["name"], spec.get("dataset") or spec["name"], spec.get("train_split", "train"),
                              spec.get("test_split", "test"), list(spec.get("train_pp", dc.train_pp)),
                              list(spec.get("eval_pp", dc.eval_pp)), spec.get("shots") or None,  # 0 = all
                              int(spec.get("shots_seed", 0)), where))
    names = [d.name for d in domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{KEY}.domains: domain names must be unique (domain 0 is config.data, named "
                         f"{domains[0].name!r}); {dup} repeat(s) in {names}: set 'name'")
    return domains


def parse_tasks(tasks: Any) -> list[Task]:
    """Task specs (strings or dicts) -> :class:`Task` (see module doc)."""
    out = []
    for i, spec in enumerate(_plain(t) for t in tasks):
        where = f"{KEY}.tasks[{i}]"
        if isinstance(spec, str) and spec:
            if spec in TASKS or references.is_reference(spec):
                name = spec.rpartition(":")[2].split(".")[-1]
                out.append(Task(name, None, spec, None, where))
            else:
                out.append(Task(spec, spec, None, None, where))
            continue
        check_spec(where, spec, TASK_KEYS, f"a task name, a field, 'module:function' or a dict with keys "
                                           f"{list(TASK_KEYS)}")
        if (spec.get("field") is None) == (spec.get("fn") is None):
            raise ValueError(f"{where}: give exactly one of 'field' and 'fn'")
        n = spec.get("num_classes")
        if n is not None:
            config_int(f"{where}.num_classes", n, low=1)
        name = spec.get("name") or spec.get("field") or str(spec["fn"]).rpartition(":")[2]
        fn = spec.get("fn")
        if fn is not None and fn not in TASKS and not references.is_reference(fn):
            raise ValueError(f"{where}.fn={fn!r}: a built-in {sorted(TASKS)} or 'module:function' / "
                             "'file.py:function'")
        out.append(Task(str(name), spec.get("field"), fn, n, where))
    if not out:
        raise ValueError(f"{KEY}.tasks is empty; e.g. ['digit', 'parity']")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{KEY}.tasks: task names must be unique, got {names}; use a dict with 'name'")
    return out


def parse_weights(values: Any, num_domains: int, num_tasks: int) -> np.ndarray:
    """The λ matrix ``[D, T]`` (float64; ``None`` -> 0); one line naming the bad entry."""
    rows = [_plain(r) for r in values]
    if not rows:
        return np.ones((num_domains, num_tasks))
    if len(rows) != num_domains or any(not isinstance(r, (list, tuple)) or len(r) != num_tasks for r in rows):
        shape = [len(r) if isinstance(r, (list, tuple)) else r for r in rows]
        raise ValueError(f"{KEY}.weights must be a [{num_domains}][{num_tasks}] matrix (domains x tasks, "
                         f"one row per domain), got {len(rows)} rows of lengths {shape}")
    lam = np.zeros((num_domains, num_tasks))
    for d, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{KEY}.weights[{d}][{i}] must be a finite number >= 0 or None, got {v!r}")
            lam[d, i] = float(v)
    if not lam.any():
        raise ValueError(f"{KEY}.weights are all 0: at least one (domain, task) must be > 0")
    return lam


def _field_values(split: DataSplit, key: str, where: str) -> np.ndarray:
    src = split.source
    if hasattr(src, "arrays") and key in src.arrays:
        return np.asarray(src.arrays[key])
    if isinstance(src, ExampleSource):
        src = src.with_label_fields((key,), where)
    elif len(src) and key not in src[0]:
        raise ValueError(f"{where}: the dataset has no field {key!r}; it has {sorted(src[0])}")
    return np.asarray([src[i][key] for i in range(len(src))])


def task_values(task: Task, split: DataSplit, where: str) -> np.ndarray:
    """Task labels of every example of ``split`` (int64 ``[N]``), unchecked for range."""
    if task.field is not None:
        values = _field_values(split, task.field, where)
    else:
        fn = TASKS[task.fn][1] if task.fn in TASKS else references.resolve(task.fn, f"{task.where}.fn")
        try:
            values = np.asarray(fn(np.asarray(split.labels(), np.int64)))
        except Exception as e:  # the user's function: one line, not its traceback
            raise ValueError(f"{where}: label function {task.fn!r} failed: {type(e).__name__}: {e}") from None
    if values.shape != (len(split),) or not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise ValueError(f"{where}: task labels must be integers of shape [{len(split)}], got {values.dtype} "
                         f"{values.shape}")
    return values.astype(np.int64)


def check_range(values: np.ndarray, n: int, where: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= n):
        raise ValueError(f"{where}: task labels must be in [0, {n}), got range [{values.min()}, {values.max()}]")


class TaskSource:
    """``source[i]`` plus ``label/<task>`` = ``labels[task][i]`` (int32; picklable)."""

    def __init__(self, source: Any, labels: dict[str, np.ndarray]):
        self.source, self.labels = source, labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], **{k: np.int32(v[int(index)]) for k, v in self.labels.items()}}


class TaskExample:
    """Preprocess one domain's example, keep its ``label/<task>`` keys, add ``domain`` (picklable)."""

    def __init__(self, preprocess: Any, domain: int, keys: tuple[str, ...]):
        self.preprocess, self.domain, self.keys = preprocess, domain, keys
        self.where = getattr(preprocess, "where", "")

    @property
    def is_random(self) -> bool:
        return self.preprocess.is_random

    @property
    def op_names(self) -> tuple[str, ...]:
        return self.preprocess.op_names

    def split(self) -> tuple["TaskExample", Any]:
        """``(prefix, suffix)`` for :func:`tl_jax.data.shuffle.train_chain`: labels ride through the prefix."""
        prefix, suffix = self.preprocess.split()
        return TaskExample(prefix, self.domain, self.keys), suffix

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        out = self.preprocess(example, rng) if rng is not None else self.preprocess(example)
        return {**out, "domain": np.int32(self.domain), **{k: example[k] for k in self.keys}}
