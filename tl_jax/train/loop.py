"""``train(config, workdir)``: build a run from its config and train it.

The pieces, in order: workdir check (a finished run is returned as it is) ->
data (tfds or in-memory split, validation carved out, shots, grain) -> model,
objective, freezing rules, optimizer and state (:mod:`tl_jax.train.build`,
``init_from`` merged in) -> the workdir lock -> resume from the newest good
checkpoint -> the loop (pure step compiled by a ``tl_jax.parallel`` strategy:
sharded jit or pmap, metrics fetched every ``log_every`` steps, periodic
validation or test evals (:mod:`tl_jax.train.evals`), early stopping,
checkpoints, trackers) -> ``summary.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
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
from tl_jax.references import absolute_reference
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.data import process_sharding
from tl_jax.train import compile_cache
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import ema as ema_lib
from tl_jax.train.checkpoint import Checkpoints, use_async_save
from tl_jax.train import feature_cache
from tl_jax.train.heap import frozen_heap
from tl_jax.train.optim import learning_rates
from tl_jax.train.preemption import Preempted, StopSignal, maybe_kill, maybe_pause
from tl_jax.train.prefetch import Prefetcher, auto_size
from tl_jax.train.progress import Progress
from tl_jax.train.trackers import open_trackers
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_eval_step, make_train_step
from tl_jax.train.train_metrics import NonFiniteError, PackedMetrics, grad_norm_steps, log_window  # noqa: F401
from tl_jax.train.train_metrics import fetch as fetch_metrics
from tl_jax.train import lock as workdir_lock
from tl_jax.train import workdir as workdir_lib
from tl_jax.train.workdir import Workdir

from tl_jax.train.build import build_model_and_state, param_groups
from tl_jax.train.evals import best_record, check_validation, evaluate, logged_evals  # noqa: F401

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

    def loop(self) -> dict:
        """Run :func:`run_loop` on this run; returns the summary."""
        if jax.process_index() == 0:  # config.tracking: TensorBoard events etc. beside metrics.jsonl
            self.wd.trackers = open_trackers(self.config.tracking, self.wd.path, config_lib.to_dict(self.config),
                                             self.step0)
        try:
            return run_loop(self.config, self.wd, self.ckpts, self.strategy, self.state, self.data_iter, self.tx,
                            self.objective, self.test_split, self.eval_pp, self.t_start, pending=self.pending,
                            device_data=self.device_data, val_split=self.val_split)
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
    objective, tx, state = build_model_and_state(config, num_classes, sample, mesh)
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
               pending, step0, on_device, lock, val_split=val_split)


def warn_small_train_set(batch_size: int, n_train: int) -> None:
    """Warn when one batch holds more examples than the training set (an epoch is shorter than a step)."""
    if batch_size > n_train:
        log.warning("config.data.batch_size=%d exceeds the %d training examples: the shuffled epochs are "
                    "concatenated, so each batch holds every example %.1f times on average (fine for few-shot "
                    "runs; lower the batch size for one pass per step)", batch_size, n_train, batch_size / n_train)


def run_loop(config, wd: Workdir, ckpts: Checkpoints, strategy, state: TrainState, data_iter, tx, objective,
             test_split, eval_pp, t_start: float, pending: list | None = None,
             device_data: device_batches.DeviceBatches | None = None, val_split=None) -> dict:
    """The step loop; returns the summary written to ``summary.json``.

    ``device_data``: ``data_iter`` yields recipes and the step makes the batch from the table on the devices.
    ``val_split``: the validation set (evaluated with ``eval_pp``). With it, the periodic evals log ``val/*``
    only and the final eval ``val/*`` and ``test/*``; every eval step is checkpointed when checkpoints are
    ranked (``config.train.best_metric``), so the best val step is always one; ``config.train.early_stopping``
    stops at the eval :mod:`tl_jax.train.early_stopping` says, from the val records of ``metrics.jsonl``.
    """
    tc = config.train
    is_main = jax.process_index() == 0
    total = tc.steps
    step = int(jax.device_get(state.step))
    strategy.prepare_objective(objective)  # tl_jax/parallel/: sharded jit or pmap
    state = strategy.to_device(state)
    # {grad_norm: program}: with 'separate', the steps that log train/grad_norm run their own program.
    norm_step = grad_norm_steps(config)
    flags = grad_norm_flags(config)
    packs = {flag: PackedMetrics(_wrap(pure_train_step(config, objective, tx, state.params, strategy.axis_name,
                                                       grad_norm=flag), device_data)) for flag in flags}
    train_steps = {flag: strategy.train_step(p) for flag, p in packs.items()}
    eval_step = strategy.eval_step(make_eval_step(objective))
    ahead = auto_size(config.data.prefetch)  # batches made ahead in a thread go to the devices there
    put = strategy.put_batch if ahead else strategy.loop_batch
    prefetch = Prefetcher(data_iter, device_data.put(put) if device_data is not None else put, size=ahead)

    has_val = val_split is not None
    best_metric = es_lib.resolve_best_metric(tc.best_metric, has_val)
    es_cfg = tc.early_stopping
    es_rule = dict(patience=es_cfg.patience, min_delta=es_cfg.min_delta, mode=es_cfg.mode)
    es_metric = es_cfg.metric if has_val else ""
    # The val evals logged so far (metrics.jsonl, truncated to the restored step): early stopping and the
    # best step are functions of these records, so a resumed run decides as the uninterrupted one did.
    val_history = logged_evals(wd, step) if has_val else []
    stopped_at = es_lib.replay(val_history, es_metric, **es_rule).stopped_at if es_metric else None

    def run_eval(step: int, prefixes: tuple[str, ...]) -> dict:
        """``{"step", "<prefix>/<metric>"...}`` over the whole val / test split (not logged here)."""
        record = {"step": step}
        for prefix in prefixes:
            split = val_split if prefix == "val" else test_split
            res = evaluate(eval_step, state, split, eval_pp, config.data.eval_batch_size, strategy.mesh,
                           put_batch=strategy.put_batch)
            count = res.pop("count")
            record.update({f"{prefix}/{k}": v for k, v in res.items()})
            log.info("step %d: %s (%d examples)", step, " ".join(f"{prefix}/{k}={v:.4f}" for k, v in res.items()),
                     count)
            if ema_lib.has_ema(state):  # config.train.ema_decay: the averaged weights too, as <prefix>/ema/*
                res = evaluate(eval_step, ema_lib.ema_view(state), split, eval_pp, config.data.eval_batch_size,
                               strategy.mesh, put_batch=strategy.put_batch)
                res.pop("count")
                record.update({f"{prefix}/{ema_lib.PREFIX}/{k}": v for k, v in res.items()})
        return record

    def log_eval(record: dict) -> None:
        if is_main:
            wd.log(record)
        if has_val:
            val_history.append(record)

    def final_prefixes() -> tuple[str, ...]:
        return ("val", "test") if has_val else ("test",)

    compile_s, compiled = 0.0, False
    pending = [tuple(p) for p in pending or []]  # (step, metrics) not yet logged
    closed = 0  # pending[:closed]: a window that ended at the previous step, logged once this step is queued
    last_train: dict = {}
    last_eval: dict | None = None
    t_loop = time.time()
    progress = Progress(step, total, tc.progress and is_main)  # a bar on a terminal, else a log line per window
    timer = compile_cache.CompileTimer()  # every compile in the loop (train and eval steps), for compile_s

    def host_metrics(items: list) -> list:
        """``(step, metrics)`` pairs on the host, as dicts (one fetch for all)."""
        values = fetch_metrics([m for _, m in items])  # np.asarray on CPUs (device_get costs more host time)
        packed = next(p for p in packs.values() if p.names)  # a traced program (both pack the same names)
        return [(s, packed.unpack(v)) for (s, _), v in zip(items, values)]

    lrs = learning_rates(config.optimizer, total, param_groups(config, objective, state.params).trained())

    def flush(n: int) -> None:
        nonlocal pending, last_train
        last_train = log_window(host_metrics(pending[:n]), wd, is_main, tc.nan_policy, state,
                                norm_steps=norm_step)
        pending = pending[n:]
        steps_per_s = progress.window(last_train)
        if wd.trackers is not None:  # TensorBoard & co.: the rates, beside the logged record
            wd.trackers.scalars(last_train["step"], {"train/steps_per_s": steps_per_s, **lrs(last_train["step"])})

    log_every, eval_every, ckpt_every = tc.log_every, tc.eval_every, tc.checkpoint_every  # read once, not per step
    try:
        # frozen_heap: full GC passes skip the ~300k objects of the imports and the built run (tl_jax/train/heap.py)
        with StopSignal() as stop, timer, frozen_heap():
            while step < total and stopped_at is None:
                data_state, batch = next(prefetch)
                if not compiled:
                    compiled = True
                    t0 = time.time()
                    train_steps = {flag: strategy.compile(fn, state, batch) for flag, fn in train_steps.items()}
                    compile_s = time.time() - t0
                flag = None if None in train_steps else bool(norm_step(step + 1))
                state, metrics = train_steps[flag](state, batch)
                step += 1
                pending.append((step, metrics))
                progress.update(1)
                if closed:  # fetched while this step runs: the devices never wait for the host's logging
                    flush(closed)
                    closed = 0
                if step % log_every == 0 or step == total:
                    closed = len(pending)
                maybe_kill("kill_after_step", step)
                maybe_pause(step)
                evaluating = (eval_every and step % eval_every == 0) or step == total
                stopping = stop.should_stop(step)
                saving = step % ckpt_every == 0 or step == total or stopping or \
                    bool(evaluating and has_val and best_metric)  # the best val step is always a checkpoint
                if closed and (evaluating or saving):  # in sync anyway; a checkpoint comes after its step's logs
                    flush(closed)
                    closed = 0
                if evaluating:
                    last_eval = run_eval(step, final_prefixes() if step == total else ("val",) if has_val
                                         else ("test",))
                    if es_metric:
                        decided = es_lib.replay([*val_history, last_eval], es_metric, **es_rule)
                        if decided.stopped_at == step and step < total:
                            stopped_at, saving = step, True
                            if pending:  # the partial window ends here, as the last one does at the last step
                                flush(len(pending))
                                closed = 0
                            last_eval.update(run_eval(step, ("test",)))
                    log_eval(last_eval)
                if saving:
                    # The not-yet-logged per-step metrics travel with the checkpoint, so a
                    # resume from any step logs exactly the same windows.
                    host_pending = [[s, {k: float(v) for k, v in m.items()}] for s, m in host_metrics(pending)]
                    ckpts.save(step, strategy.to_global(state),
                               {"iterator": data_state, "pending_metrics": host_pending},
                               best_record(last_eval, step, best_metric))
                    maybe_kill("kill_during_save", step)
                if stopped_at is not None:
                    log.info("early stopping at step %d/%d: %s has not improved by more than %g for %d evals "
                             "(config.train.early_stopping)", step, total, es_metric, es_cfg.min_delta,
                             es_cfg.patience)
                    break
                if stopping and step < total:
                    ckpts.wait()
                    name = signal.Signals(stop.signum).name if stop.signum else "preemption notice"
                    raise Preempted(f"stopped by {name} after step {step}/{total}; checkpoint saved to "
                                    f"{wd.checkpoints / str(step)}; rerun the same command to resume",
                                    stop.signum or signal.SIGTERM)
    finally:
        progress.close()
        prefetch.close()
        ckpts.close()
    if last_eval is None:  # resumed a finished (or early-stopped) run: evaluate the restored state
        with timer:
            last_eval = run_eval(step, final_prefixes())
        log_eval(last_eval)
    compile_s = max(compile_s, timer.seconds)
    summary = {"steps": step, "wall_s": time.time() - t_start, "train_s": time.time() - t_loop - compile_s,
               "compile_s": compile_s, "skipped_steps": int(strategy.fetch_state(state.skipped)),
               **{k: v for k, v in last_train.items() if k != "step"},
               **{k: v for k, v in last_eval.items() if k != "step"}}
    if stopped_at is not None and stopped_at < total:
        summary["stopped_early"] = stopped_at
    if config.data.mock_examples is not None:  # tfds mock examples, not the data: never a result
        summary["mock_data"] = config.data.mock_examples
    best = es_lib.best_eval(val_history, best_metric, tc.best_mode) if has_val and best_metric else None
    if best is not None:  # the checkpoint retention keeps (config.train.best_metric)
        summary["best_step"], summary[f"best/{best_metric}"] = best
    if is_main:
        wd.write_summary(summary)
    return summary


def pure_train_step(config, objective, tx, params, axis_name: str | None = None, grad_norm: bool | None = None):
    """The run's pure ``(state, batch[, hparams]) -> (state, metrics)`` (also vmapped by tl_jax/sweep).

    ``grad_norm``: see :func:`tl_jax.train.step.make_train_step` (``None``: a ``lax.cond`` on the logged steps).
    """
    return make_train_step(objective.loss, tx, nan_policy=config.train.nan_policy, axis_name=axis_name,
                           value_and_grad=getattr(objective, "value_and_grad", None),
                           trainable=_trainable(config, objective, params),
                           grad_norm_every=config.train.log_every, last_step=config.train.steps, grad_norm=grad_norm,
                           accum_steps=config.optimizer.accum_steps, ema_decay=config.train.ema_decay)


def grad_norm_flags(config) -> tuple[bool | None, ...]:
    """The ``grad_norm`` of each program the loop compiles: ``(False, True)`` for
    ``config.train.grad_norm_program='separate'`` (the plain step, and the one the logged steps run), else
    ``(None,)`` (one program, a ``lax.cond``; also under ``nan_policy='skip'``, which needs ‖g‖ every step)."""
    tc = config.train
    return (False, True) if tc.grad_norm_program == "separate" and tc.nan_policy == "error" else (None,)


def _wrap(step_fn, device_data: device_batches.DeviceBatches | None):
    """The step as the loop calls it: with ``config.data.device_cache``, the batch made inside from a recipe."""
    return device_data.wrap(step_fn) if device_data is not None else step_fn


def _trainable(config, objective, params) -> Any:
    """Bool tree like ``params``: which leaves ``config.param_rules`` (after the objective's) train."""
    return param_groups(config, objective, params).trainable()
