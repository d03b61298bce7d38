"""``train(config, workdir)``: prepare the run, then its step loop; both read top to bottom here.

:func:`prepare_run` calls the steps of :mod:`tl_jax.train.setup` in order: workdir checks and lock -> data ->
model, objective, optimizer and state (:mod:`tl_jax.train.build`, ``init_from`` merged in; with
``config.recipe.name='lp_ft'`` a linear-probe run in ``WORKDIR/lp`` first, :mod:`tl_jax.train.lp_ft`) ->
training batches -> checkpoints, resumed from the newest good one. :class:`Loop` then runs the compiled step
(:mod:`tl_jax.train.programs`: sharded jit or pmap) and, after each step, in order: the metrics window
(fetched one step late, logged every ``log_every`` steps), fault hooks, the evals (val/test,
``config.evals``) and early stopping (:class:`tl_jax.evaluation.during_training.LoopEvals`, decided from the
logged val records), the checkpoint (with the data iterator's state and the metrics not logged yet, so a
resumed run logs and trains exactly as the uninterrupted one), and preemption; then ``summary.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from typing import Any

import jax
import ml_collections

from tl_jax import config as config_lib
from tl_jax.data import device_batches
from tl_jax.evaluation import evaluators as fewshot_evals
from tl_jax.evaluation.during_training import LoopEvals, best_record, check_validation
from tl_jax.parallel import distributed, make_strategy
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import compile_cache, lp_ft
from tl_jax.train import ema as ema_lib
from tl_jax.train import lock as workdir_lock
from tl_jax.train.build import build_model_and_state, param_groups
from tl_jax.train.checkpoint import Checkpoints
from tl_jax.train.gc_freeze import frozen_heap
from tl_jax.train.optim import learning_rates
from tl_jax.train.preemption import Preempted, StopSignal, maybe_kill, maybe_pause
from tl_jax.train.prefetch import Prefetcher, auto_size
from tl_jax.train.programs import StepPrograms
from tl_jax.train.progress import Progress
from tl_jax.train.setup import (finished_summary, load_splits, lock_early, mock_catalogue, open_checkpoints,
                                prepare_workdir, resume, run_identity, train_batches)
from tl_jax.train.state import TrainState
from tl_jax.train.trackers import open_trackers
from tl_jax.train.train_metrics import MetricsWindow
from tl_jax.train.workdir import Workdir

log = logging.getLogger("tl_jax")


@dataclasses.dataclass
class Run:
    """A run ready for its :class:`Loop`: built, its workdir prepared and locked, resumed from its newest
    checkpoint (:func:`prepare_run`)."""

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
        """:class:`Loop` on this run; returns the summary."""
        return Loop(self).run()


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
    return Loop(prepare_run(config, workdir, overwrite=overwrite)).run()


def prepare_run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                device_data: bool = True) -> Run:
    """Everything of :func:`train` before the step loop (also used by vectorised sweeps).

    ``device_data=False``: the data iterator yields host batches whatever ``config.data.device_cache`` says
    (for callers with their own step, e.g. vectorised sweeps). ``config.data.mock_examples``: every tfds
    split opened here is ``tfds.testing.mock_data`` (:func:`~tl_jax.train.setup.mock_catalogue`). Every
    refusal (config, workdir, lock, data, model) comes before the workdir is written; the lock of an existing
    workdir is taken before any data is read, and released again if preparing fails.
    """
    with mock_catalogue(config.data), contextlib.ExitStack() as on_error:
        t_start = time.time()
        cfg_dict = run_identity(config)
        distributed.initialize(config.parallel)  # before any JAX op; no-op unless multi-host (the CLI did it)
        wd = Workdir(workdir)
        wd.check(cfg_dict, overwrite=overwrite)
        compile_cache.enable(config.compile_cache_dir)
        lock = lock_early(wd)  # another process training into it: refused here, before the data is read
        if lock is not None:
            on_error.callback(lock.release)
        probe_summary = probe_vars = None
        if lp_ft.is_lp_ft(config):  # config.recipe.name='lp_ft': the linear probe first, in WORKDIR/lp
            log.info("LP-FT (config.recipe.name='lp_ft'): the linear probe phase in %s", lp_ft.probe_dir(wd.path))
            probe_summary = train(lp_ft.probe_config(config), str(lp_ft.probe_dir(wd.path)), overwrite=overwrite)
            probe_vars = lp_ft.probe_variables(wd.path)
        strategy = make_strategy(config)  # config.parallel: jit over a mesh, or pmap
        local_batch = mesh_lib.check_batch(config.data.batch_size, strategy.mesh)
        mesh_lib.check_batch(config.data.eval_batch_size, strategy.mesh, "config.data.eval_batch_size")
        splits = load_splits(config)
        objective, tx, state = build_model_and_state(config, splits.num_classes, splits.sample, strategy.mesh,
                                                     start_from=probe_vars)
        eval_model = (objective.model, objective.model_params)  # before a feature cache swaps the objective
        evaluators = fewshot_evals.build(config)  # config.evals: their data read now, before the workdir is touched
        state = ema_lib.attach(state, config.train.ema_decay)  # config.train.ema_decay: an EMA of the params
        state = strategy.init_state(state)  # FSDP-shard big leaves over the mesh's 'model' axis
        objective, dataset = train_batches(config, objective, state, splits, local_batch)
        if splits.val is not None:  # before the workdir is touched: the metrics that select and stop must be logged
            check_validation(config, objective, state, splits.val, splits.eval_pp)
        test_split, eval_pp = objective.eval_data(splits.test, splits.eval_pp)
        on_device = device_batches.maybe_enable(config.data.device_cache if device_data else False, dataset,
                                                strategy, config.data.device_cache_max_mb)  # config.data.device_cache
        if on_device is not None:
            dataset = on_device.recipes  # same batches, as row indices and draws: the step makes the pixels
        if lock is None:
            lock = workdir_lock.acquire(wd.path, jax.process_index())  # one run per workdir (and process index)
            on_error.callback(lock.release)
        prepare_workdir(wd, cfg_dict, overwrite=overwrite)
        ckpts = open_checkpoints(config, wd, state, splits.val is not None)
        state, data_iter, pending, step0 = resume(ckpts, wd, state, dataset)
        on_error.pop_all()  # prepared: the loop releases the lock
    return Run(config, wd, ckpts, strategy, state, data_iter, tx, objective, test_split, eval_pp, t_start,
               pending, step0, on_device, lock, val_split=splits.val, evaluators=evaluators, eval_model=eval_model,
               probe_summary=probe_summary)


class Loop:
    """One run's step loop: :meth:`run` trains to ``config.train.steps`` (or the early stop) and returns the summary.

    It owns what changes from step to step (the state on the devices, the step count, the metrics not logged
    yet, the last train and eval records). :meth:`run` holds the loop: each step runs the compiled step on the
    next batch, then calls the small helpers below in order (metrics window, evals and early stopping,
    checkpoint, preemption).
    """

    def __init__(self, run: Run):
        self.prepared, self.wd, self.strategy, self.ckpts = run, run.wd, run.strategy, run.ckpts

    def _begin(self) -> None:
        """Trackers (process 0), the state on the devices, the compiled programs, the evals and the prefetcher."""
        run, strategy = self.prepared, self.strategy
        config = run.config
        tc = config.train
        if jax.process_index() == 0:  # config.tracking: TensorBoard events etc. beside metrics.jsonl
            self.wd.trackers = open_trackers(config.tracking, self.wd.path, config_lib.to_dict(config), run.step0)
        self.is_main = jax.process_index() == 0
        self.total, self.log_every, self.ckpt_every = tc.steps, tc.log_every, tc.checkpoint_every  # read once
        self.step = int(jax.device_get(run.state.step))
        self.state = strategy.to_device(run.state)
        self.programs = StepPrograms(config, run.objective, run.tx, self.state.params, strategy, run.device_data)
        self.evals = LoopEvals(config, run.wd, strategy, run.objective, run.test_split, run.val_split, run.eval_pp,
                               step=self.step, evaluators=run.evaluators, eval_model=run.eval_model)
        ahead = auto_size(config.data.prefetch)  # batches made ahead in a thread go to the devices there
        put = strategy.put_batch if ahead else strategy.loop_batch
        self.prefetch = Prefetcher(run.data_iter, run.device_data.put(put) if run.device_data is not None else put,
                                   size=ahead)
        self.window = MetricsWindow(run.pending, self.programs.to_host, run.wd, tc.nan_policy,
                                    self.programs.norm_step)
        self.last_train: dict = {}
        self.last_eval: dict | None = None
        self.t_loop = time.time()
        self.progress = Progress(self.step, self.total, tc.progress and self.is_main)  # a bar, or a line per window
        self.timer = compile_cache.CompileTimer()  # every compile in the loop (train and eval steps), for compile_s
        self.lrs = learning_rates(config.optimizer, self.total,
                                  param_groups(config, run.objective, self.state.params).trained())

    def run(self) -> dict:
        """Train from the restored step; returns the summary written to ``summary.json``.

        The trackers are closed and the workdir lock released when it returns or raises.
        """
        try:
            self._begin()
            try:
                # frozen_heap: full GC passes skip the ~300k objects of the imports and the built run (gc_freeze.py)
                with StopSignal() as stop, self.timer, frozen_heap():
                    while self.step < self.total and self.evals.stopped_at is None:
                        data_state, batch = next(self.prefetch)
                        self.state, metrics = self.programs(self.state, batch, self.step)  # the compiled step
                        self.step += 1
                        self.window.add(self.step, metrics)
                        self.progress.update(1)
                        if self.window.closed:  # fetched while this step runs: the devices never wait for the host
                            self._log_window()
                        if self.step % self.log_every == 0 or self.step == self.total:
                            self.window.close()
                        maybe_kill("kill_after_step", self.step)
                        maybe_pause(self.step)
                        evaluating = self.evals.due(self.step)
                        stopping = stop.should_stop(self.step)
                        saving = self._save_due(evaluating, stopping)
                        if self.window.closed and (evaluating or saving):  # in sync anyway; logs before a checkpoint
                            self._log_window()
                        periodic = self.evals.periodic(self.state, self.step)  # config.evals
                        if evaluating:
                            saving = self._evaluate(periodic) or saving  # True: early stopping stops here
                        elif periodic and self.is_main:
                            self.wd.log({"step": self.step, **periodic})
                        if saving:
                            self._save(data_state)
                        if self.evals.stopped_at is not None:
                            self._log_early_stop()
                            break
                        if stopping and self.step < self.total:
                            self._preempted(stop)
            finally:
                self.progress.close()
                self.prefetch.close()
                self.ckpts.close()
            return self._summary()
        finally:
            if self.wd.trackers is not None:
                self.wd.trackers.close()
                self.wd.trackers = None
            if self.prepared.lock is not None:
                self.prepared.lock.release()
                self.prepared.lock = None

    def _log_window(self, n: int | None = None) -> None:
        """Log the closed window (or the first ``n`` pending steps); its rates go to the progress and trackers."""
        self.last_train = self.window.log(self.state, n)
        steps_per_s = self.progress.window(self.last_train)
        if self.wd.trackers is not None:  # TensorBoard & co.: the rates, beside the logged record
            step = self.last_train["step"]
            self.wd.trackers.scalars(step, {"train/steps_per_s": steps_per_s, **self.lrs(step)})

    def _save_due(self, evaluating: bool, stopping: bool) -> bool:
        """Every ``checkpoint_every`` steps, the last, a preemption; every eval when checkpoints are ranked by a
        val metric (``config.train.best_metric``: the best val step is always a checkpoint)."""
        step = self.step
        return step % self.ckpt_every == 0 or step == self.total or stopping or \
            bool(evaluating and self.evals.has_val and self.evals.best_metric)

    def _evaluate(self, periodic: dict) -> bool:
        """Evaluate and log this step (with ``periodic``: ``config.evals``); True when early stopping stops here
        (the partial metrics window is logged and the test split evaluated too, as at the last step)."""
        evals = self.evals
        self.last_eval = evals.run(self.state, self.step, evals.prefixes(self.step))
        self.last_eval.update(periodic)
        stops = evals.stops_here(self.last_eval, self.step)
        if stops:
            if self.window.pending:  # the partial window ends here, as the last one does at the last step
                self._log_window(len(self.window.pending))
            self.last_eval.update(evals.run(self.state, self.step, ("test",)))
        evals.log(self.last_eval)
        return stops

    def _save(self, data_state) -> None:
        """Checkpoint this step with the data iterator's state and the metrics not logged yet."""
        pending = self.window.for_checkpoint()
        self.ckpts.save(self.step, self.strategy.to_global(self.state),
                        {"iterator": data_state, "pending_metrics": pending},
                        best_record(self.last_eval, self.step, self.evals.best_metric))
        maybe_kill("kill_during_save", self.step)

    def _log_early_stop(self) -> None:
        es = self.prepared.config.train.early_stopping
        log.info("early stopping at step %d/%d: %s has not improved by more than %g for %d evals "
                 "(config.train.early_stopping)", self.step, self.total, self.evals.es_metric, es.min_delta,
                 es.patience)

    def _preempted(self, stop: StopSignal) -> None:
        """SIGTERM/SIGINT or a preemption notice: this step's checkpoint is written; stop with Preempted."""
        self.ckpts.wait()
        name = signal.Signals(stop.signum).name if stop.signum else "preemption notice"
        raise Preempted(f"stopped by {name} after step {self.step}/{self.total}; checkpoint saved to "
                        f"{self.wd.checkpoints / str(self.step)}; rerun the same command to resume",
                        stop.signum or signal.SIGTERM)

    def _summary(self) -> dict:
        """The final eval (of the restored state, for a run resumed after its end) and ``summary.json``."""
        evals, config = self.evals, self.prepared.config
        if self.last_eval is None:  # resumed a finished (or early-stopped) run: evaluate the restored state
            with self.timer:
                self.last_eval = evals.run(self.state, self.step, evals.prefixes(self.step, final=True))
            self.last_eval.update(evals.periodic(self.state, self.step))
            evals.log(self.last_eval)
        compile_s = max(self.programs.compile_s or 0.0, self.timer.seconds)
        summary = {"steps": self.step, "wall_s": time.time() - self.prepared.t_start,
                   "train_s": time.time() - self.t_loop - compile_s, "compile_s": compile_s,
                   "skipped_steps": int(self.strategy.fetch_state(self.state.skipped)),
                   **{k: v for k, v in self.last_train.items() if k != "step"},
                   **{k: v for k, v in self.last_eval.items() if k != "step"}}
        if evals.stopped_at is not None and evals.stopped_at < self.total:
            summary["stopped_early"] = evals.stopped_at
        if config.data.mock_examples is not None:  # tfds mock examples, not the data: never a result
            summary["mock_data"] = config.data.mock_examples
        best = evals.best()
        if best is not None:  # the checkpoint retention keeps (config.train.best_metric)
            summary["best_step"], summary[f"best/{evals.best_metric}"] = best
        summary = lp_ft.with_probe_summary(summary, self.prepared.probe_summary)  # 'lp_ft': the probe's as lp/*
        if self.is_main:
            self.wd.write_summary(summary)
        return summary
