"""What one training step of a config costs: trainable params, optimizer-state bytes, step time, peak memory.

The studies that compare fine-tuning methods (``experiments/peft.py``) report these beside accuracy.
:func:`footprint` builds the run exactly as ``train`` does (:func:`tl_jax.train.loop.prepare_run` in a
scratch workdir: the model chain with LoRA, ``init_from``, the param rules, the optimizer), then:

* ``params`` / ``trainable_params``: the model's params and those the param rules train (multiplier not
  ``None``), counted from the run's :class:`~tl_jax.params.param_rules.ParamGroups`;
* ``opt_state_bytes``: the bytes of the optimizer state's leaves (frozen groups hold none: ``set_to_zero``);
* ``peak_bytes``: XLA's buffer assignment for the compiled train step (``Compiled.memory_analysis()``):
  arguments + outputs - donated aliases + temporaries, i.e. the step's live device memory at its peak,
  state included (the same number on CPU and GPU, unlike a process's RSS which holds the heap too);
* ``step_ms``: the median wall time of ``repeats`` calls of the compiled step on one batch (after the
  compiling call), each waited for (``block_until_ready``): compute only, no data loading.

A recipe with its own phases (``config.recipe.name='lp_ft'``) is measured as its fine-tune phase (the
recipe name cleared): its probe phase is a head-only run.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax.train.build import param_groups
from tl_jax.train.loop import prepare_run
from tl_jax.train.programs import StepPrograms


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree's array leaves (``size * itemsize``; other leaves count 0)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def peak_bytes(compiled: Any) -> int | None:
    """Arguments + outputs - aliases + temporaries of a ``jax.stages.Compiled`` (None without an analysis)."""
    m = compiled.memory_analysis() if hasattr(compiled, "memory_analysis") else None  # pmap: a plain function
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def footprint(config: ml_collections.ConfigDict, *, repeats: int = 10) -> dict:
    """The costs above for ``config`` (module doc); builds the run in a temporary workdir, trains nothing.

    Returns ``{"params", "trainable_params", "opt_state_bytes", "peak_bytes", "step_ms"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    config = copy.deepcopy(config)
    config.recipe.name = ""  # LP-FT: its fine-tune phase (module doc)
    config.train.progress = False
    with tempfile.TemporaryDirectory(prefix="tl_jax_footprint_") as workdir:
        run = prepare_run(config, workdir)
        try:
            state = run.strategy.to_device(run.state)
            groups = param_groups(config, run.objective, state.params)
            counts = [(int(np.prod(x.shape)), bool(t)) for x, t in
                      zip(jax.tree.leaves(state.params), jax.tree.leaves(groups.trainable()))]
            opt_bytes = tree_bytes(state.opt_state)
            programs = StepPrograms(config, run.objective, run.tx, state.params, run.strategy)
            batch = run.strategy.loop_batch(next(run.data_iter))
            state, _ = programs(state, batch, 0)  # compiles every program, then runs step 1
            flag = None if None in programs.steps else False
            compiled = programs.steps[flag]
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - t0)
        finally:
            run.ckpts.close()
            if run.lock is not None:
                run.lock.release()
    return {"params": sum(n for n, _ in counts), "trainable_params": sum(n for n, t in counts if t),
            "opt_state_bytes": opt_bytes, "peak_bytes": peak_bytes(compiled),
            "step_ms": 1000 * statistics.median(times)}
