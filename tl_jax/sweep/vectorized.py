"""Vectorised sweeps: N points trained by ONE ``jax.vmap``-ed train step over stacked states.

Each point is prepared like a normal run (:func:`tl_jax.train.loop.prepare_run`:
its own workdir, initial state from its own seed / ``init_from``, its own batch
stream, resumed from its own newest checkpoint). The states are stacked on a
leading axis of size N, and the step of the first point (the *template*) runs
under ``jax.vmap`` with the points' traced hyperparameters
(:mod:`tl_jax.sweep.plan`) as a third, vmapped argument:

* ``hparams["loss"]``: ``{config key: value}`` of the loss weights, read by the
  objective through ``aux["hparams"]`` (:func:`tl_jax.objectives.base.hparam`);
* ``hparams["update_scale"]``: per param ``(lr_i · m_i) / (lr_0 · m_0)``, the
  point's learning rate x rule multiplier over the template's (every optax
  optimizer here is linear in its learning rate, schedules included).

Every point still writes its own ``config.json``, ``metrics.jsonl``,
``summary.json`` and ``checkpoints/`` in the layout of a sequential run (the
optimizer-state groups are renamed back to the point's own labels), so a
point can be resumed either way and reports read it the same. Times in its
``summary.json`` are its share (group time / N), with ``vectorized_points``: N.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.data import eval_batches
from tl_jax.sweep.plan import LR_KEY, RULES_KEY, flat_config, loss_keys, swept_keys
from tl_jax.train import compile_cache
from tl_jax.train.loop import Run
from tl_jax.train.programs import grad_norm_flags, pure_train_step
from tl_jax.train.train_metrics import NonFiniteError, grad_norm_steps, log_window
from tl_jax.train.preemption import Preempted, StopSignal
from tl_jax.train.prefetch import Prefetcher, auto_size
from tl_jax.train.step import make_eval_step
from tl_jax.params import param_rules as rules_lib

log = logging.getLogger("tl_jax")
PyTree = Any


class CannotVectorize(ValueError):
    """These points cannot share one vmapped step (the message says why); run them separately."""


def _rules(run: Run) -> list:
    return run.objective.fixed_rules() + [list(r) for r in run.config.param_rules]


def label_map(run: Run, template: Run) -> dict[str, str]:
    """The point's optimizer-group labels -> the template's (same grouping of params required)."""
    params = run.state.params
    own = rules_lib.flatten_paths(rules_lib.label_tree(params, _rules(run)))
    ref = rules_lib.flatten_paths(rules_lib.label_tree(params, _rules(template)))
    mapping: dict[str, str] = {}
    for path, label in own.items():
        if mapping.setdefault(label, ref[path]) != ref[path]:
            raise CannotVectorize(f"config.param_rules group the params differently ({path})")
    if len(set(mapping.values())) != len(mapping):
        raise CannotVectorize("config.param_rules group the params differently")
    return mapping


def relabel(state: Any, mapping: dict[str, str]) -> Any:
    """Rename the ``optax.partition`` groups of ``state.opt_state`` (identity maps are free)."""
    opt = state.opt_state
    if all(k == v for k, v in mapping.items()) or not isinstance(getattr(opt, "inner_states", None), dict):
        return state
    return state.replace(opt_state=opt._replace(inner_states={mapping[k]: v for k, v in opt.inner_states.items()}))


def point_hparams(run: Run, template: Run, keys: list[str]) -> dict:
    """The traced inputs of one point: ``{"loss": {...}, "update_scale": tree | None}``."""
    flat = flat_config(run.config)
    hp: dict = {"loss": {k: jnp.asarray(flat[k], jnp.float32) for k in keys if k in loss_keys(run.config)}}
    hp["update_scale"] = None
    if LR_KEY in keys or RULES_KEY in keys:
        params = run.state.params
        mine = rules_lib.match_rules(params, _rules(run))
        ref = rules_lib.match_rules(params, _rules(template))
        lr, lr0 = run.config.optimizer.learning_rate, template.config.optimizer.learning_rate
        factors = []
        for path, m0 in ref.items():
            m = mine[path]
            if (m is None) != (m0 is None) or (m0 == 0 and m != 0):
                raise CannotVectorize(f"config.param_rules: {path} is frozen or at lr x0 in some points only")
            factors.append(jnp.float32(1.0 if m0 is None or m0 == 0 else (lr * m) / (lr0 * m0)))
        hp["update_scale"] = jax.tree.unflatten(jax.tree.structure(params), factors)
    return hp


def _stack(trees: list[PyTree], what: str) -> PyTree:
    ref = jax.tree.structure(trees[0])
    shapes = [(np.shape(x), np.dtype(x.dtype)) for x in jax.tree.leaves(trees[0])]
    for t in trees[1:]:
        if jax.tree.structure(t) != ref or [(np.shape(x), np.dtype(x.dtype)) for x in jax.tree.leaves(t)] != shapes:
            raise CannotVectorize(f"the points' {what} differ in structure or shapes")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class StackedIterator:
    """The points' data iterators in lock step: ``{key: [N, B, ...]}``; state = list of their states."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __iter__(self) -> "StackedIterator":
        return self

    def __next__(self) -> dict:
        batches = [next(it) for it in self.iterators]
        return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}

    def get_state(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_state(self, states: list) -> None:
        for it, s in zip(self.iterators, states):
            it.set_state(s)


class _PointView:
    """Point ``i`` of the stacked state, as much as :func:`~tl_jax.train.train_metrics.log_window` reads."""

    def __init__(self, state: Any, i: int):
        self._state, self._i = state, i

    @property
    def params(self) -> PyTree:
        return jax.tree.map(lambda x: x[self._i], self._state.params)


class VectorizedGroup:
    """N prepared runs (same structure, see :mod:`tl_jax.sweep.plan`) trained as one vmapped step."""

    def __init__(self, runs: list[Run]):
        if len({r.step0 for r in runs}) > 1:
            raise CannotVectorize(f"the points resume from different steps {sorted({r.step0 for r in runs})}")
        self.runs = runs
        self.template = t = runs[0]
        keys = swept_keys([r.config for r in runs])
        self.maps = [label_map(r, t) for r in runs]
        self.hparams = _stack([point_hparams(r, t, keys) for r in runs], "hyperparameters")
        self.state = _stack([relabel(r.state, m) for r, m in zip(runs, self.maps)], "train states")
        self.step = jax.jit(jax.vmap(pure_train_step(t.config, t.objective, t.tx, t.state.params)), donate_argnums=0)
        self.eval = jax.jit(jax.vmap(make_eval_step(t.objective), in_axes=(0, None)))
        self.data = StackedIterator([r.data_iter for r in runs])
        self.compiled = None
        self.compile_s = 0.0

    def compile(self, batch: dict, state: Any = None) -> float:
        """AOT-compile the vmapped step for ``batch``; returns the seconds (kept for the summaries)."""
        with compile_cache.CompileTimer() as ct:
            self.compiled = self.step.lower(self.state if state is None else state, batch, self.hparams).compile()
        self.compile_s += ct.seconds
        return ct.seconds

    def probe(self, steps: int = 3) -> tuple[float, float]:
        """``(compile_s, seconds per step)`` of the vmapped step; data and state are left untouched."""
        saved = self.data.get_state()
        batch = jax.device_put(next(self.data))
        self.data.set_state(saved)
        compile_s = self.compile(batch)
        state = jax.tree.map(jnp.copy, self.state)
        return compile_s, _seconds_per_step(lambda s: self.compiled(s, batch, self.hparams), state, steps)

    def evaluate(self, state: Any) -> list[dict]:
        """Per point ``{metric: Σ sums / Σ count}`` over the whole test split (like the loop's)."""
        t = self.template
        sums = None
        for batch in eval_batches(t.test_split, t.eval_pp, batch_size=t.config.data.eval_batch_size):
            out = self.eval(state, jax.device_put(batch))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        res = []
        for i in range(len(self.runs)):
            n = max(float(sums["count"][i]), 1.0)
            res.append({k: float(v[i]) / n for k, v in sums.items() if k != "count"})
        return res

    def point_state(self, state: Any, i: int) -> Any:
        """Point ``i``'s state in its own (sequential) layout, for its checkpoint."""
        inverse = {v: k for k, v in self.maps[i].items()}
        return relabel(jax.tree.map(lambda x: x[i], state), inverse)

    def run(self) -> list[dict]:
        """Train every point to ``config.train.steps``; returns their summaries (also written)."""
        t, n = self.template, len(self.runs)
        tc = t.config.train
        step, total = t.step0, tc.steps
        precompiled_s = self.compile_s  # a probe's compile, before this loop
        restored = [[(s, m) for s, m in (r.pending or [])] for r in self.runs]
        pending: list = []
        last_train: list[dict] = [{} for _ in self.runs]
        last_eval: list[dict | None] = [None] * n
        state = self.state
        self.state = None  # donated to the step
        prefetch = Prefetcher(self.data, jax.device_put, size=auto_size(t.config.data.prefetch))
        t_loop = time.time()
        timer = compile_cache.CompileTimer()

        def run_eval(state: Any, step: int) -> None:
            for i, (r, res) in enumerate(zip(self.runs, self.evaluate(state))):
                last_eval[i] = {"step": step, **{f"test/{k}": v for k, v in res.items()}}
                r.wd.log(last_eval[i])
            log.info("step %d: test/accuracy %s", step,
                     " ".join(f"{e.get('test/accuracy', float('nan')):.4f}" for e in last_eval))

        def host_windows() -> list[list]:
            host = jax.device_get([m for _, m in pending])
            return [restored[i] + [(s, {k: v[i] for k, v in m.items()}) for (s, _), m in zip(pending, host)]
                    for i in range(n)]

        try:
            with StopSignal() as stop, timer:
                while step < total:
                    data_states, batch = next(prefetch)
                    if self.compiled is None:
                        self.compile(batch, state)
                    state, metrics = self.compiled(state, batch, self.hparams)
                    step += 1
                    pending.append((step, metrics))
                    if step % tc.log_every == 0 or step == total:
                        for i, (r, window) in enumerate(zip(self.runs, host_windows())):
                            try:
                                last_train[i] = log_window(window, r.wd, True, tc.nan_policy, _PointView(state, i),
                                                           norm_steps=grad_norm_steps(t.config))
                            except NonFiniteError as e:
                                raise NonFiniteError(f"{r.wd.path.name}: {e}") from None
                        pending, restored = [], [[] for _ in self.runs]
                    if (tc.eval_every and step % tc.eval_every == 0) or step == total:
                        run_eval(state, step)
                    stopping = stop.should_stop(step)
                    if step % tc.checkpoint_every == 0 or step == total or stopping:
                        windows = host_windows()
                        for i, r in enumerate(self.runs):
                            host_pending = [[s, {k: float(v) for k, v in m.items()}] for s, m in windows[i]]
                            best = last_eval[i] if last_eval[i] and last_eval[i]["step"] == step else None
                            metric = tc.best_metric
                            r.ckpts.save(step, self.point_state(state, i),
                                         {"iterator": data_states[i], "pending_metrics": host_pending},
                                         {metric: best[metric]} if best and metric in best else None)
                    if stopping and step < total:
                        for r in self.runs:
                            r.ckpts.wait()
                        name = signal.Signals(stop.signum).name if stop.signum else "preemption notice"
                        raise Preempted(f"stopped by {name} after step {step}/{total}; checkpoints saved; "
                                        f"rerun the same sweep command to resume", stop.signum or signal.SIGTERM)
            if last_eval[0] is None:  # resumed finished points: evaluate the restored states
                run_eval(state, step)
        finally:
            prefetch.close()
            for r in self.runs:
                r.ckpts.close()
        compile_s = precompiled_s + timer.seconds
        wall = time.time() - min(r.t_start for r in self.runs)
        train_s = time.time() - t_loop - timer.seconds
        summaries = []
        for i, r in enumerate(self.runs):
            s = {"steps": step, "wall_s": wall / n, "train_s": train_s / n, "compile_s": compile_s / n,
                 "skipped_steps": int(np.asarray(state.skipped[i])), "vectorized_points": n,
                 **{k: v for k, v in last_train[i].items() if k != "step"},
                 **{k: v for k, v in last_eval[i].items() if k != "step"}}
            r.wd.write_summary(s)
            summaries.append(s)
        return summaries


def probe_sequential(run: Run, steps: int = 3) -> tuple[float, float]:
    """``(compile_s, seconds per step)`` of ``run``'s own (sequential) step; its data and state are untouched."""
    saved = run.data_iter.get_state()
    host = next(run.data_iter)
    run.data_iter.set_state(saved)
    strategy = run.strategy
    batch = strategy.put_batch(host)
    state = strategy.to_device(jax.tree.map(jnp.copy, run.state))
    fns = {}
    with compile_cache.CompileTimer() as ct:  # every program the loop compiles (grad_norm_flags)
        for flag in grad_norm_flags(run.config):
            fn = strategy.train_step(pure_train_step(run.config, run.objective, run.tx, run.state.params,
                                                     strategy.axis_name, grad_norm=flag))
            fns[flag] = strategy.compile(fn, state, batch)
    fn = next(iter(fns.values()))  # the program of most steps
    return ct.seconds, _seconds_per_step(lambda s: fn(s, batch), state, steps)


def _seconds_per_step(step: Any, state: Any, steps: int) -> float:
    """Mean wall seconds of ``steps`` calls ``state, m = step(state)``, after one untimed call."""
    state, m = step(state)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / steps
