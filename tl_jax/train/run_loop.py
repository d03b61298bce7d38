"""The step loop of a prepared run: ``run_loop`` and the pure train step it compiles.

Every ``log_every`` steps the metrics of the window are fetched (one host copy,
once the next step is queued); every ``eval_every`` steps (and at the last) the
val / test evals run (:mod:`tl_jax.evaluation.during_training`), then the ``config.evals``
evaluators (:mod:`tl_jax.evaluation.evaluators`); early stopping is decided from the
logged val records (:mod:`tl_jax.train.early_stopping`); checkpoints carry the
data iterator's state and the not-yet-logged metrics, so a resumed run logs and
trains exactly as the uninterrupted one. The run is prepared by
:func:`tl_jax.train.loop.prepare_run`.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax

from tl_jax.data import device_batches
from tl_jax.train import compile_cache
from tl_jax.train import early_stopping as es_lib
from tl_jax.train import ema as ema_lib
from tl_jax.train import lp_ft
from tl_jax.evaluation import evaluators as fewshot_evals
from tl_jax.train.build import param_groups
from tl_jax.train.checkpoint import Checkpoints
from tl_jax.evaluation.during_training import best_record, evaluate, logged_evals
from tl_jax.train.gc_freeze import frozen_heap
from tl_jax.train.optim import learning_rates
from tl_jax.train.preemption import Preempted, StopSignal, maybe_kill, maybe_pause
from tl_jax.train.prefetch import Prefetcher, auto_size
from tl_jax.train.progress import Progress
from tl_jax.train.state import TrainState
from tl_jax.train.step import make_eval_step, make_train_step
from tl_jax.train.train_metrics import PackedMetrics, grad_norm_steps, log_window
from tl_jax.train.train_metrics import fetch as fetch_metrics
from tl_jax.train.workdir import Workdir

log = logging.getLogger("tl_jax")


def run_loop(config, wd: Workdir, ckpts: Checkpoints, strategy, state: TrainState, data_iter, tx, objective,
             test_split, eval_pp, t_start: float, pending: list | None = None,
             device_data: device_batches.DeviceBatches | None = None, val_split=None, evaluators=(),
             eval_model=None, probe_summary: dict | None = None) -> dict:
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

    model, model_params = eval_model or (objective.model, objective.model_params)

    def periodic_evals(step: int) -> dict:
        """``config.evals`` due at ``step`` (few-shot ridge on the current features), ``{}`` if none."""
        if not evaluators:
            return {}
        return fewshot_evals.evaluate_due(
            evaluators, step, total, model,
            lambda: fewshot_evals.host_variables(strategy.to_global(state), model_params, strategy.fetch_state))

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
        # frozen_heap: full GC passes skip the ~300k objects of the imports and the built run (tl_jax/train/gc_freeze.py)
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
                periodic = periodic_evals(step)  # config.evals
                if periodic and not evaluating and is_main:
                    wd.log({"step": step, **periodic})
                if evaluating:
                    last_eval = run_eval(step, final_prefixes() if step == total else ("val",) if has_val
                                         else ("test",))
                    last_eval.update(periodic)
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
        last_eval.update(periodic_evals(step))
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
    summary = lp_ft.with_probe_summary(summary, probe_summary)  # config.recipe 'lp_ft': the probe's as lp/*
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
