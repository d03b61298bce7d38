"""``train(config, workdir)``: build a run from its config and train it.

The pieces, in order: workdir check -> data (tfds split, shots, grain) -> model
init (+ ``merge_params`` from ``init_from``) -> freezing rules -> optimizer ->
resume from the newest good checkpoint -> the loop (pure step compiled by a
``tl_jax.parallel`` strategy: sharded jit or pmap,
prefetched sharded batches, metrics fetched every ``log_every`` steps,
periodic full-test-split eval, checkpoints) -> ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, device_batches, eval_batches, load_split, sample_shots, train_dataset
from tl_jax.data.shuffle import train_iterator
from tl_jax.models import get_model, norm_paths
from tl_jax.parallel import distributed, make_strategy
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.data import process_sharding
from tl_jax.train import compile_cache
from tl_jax.train.checkpoint import Checkpoints, load_variables, use_async_save
from tl_jax.train import feature_cache
from tl_jax.train.heap import frozen_heap
from tl_jax.train.optim import make_group_tx
from tl_jax.train.preemption import Preempted, StopSignal, maybe_kill
from tl_jax.train.prefetch import Prefetcher, auto_size
from tl_jax.train.state import TrainState
from tl_jax.objectives import build_objective, model_inputs
from tl_jax.objectives.regularizers import add_regularizers
from tl_jax.train.step import make_eval_step, make_train_step
from tl_jax.train.train_metrics import NonFiniteError, PackedMetrics, grad_norm_steps, log_window  # noqa: F401
from tl_jax.train.train_metrics import fetch as fetch_metrics
from tl_jax.train.workdir import Workdir
from tl_jax.transfer import param_rules as rules_lib
from tl_jax.transfer.merge import merge_params

log = logging.getLogger("tl_jax")
PyTree = Any


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


def build_model_and_state(config: ml_collections.ConfigDict, num_classes: int, sample: dict, mesh):
    """Objective (with its model), optimizer and initial replicated state, ``init_from`` merged in."""
    kwargs = dict(config.model.kwargs)
    model = get_model(config.model.name, num_classes, dropout_rate=config.model.dropout_rate, **kwargs)
    objective = build_objective(config, model)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng, extra_rng = jax.random.split(rng, 3)
    args, kwargs = model_inputs(sample)
    variables = jax.jit(lambda r: objective.model.init(r, *args, train=False, **kwargs))(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if config.init_from:
        loaded = load_variables(config.init_from)
        params = merge_params(loaded["params"], params, config.dont_load, source=f"init_from {config.init_from}")
        if batch_stats:
            batch_stats = merge_params(loaded.get("batch_stats", {}), batch_stats, config.dont_load,
                                       source=f"init_from {config.init_from} (batch_stats)", check_rules=False)
        log.info("loaded %s (kept fresh: %s)", config.init_from, list(config.dont_load))
    params = objective.init_params(jax.random.fold_in(extra_rng, 1), params, batch_stats)
    extra, aux = objective.init_extra(extra_rng, params, batch_stats)
    clash = sorted(set(extra) & set(params))
    if clash:
        raise ValueError(f"objective {objective.name!r} adds params {clash} that the model already has")
    params = {**params, **extra}
    rules = objective.fixed_rules() + [list(r) for r in config.param_rules]
    frozen_norms = rules_lib.frozen_module_paths(params, rules, norm_paths(batch_stats)) if batch_stats else ()
    if frozen_norms:
        objective.model = objective.model.clone(frozen_norms=frozen_norms)
    tx = rules_lib.build_optimizer(params, rules, make_group_tx(config.optimizer, config.train.steps))
    log.info("param groups (config.param_rules):\n%s", rules_lib.summary_table(params, rules))
    objective, aux = add_regularizers(objective, config, params, rules, aux)  # config.loss.{l1,l2,l2_sp}
    repl = mesh_lib.replicated(mesh)

    def init_state(params, batch_stats, aux):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=train_rng, skipped=jnp.zeros((), jnp.int32), aux=aux)

    state = jax.jit(init_state, out_shardings=repl)(params, batch_stats, aux)
    return objective, tx, state


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

    def loop(self) -> dict:
        """Run :func:`run_loop` on this run; returns the summary."""
        return run_loop(self.config, self.wd, self.ckpts, self.strategy, self.state, self.data_iter, self.tx,
                        self.objective, self.test_split, self.eval_pp, self.t_start, pending=self.pending,
                        device_data=self.device_data)


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the summary."""
    return prepare_run(config, workdir, overwrite=overwrite).loop()


def prepare_run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                device_data: bool = True) -> Run:
    """Everything of :func:`train` before the step loop (also used by vectorised sweeps).

    ``device_data=False``: the data iterator yields host batches whatever ``config.data.device_cache`` says
    (for callers with their own step, e.g. vectorised sweeps).
    """
    t_start = time.time()
    config_lib.validate(config)
    distributed.initialize(config.parallel)  # before any JAX op; no-op unless multi-host (the CLI did it)
    cfg_dict = distributed.run_identity(config_lib.to_dict(config))
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
    indices = None
    if dc.shots is not None:
        indices = sample_shots(train_split.labels(), dc.shots, dc.shots_seed, name=f"{dc.name}:{dc.train_split}")
    train_pp = build_preprocess(list(dc.train_pp), where="config.data.train_pp")
    eval_pp = build_preprocess(list(dc.eval_pp), where="config.data.eval_pp")
    example = train_pp(train_split.source[0], np.random.default_rng(0))
    sample = {k: np.asarray(v)[None] for k, v in example.items()}  # a batch of one, for shapes
    num_classes = config.model.num_classes or train_split.num_classes
    if num_classes < train_split.num_classes:
        raise ValueError(f"config.model.num_classes={num_classes} but {dc.name} has {train_split.num_classes} classes")
    data_seed = config.seed if dc.data_seed is None else dc.data_seed
    objective, tx, state = build_model_and_state(config, num_classes, sample, mesh)
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
    test_split, eval_pp = objective.eval_data(test_split, eval_pp)
    on_device = device_batches.maybe_enable(dc.device_cache if device_data else False, dataset, strategy,
                                            dc.device_cache_max_mb)  # config.data.device_cache
    if on_device is not None:
        dataset = on_device.recipes  # same batches, as row indices and draws: the step makes the pixels

    if is_main:
        wd.prepare(cfg_dict, overwrite=overwrite)
    distributed.barrier("tl_jax:workdir")  # the other processes check config.json once it is written
    if not is_main:
        wd.prepare(cfg_dict, overwrite=overwrite, write=False)
    async_save = use_async_save(config.train.checkpoint_async, state)  # 'auto': sync on CPUs for small states
    ckpts = Checkpoints(wd.checkpoints, keep=config.train.keep_checkpoints, best_metric=config.train.best_metric,
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
               pending, step0, on_device)


def run_loop(config, wd: Workdir, ckpts: Checkpoints, strategy, state: TrainState, data_iter, tx, objective,
             test_split, eval_pp, t_start: float, pending: list | None = None,
             device_data: device_batches.DeviceBatches | None = None) -> dict:
    """The step loop; returns the summary written to ``summary.json``.

    ``device_data``: ``data_iter`` yields recipes and the step makes the batch from the table on the devices.
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

    def run_eval(step: int) -> dict:
        res = evaluate(eval_step, state, test_split, eval_pp, config.data.eval_batch_size, strategy.mesh,
                       put_batch=strategy.put_batch)
        count = res.pop("count")
        record = {"step": step, **{f"test/{k}": v for k, v in res.items()}}
        if is_main:
            wd.log(record)
        log.info("step %d: %s (%d examples)", step, " ".join(f"{k}={v:.4f}" for k, v in record.items()
                                                              if k != "step"), count)
        return record

    compile_s, compiled = 0.0, False
    pending = [tuple(p) for p in pending or []]  # (step, metrics) not yet logged
    closed = 0  # pending[:closed]: a window that ended at the previous step, logged once this step is queued
    last_train: dict = {}
    last_eval: dict | None = None
    t_loop = time.time()
    progress = _progress(step, total, tc.progress and is_main)
    timer = compile_cache.CompileTimer()  # every compile in the loop (train and eval steps), for compile_s

    def host_metrics(items: list) -> list:
        """``(step, metrics)`` pairs on the host, as dicts (one fetch for all)."""
        values = fetch_metrics([m for _, m in items])  # np.asarray on CPUs (device_get costs more host time)
        packed = next(p for p in packs.values() if p.names)  # a traced program (both pack the same names)
        return [(s, packed.unpack(v)) for (s, _), v in zip(items, values)]

    def flush(n: int) -> None:
        nonlocal pending, last_train
        last_train = log_window(host_metrics(pending[:n]), wd, is_main, tc.nan_policy, state,
                                norm_steps=norm_step)
        pending = pending[n:]
        progress.set_postfix(loss=f"{last_train.get('train/loss', float('nan')):.4f}")

    log_every, eval_every, ckpt_every = tc.log_every, tc.eval_every, tc.checkpoint_every  # read once, not per step
    try:
        # frozen_heap: full GC passes skip the ~300k objects of the imports and the built run (tl_jax/train/heap.py)
        with StopSignal() as stop, timer, frozen_heap():
            while step < total:
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
                evaluating = (eval_every and step % eval_every == 0) or step == total
                stopping = stop.should_stop(step)
                saving = step % ckpt_every == 0 or step == total or stopping
                if closed and (evaluating or saving):  # in sync anyway; a checkpoint comes after its step's logs
                    flush(closed)
                    closed = 0
                if evaluating:
                    last_eval = run_eval(step)
                if saving:
                    # The not-yet-logged per-step metrics travel with the checkpoint, so a
                    # resume from any step logs exactly the same windows.
                    host_pending = [[s, {k: float(v) for k, v in m.items()}] for s, m in host_metrics(pending)]
                    ckpts.save(step, strategy.to_global(state),
                               {"iterator": data_state, "pending_metrics": host_pending},
                               _best(last_eval, step, tc.best_metric))
                    maybe_kill("kill_during_save", step)
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
    if last_eval is None:  # resumed a finished run: evaluate the restored state
        with timer:
            last_eval = run_eval(step)
    compile_s = max(compile_s, timer.seconds)
    summary = {"steps": step, "wall_s": time.time() - t_start, "train_s": time.time() - t_loop - compile_s,
               "compile_s": compile_s, "skipped_steps": int(strategy.fetch_state(state.skipped)),
               **{k: v for k, v in last_train.items() if k != "step"},
               **{k: v for k, v in last_eval.items() if k != "step"}}
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
                           grad_norm_every=config.train.log_every, last_step=config.train.steps, grad_norm=grad_norm)


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
    return rules_lib.trainable_mask(params, objective.fixed_rules() + [list(r) for r in config.param_rules])


def _best(last_eval: dict | None, step: int, metric: str) -> dict | None:
    if last_eval is None or last_eval.get("step") != step or metric not in last_eval:
        return None
    return {metric: last_eval[metric]}


def _progress(initial: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only, so logs of `make demo > log` stay clean.
    return tqdm(total=total, initial=initial, disable=True if not enabled else None, desc="train", unit="step",
                leave=False)
