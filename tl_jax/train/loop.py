"""``train(config, workdir)``: build a run from its config and train it.

The pieces, in order: workdir check (a finished run is returned as it is) ->
data (tfds or in-memory split, validation carved out, shots, grain) -> model,
objective, freezing rules, optimizer and state (:mod:`tl_jax.train.build`,
``init_from`` merged in) -> the workdir lock -> resume from the newest good
checkpoint -> the loop (:mod:`tl_jax.train.run_loop`: pure step compiled by a
``tl_jax.parallel`` strategy, sharded jit or pmap, metrics fetched every
``log_every`` steps, periodic validation or test evals, ``config.evals``,
early stopping, checkpoints, trackers) -> ``summary.json``. With
``config.recipe.name='lp_ft'`` a linear-probe run in ``WORKDIR/lp`` comes first
(:mod:`tl_jax.train.lp_ft`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, device_batches, load_split, train_dataset
from tl_jax.data.shuffle import train_iterator
from tl_jax.data.validation import train_and_val_indices, validation_split
from tl_jax.parallel import distributed, make_strategy
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.data import process_sharding
from tl_jax.util.references import absolute_reference
from tl_jax.util.log_once import warn_once
from tl_jax.train import compile_cache
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import ema as ema_lib
from tl_jax.train import feature_cache, lp_ft
from tl_jax.evaluation import evaluators as fewshot_evals
from tl_jax.train import lock as workdir_lock
from tl_jax.train import workdir as workdir_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.checkpoint import Checkpoints, use_async_save
from tl_jax.evaluation.during_training import check_validation, evaluate  # noqa: F401  (tl_jax.train.loop.evaluate: public)
from tl_jax.train.run_loop import grad_norm_flags, pure_train_step, run_loop  # noqa: F401  (re-exported)
from tl_jax.train.state import TrainState
from tl_jax.train.trackers import open_trackers
from tl_jax.train.train_metrics import NonFiniteError  # noqa: F401  (raised by the loop; public here)
from tl_jax.train.workdir import Workdir

log = logging.getLogger("tl_jax")
PyTree = Any


@dataclasses.dataclass
class Run:
    """A run ready for :func:`run_loop`: built, its workdir prepared, resumed from its newest checkpoint."""

    config: ml_collections.ConfigDict
    wd: Workdir
    ckpts: Checkpoints
    strategy: Any
    state: TrainState
    data_iter: Any
    tx: Any
    objective: Any
    test_split: Any
    eval_pp: Any
    t_start: float
    pending: list
    step0: int
    device_data: device_batches.DeviceBatches | None = None  # config.data.device_cache: batches made in the step

    lock: Any = None  # this process's hold on the workdir (tl_jax/train/lock.py), released after the loop
    val_split: Any = None  # config.data.val_fraction / val_split: evaluated for val/* (None: no validation set)
    evaluators: list = dataclasses.field(default_factory=list)  # config.evals (tl_jax/evaluation/evaluators.py)
    eval_model: Any = None  # the model the evaluators run (the full one, also when the head trains on cached features)
    probe_summary: dict | None = None  # config.recipe.name='lp_ft': the probe phase's summary (tl_jax/train/lp_ft.py)

    def loop(self) -> dict:
        """Run :func:`run_loop` on this run; returns the summary."""
        if jax.process_index() == 0:  # config.tracking: TensorBoard events etc. beside metrics.jsonl
            self.wd.trackers = open_trackers(self.config.tracking, self.wd.path, config_lib.to_dict(self.config),
                                             self.step0)
        try:
            return run_loop(self.config, self.wd, self.ckpts, self.strategy, self.state, self.data_iter, self.tx,
                            self.objective, self.test_split, self.eval_pp, self.t_start, pending=self.pending,
                            device_data=self.device_data, val_split=self.val_split, evaluators=self.evaluators,
                            eval_model=self.eval_model, probe_summary=self.probe_summary)
        finally:
            if self.wd.trackers is not None:
                self.wd.trackers.close()
                self.wd.trackers = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the summary.

    A finished run (its ``summary.json`` written for this very config) is not run again: its
    summary is returned and no file is touched. A larger ``config.train.steps`` continues it.
    """
    if not overwrite:
        done = finished_summary(config, workdir)
        if done is not None:
            log.info("%s is finished (%d steps): nothing to do; its summary.json is kept as is", workdir,
                     done.get("steps", 0))
            return done
    return prepare_run(config, workdir, overwrite=overwrite).loop()


def run_identity(config: ml_collections.ConfigDict) -> dict:
    """The validated config as the workdir records it (``config.json``); file references made absolute."""
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


def prepare_run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                device_data: bool = True) -> Run:
    """Everything of :func:`train` before the step loop (also used by vectorised sweeps).

    ``device_data=False``: the data iterator yields host batches whatever ``config.data.device_cache`` says
    (for callers with their own step, e.g. vectorised sweeps). ``config.data.mock_examples``: every tfds
    split opened here is ``tfds.testing.mock_data`` (:func:`mock_catalogue`).
    """
    with mock_catalogue(config.data):
        return _prepare_run(config, workdir, overwrite=overwrite, device_data=device_data)


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
    from tl_jax.data.sources import EMBEDDED, find_user_dataset, is_in_memory

    name = data_config.name
    if name in EMBEDDED or is_in_memory(name) or find_user_dataset(name, data_config.data_dir) is not None:
        raise ValueError(f"config.data.mock_examples={n} (--mock-data) is for tfds catalogue datasets (mnist, "
                         f"cifar10, ...); {name!r} is on this machine already: drop --mock-data")
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=n):
        yield


def _prepare_run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool, device_data: bool) -> Run:
    """:func:`prepare_run`'s body (inside :func:`mock_catalogue`)."""
    t_start = time.time()
    cfg_dict = run_identity(config)
    distributed.initialize(config.parallel)  # before any JAX op; no-op unless multi-host (the CLI did it)
    wd = Workdir(workdir)
    is_main = jax.process_index() == 0
    wd.check(cfg_dict, overwrite=overwrite)
    compile_cache.enable(config.compile_cache_dir)
    probe_summary = probe_vars = None
    if lp_ft.is_lp_ft(config):  # config.recipe.name='lp_ft': the linear probe first, in WORKDIR/lp
        log.info("LP-FT (config.recipe.name='lp_ft'): the linear probe phase in %s", lp_ft.probe_dir(wd.path))
        probe_summary = train(lp_ft.probe_config(config), str(lp_ft.probe_dir(wd.path)), overwrite=overwrite)
        probe_vars = lp_ft.probe_variables(wd.path)
    strategy = make_strategy(config)  # config.parallel: jit over a mesh, or pmap
    mesh = strategy.mesh
    local_batch = mesh_lib.check_batch(config.data.batch_size, mesh)
    mesh_lib.check_batch(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")

    # Data.
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
    data_seed = config.seed if dc.data_seed is None else dc.data_seed
    objective, tx, state = build_model_and_state(config, num_classes, sample, mesh, start_from=probe_vars)
    eval_model = (objective.model, objective.model_params)  # before a feature cache swaps the objective
    evaluators = fewshot_evals.build(config)  # config.evals: their data read now, before the workdir is touched
    state = ema_lib.attach(state, config.train.ema_decay)  # config.train.ema_decay: an EMA of the params
    state = strategy.init_state(state)  # FSDP-shard big leaves over the mesh's 'model' axis
    # This process's rows of each global batch (config.parallel.data_sharding).
    shard = process_sharding(config.parallel.data_sharding, len(train_split) if indices is None else len(indices))
    cached = feature_cache.maybe_enable(config, objective, state, train_split, train_pp, indices, shard, local_batch,
                                        data_seed)  # config.train.feature_cache: a frozen backbone's features, once
    if cached is not None:
        objective, dataset = cached
    else:
        dataset = train_dataset(train_split, train_pp, batch_size=local_batch, seed=data_seed, indices=indices,
                                cache=dc.cache, cache_max_mb=dc.cache_max_mb, **shard.kwargs)  # config.data.cache
        dataset = shard.select(objective.train_dataset(dataset, batch_size=local_batch, seed=data_seed,
                                                       **shard.kwargs))
    if val_split is not None:  # before the workdir is touched: the metrics that select and stop must be logged
        check_validation(config, objective, state, val_split, eval_pp)
    test_split, eval_pp = objective.eval_data(test_split, eval_pp)
    on_device = device_batches.maybe_enable(dc.device_cache if device_data else False, dataset, strategy,
                                            dc.device_cache_max_mb)  # config.data.device_cache
    if on_device is not None:
        dataset = on_device.recipes  # same batches, as row indices and draws: the step makes the pixels

    lock = workdir_lock.acquire(wd.path, jax.process_index())  # one run per workdir (and process index)
    if is_main:
        wd.prepare(cfg_dict, overwrite=overwrite)
    distributed.barrier("tl_jax:workdir")  # the other processes check config.json once it is written
    if not is_main:
        wd.prepare(cfg_dict, overwrite=overwrite, write=False)
    async_save = use_async_save(config.train.checkpoint_async, state)  # 'auto': sync on CPUs for small states
    best_metric = es_lib.resolve_best_metric(config.train.best_metric, val_split is not None)  # 'auto': val/accuracy
    ckpts = Checkpoints(wd.checkpoints, keep=config.train.keep_checkpoints, best_metric=best_metric,
                        best_mode=config.train.best_mode, async_save=async_save,
                        compression=config.train.checkpoint_compression)
    log.info("checkpoints: %s saves (config.train.checkpoint_async=%r)", "asynchronous" if async_save else
             "synchronous", config.train.checkpoint_async)
    data_iter = train_iterator(dataset)  # grain read threads sized to the machine (tl_jax/data/shuffle.py)
    resumed = ckpts.restore_latest(state)
    pending, step0 = [], 0
    if resumed is not None:
        step0, state, data_state = resumed
        data_iter.set_state(data_state["iterator"])
        pending = data_state.get("pending_metrics", [])
        log.info("resumed from %s at step %d", wd.checkpoints / str(step0), step0)
    if is_main:  # events logged after the restored step (by a run that died) are logged again
        wd.truncate_metrics(step0)

    return Run(config, wd, ckpts, strategy, state, data_iter, tx, objective, test_split, eval_pp, t_start,
               pending, step0, on_device, lock, val_split=val_split, evaluators=evaluators, eval_model=eval_model,
               probe_summary=probe_summary)


def warn_small_train_set(batch_size: int, n_train: int) -> None:
    """Warn when one batch holds more examples than the training set (an epoch is shorter than a step)."""
    if batch_size > n_train:
        warn_once(log, "config.data.batch_size=%d exceeds the %d training examples: the shuffled epochs are "
                  "concatenated, so each batch holds every example %.1f times on average (fine for few-shot "
                  "runs; lower the batch size for one pass per step)", batch_size, n_train, batch_size / n_train)
