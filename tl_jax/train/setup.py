"""The steps that prepare a run before its loop, each a function :func:`tl_jax.train.loop.prepare_run` calls
in order (which puts what they produce into a :class:`tl_jax.train.loop.Run`).

Workdir identity and checks (:func:`run_identity`, :func:`finished_summary`: a finished run is returned as
it is) -> the workdir lock, early where another process may hold it (:func:`lock_early`) -> data: tfds or
in-memory splits, validation carved out, shots, preprocessing (:func:`load_splits`; ``config.data.mock_examples``:
:func:`mock_catalogue`) -> after the model is built (:mod:`tl_jax.train.build`), the training batches
(:func:`train_batches`: grain, or a frozen backbone's cached features) -> checkpoints and the resume from the
newest good one (:func:`open_checkpoints`, :func:`resume`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split, mixing, train_dataset
from tl_jax.data.shuffle import train_iterator
from tl_jax.data.sources import EMBEDDED, find_user_dataset, is_in_memory
from tl_jax.data.validation import train_and_val_indices, validation_split
from tl_jax.parallel import distributed
from tl_jax.parallel.data import process_sharding
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import feature_cache
from tl_jax.train import lock as workdir_lock
from tl_jax.train import workdir as workdir_lib
from tl_jax.train.checkpoint import Checkpoints, use_async_save
from tl_jax.train.state import TrainState
from tl_jax.train.workdir import Workdir
from tl_jax.util.log_once import warn_once
from tl_jax.util.references import absolute_reference
from tl_jax.weights.run_preprocessing import apply_weights_preprocessing

log = logging.getLogger("tl_jax")


def run_identity(config: ml_collections.ConfigDict) -> dict:
    """The validated config as the workdir records it (``config.json``); file references made absolute."""
    apply_weights_preprocessing(config)  # converted init_from weights: their normalisation by default (issue 30)
    config_lib.validate(config)
    config_lib.normalize(config)  # data.shots: 0 and null (all examples) are one run
    for group in (config.model, config.data):  # file references ('x.py:f') recorded absolute in config.json
        group.name = absolute_reference(group.name)
    return distributed.run_identity(config_lib.to_dict(config))


def finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """``summary.json`` of ``workdir`` if it holds a finished run of exactly ``config``, else ``None``."""
    wd = Workdir(workdir)
    summary = wd.read_summary() if wd.config_file.is_file() else None
    if summary is None:
        return None
    cfg_dict = run_identity(config)
    wd.check(cfg_dict)  # another config: the one-line refusal, before anything else
    recorded = json.loads(wd.config_file.read_text())
    same = not workdir_lib.config_diff(recorded, cfg_dict)  # a larger train.steps differs: it continues
    return summary if same else None


def lock_early(wd: Workdir) -> workdir_lock.WorkdirLock | None:
    """The workdir's lock taken before any data is read, when the workdir exists (a run another process may
    be training into: refused at once, in one line); ``None`` for a new workdir, which is not created for a
    run that may still fail on its input (locked once the input is read, just before it is written)."""
    return workdir_lock.acquire(wd.path, jax.process_index()) if wd.path.is_dir() else None


@contextlib.contextmanager
def mock_catalogue(data_config):
    """With ``config.data.mock_examples=N``: tfds datasets opened inside read N random examples of their real
    features and shapes (``tfds.testing.mock_data``; the opened sources keep working after the block).

    Refused for the data tl_jax has without a download (embedded, in-memory, ``tl-jax data prepare``): the
    real data is there, and a mock run of it could be mistaken for a real one.
    """
    n = data_config.mock_examples
    if n is None:
        yield
        return
    name = data_config.name
    if name in EMBEDDED or is_in_memory(name) or find_user_dataset(name, data_config.data_dir) is not None:
        raise ValueError(f"config.data.mock_examples={n} (--mock-data) is for tfds catalogue datasets (mnist, "
                         f"cifar10, ...); {name!r} is on this machine already: drop --mock-data")
    with tfds.testing.mock_data(num_examples=n):
        yield


@dataclasses.dataclass
class Splits:
    """A run's data before its model: the splits, the train rows used, the preprocessing, shapes and classes."""

    train: Any
    test: Any
    val: Any  # None without config.data.val_*
    indices: np.ndarray | None  # the train rows used (val carved out, shots drawn), None: all
    train_pp: Any
    eval_pp: Any
    sample: dict  # a preprocessed batch of one, for shapes
    num_classes: int

    @property
    def n_train(self) -> int:
        return len(self.train) if self.indices is None else len(self.indices)


def load_splits(config: ml_collections.ConfigDict) -> Splits:
    """Open ``config.data``'s splits, carve the validation set out of train first, draw the shots from the rest."""
    dc = config.data
    train_split = load_split(dc.name, dc.train_split, dc.data_dir)
    test_split = load_split(dc.name, dc.test_split, dc.data_dir)
    indices = val_indices = None  # config.data.val_fraction: carved out of train first, shots drawn from the rest
    if dc.shots is not None or dc.val_fraction is not None:
        indices, val_indices = train_and_val_indices(
            train_split.labels(), val_fraction=dc.val_fraction, val_seed=dc.val_seed, shots=dc.shots,
            shots_seed=dc.shots_seed, name=f"{dc.name}:{dc.train_split}")
    val_split = validation_split(dc, train_split, val_indices)  # None without config.data.val_*
    train_pp = build_preprocess(list(dc.train_pp), where="config.data.train_pp")
    eval_pp = build_preprocess(list(dc.eval_pp), where="config.data.eval_pp")
    warn_small_train_set(config.data.batch_size, len(train_split) if indices is None else len(indices))
    example = train_pp(train_split.source[0], np.random.default_rng(0))
    sample = {k: np.asarray(v)[None] for k, v in example.items()}  # a batch of one, for shapes
    num_classes = config.model.num_classes or train_split.num_classes
    if num_classes < train_split.num_classes:
        raise ValueError(f"config.model.num_classes={num_classes} but {dc.name} has {train_split.num_classes} classes")
    return Splits(train_split, test_split, val_split, indices, train_pp, eval_pp, sample, num_classes)


def train_batches(config: ml_collections.ConfigDict, objective: Any, state: TrainState, splits: Splits,
                  local_batch: int) -> tuple[Any, Any]:
    """``(objective, dataset)``: this process's rows of each global batch (``config.parallel.data_sharding``),
    preprocessed by grain, or a frozen backbone's features computed once (``config.train.feature_cache``:
    the objective then trains the head on them)."""
    dc = config.data
    data_seed = config.seed if dc.data_seed is None else dc.data_seed
    shard = process_sharding(config.parallel.data_sharding, splits.n_train)
    cached = None if mixing.is_on(dc.mixup) else feature_cache.maybe_enable(  # mixup mixes images, not features
        config, objective, state, splits.train, splits.train_pp, splits.indices, shard, local_batch, data_seed)
    if cached is not None:
        return cached
    dataset = train_dataset(splits.train, splits.train_pp, batch_size=local_batch, seed=data_seed,
                            indices=splits.indices, cache=dc.cache, cache_max_mb=dc.cache_max_mb,
                            **shard.kwargs)  # config.data.cache
    dataset = shard.select(objective.train_dataset(dataset, batch_size=local_batch, seed=data_seed, **shard.kwargs))
    return objective, mixing.wrap(dataset, dc.mixup, batch_size=local_batch, seed=data_seed,
                                  num_classes=splits.num_classes)  # config.data.mixup


def prepare_workdir(wd: Workdir, cfg_dict: dict, *, overwrite: bool) -> None:
    """Write ``config.json`` (after the ``overwrite`` wipe) from the main process; the other processes of a
    multi-host run check the one it wrote."""
    is_main = jax.process_index() == 0
    if is_main:
        wd.prepare(cfg_dict, overwrite=overwrite)
    distributed.barrier("tl_jax:workdir")  # the other processes check config.json once it is written
    if not is_main:
        wd.prepare(cfg_dict, overwrite=overwrite, write=False)


def open_checkpoints(config: ml_collections.ConfigDict, wd: Workdir, state: TrainState, has_val: bool) -> Checkpoints:
    """The run's checkpoint manager (``config.train.keep_checkpoints``, ``best_metric``, async, compression)."""
    tc = config.train
    async_save = use_async_save(tc.checkpoint_async, state)  # 'auto': sync on CPUs for small states
    best_metric = es_lib.resolve_best_metric(tc.best_metric, has_val)  # 'auto': val/accuracy
    ckpts = Checkpoints(wd.checkpoints, keep=tc.keep_checkpoints, best_metric=best_metric, best_mode=tc.best_mode,
                        async_save=async_save, compression=tc.checkpoint_compression)
    log.info("checkpoints: %s saves (config.train.checkpoint_async=%r)", "asynchronous" if async_save else
             "synchronous", tc.checkpoint_async)
    return ckpts


def resume(ckpts: Checkpoints, wd: Workdir, state: TrainState, dataset: Any) -> tuple[TrainState, Any, list, int]:
    """``(state, data_iter, pending metrics, step)`` restored from the newest good checkpoint (the fresh ones
    at step 0 without one); ``metrics.jsonl`` cut back to that step (a dead run's later lines are logged again)."""
    data_iter = train_iterator(dataset)  # grain read threads sized to the machine (tl_jax/data/shuffle.py)
    resumed = ckpts.restore_latest(state)
    pending, step0 = [], 0
    if resumed is not None:
        step0, state, data_state = resumed
        data_iter.set_state(data_state["iterator"])
        pending = data_state.get("pending_metrics", [])
        log.info("resumed from %s at step %d", wd.checkpoints / str(step0), step0)
    if jax.process_index() == 0:  # events logged after the restored step (by a run that died) are logged again
        wd.truncate_metrics(step0)
    return state, data_iter, pending, step0


def warn_small_train_set(batch_size: int, n_train: int) -> None:
    """Warn when one batch holds more examples than the training set (an epoch is shorter than a step)."""
    if batch_size > n_train:
        warn_once(log, "config.data.batch_size=%d exceeds the %d training examples: the shuffled epochs are "
                  "concatenated, so each batch holds every example %.1f times on average (fine for few-shot "
                  "runs; lower the batch size for one pass per step)", batch_size, n_train, batch_size / n_train)
