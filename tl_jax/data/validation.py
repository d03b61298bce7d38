"""The validation set of a run (``config.data.val_fraction`` / ``val_split``) and the train indices left.

Model selection and early stopping read ``val/*`` metrics, never ``test/*``.
A run gets its validation examples in one of two ways:

* ``config.data.val_fraction = f``: a stratified, seeded subset carved out of
  the train split: per class ``c`` with ``n_c`` examples, ``max(1, round(f * n_c))``
  go to validation (:func:`carve_validation`). The subset is a pure function
  of ``(labels, f, config.data.val_seed)``, so it is the same whatever the
  batch size, the process count or the shots. It is removed from the train
  examples BEFORE ``config.data.shots`` are drawn: shots come from the rest
  (:func:`train_and_val_indices`).
* ``config.data.val_split = 'validation'`` (any tfds split spec, e.g.
  ``'train[90%:]'``): a split of the same dataset, loaded as it is. Keeping it
  disjoint from ``config.data.train_split`` is the user's business
  (``train_split='train[:90%]'``).

Validation examples go through ``config.data.eval_pp``, like the test split.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tl_jax.data.pipeline import _Subset
from tl_jax.data.shots import sample_shots
from tl_jax.data.sources import DataSplit, load_split
from tl_jax.data.user_datasets import stratified_split
from tl_jax.util import config_checks


def carve_validation(labels: np.ndarray, fraction: float, seed: int, *, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: a stratified split of ``range(len(labels))``, both sorted int64.

    Per class ``c`` (``n_c`` examples), ``max(1, round(fraction * n_c))`` examples
    go to ``val_idx`` (numpy's round: half to even), the others to ``train_idx``;
    which ones is :func:`tl_jax.data.user_datasets.stratified_split`'s seeded
    draw. Same ``(labels, fraction, seed)`` -> same split.

    Raises:
      ValueError: ``fraction`` outside (0, 1), or a class left with no training
        example (a class of one example, or ``fraction`` close to 1); the
        message names ``config.data.val_fraction`` and the class.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"config.data.val_fraction must be in (0, 1) (or null for no validation set), "
                         f"got {fraction!r}")
    labels = np.asarray(labels)
    where = f" of {name}" if name else ""
    classes, counts = np.unique(labels, return_counts=True)
    for c, n in zip(classes, counts, strict=True):
        n_val = max(1, int(round(n * fraction)))
        if n_val >= n:
            raise ValueError(f"config.data.val_fraction={fraction} leaves class {int(c)}{where} with no training "
                             f"example ({int(n)} example(s), {n_val} to validation); lower val_fraction or use "
                             f"config.data.val_split")
    # With 1 <= n_val <= n_c - 1 for every class, stratified_split takes exactly n_val per class.
    train_idx, val_idx = stratified_split(labels, float(fraction), int(seed))
    return np.sort(train_idx).astype(np.int64), np.sort(val_idx).astype(np.int64)


def train_and_val_indices(labels: np.ndarray, *, val_fraction: float | None, val_seed: int, shots: int | None,
                          shots_seed: int, name: str = "") -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(train_indices, val_indices)`` into the train split (``None``: all of it / no carved validation).

    Without ``val_fraction`` this is the run's old behaviour: ``sample_shots``
    over the whole split (or every example). With it, the validation subset is
    carved first and the shots are drawn from the remaining examples (the
    shots of class ``c`` are ``shots`` of its ``n_c - n_val`` train examples).
    """
    if val_fraction is None:
        idx = None if shots is None else sample_shots(labels, shots, shots_seed, name=name)
        return idx, None
    rest, val = carve_validation(labels, val_fraction, val_seed, name=name)
    if shots is None:
        return rest, val
    picked = sample_shots(np.asarray(labels)[rest], shots, shots_seed,
                          name=f"{name} without its validation examples" if name else None)
    return rest[picked], val


def subset_split(split: DataSplit, indices: np.ndarray, label: str) -> DataSplit:
    """A random-access view of ``split`` restricted to ``indices`` (named ``split[label]`` in logs)."""
    return DataSplit(split.name, f"{split.split}[{label}]", _Subset(split.source, np.asarray(indices)),
                     split.num_classes, split.image_shape)


def validation_split(data_config, train_split: DataSplit, val_indices: np.ndarray | None) -> DataSplit | None:
    """The run's validation ``DataSplit`` from ``config.data``, or ``None`` when it has none."""
    if data_config.val_split:
        return load_split(data_config.name, data_config.val_split, data_config.data_dir)
    if val_indices is not None:
        return subset_split(train_split, val_indices, f"val_fraction={data_config.val_fraction}")
    return None


def check_config(config: Any) -> None:
    """``config.data.val_*``, ``config.train.best_metric`` and ``config.train.early_stopping`` (one line each).

    Run by :func:`tl_jax.config.validate` (registered below). Whether a metric is actually logged by the
    objective is checked once the objective is built (the train setup), still before the workdir is touched.
    """
    dc, tc = config.data, config.train
    fraction, split = dc.val_fraction, dc.val_split
    if fraction is not None and split is not None:
        raise ValueError(f"config.data.val_fraction ({fraction}) and config.data.val_split ({split!r}) are mutually "
                         f"exclusive; set one of them")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ValueError(f"config.data.val_fraction must be in (0, 1) (or null for no validation set), got {fraction}")
    if split is not None and not split.strip():
        raise ValueError("config.data.val_split must be a split spec such as 'validation' or 'train[90%:]' "
                         "(or null for no validation set), got ''")
    has_val = fraction is not None or split is not None
    best = tc.best_metric
    if has_val and best.startswith("test/"):
        raise ValueError(f"config.train.best_metric={best!r} selects checkpoints on the test set while a validation "
                         f"set exists; use a val/* metric (or 'auto': val/accuracy)")
    if not has_val and best.startswith("val/"):
        raise ValueError(f"config.train.best_metric={best!r} needs a validation set: set config.data.val_fraction "
                         f"or config.data.val_split")
    es = tc.early_stopping
    if not es.metric:
        return
    if not es.metric.startswith("val/"):
        raise ValueError(f"config.train.early_stopping.metric={es.metric!r} must be a val/* metric "
                         f"(e.g. 'val/accuracy'), or '' for no early stopping")
    if not has_val:
        raise ValueError(f"config.train.early_stopping.metric={es.metric!r} needs a validation set: set "
                         f"config.data.val_fraction or config.data.val_split")
    if tc.eval_every <= 0:
        raise ValueError(f"config.train.early_stopping.metric={es.metric!r} needs periodic evals: set "
                         f"config.train.eval_every > 0 (patience is counted in evals)")
    if es.mode not in ("max", "min"):
        raise ValueError(f"config.train.early_stopping.mode must be one of ('max', 'min'), got {es.mode!r}")
    if isinstance(es.patience, bool) or not isinstance(es.patience, int) or es.patience < 1:
        raise ValueError(f"config.train.early_stopping.patience must be a positive integer, got {es.patience!r}")
    if not es.min_delta >= 0:
        raise ValueError(f"config.train.early_stopping.min_delta must be >= 0, got {es.min_delta}")


config_checks.register_check("data.val", check_config)
