"""Goal 1, no overhead: tl_jax's whole training loop vs a hand-written jit loop over the same arrays.

The run is the demo's source stage (mnist5k, CNN, Adam, batch 64, random crops)
with the demo's cadence (metrics every 50 steps, a checkpoint every 300), run
for 350 steps. The two loops run interleaved in one process
(:func:`interleaved_loop`): from step 50 on, every ``CHUNK`` steps of
tl_jax's loop are followed by ``CHUNK`` hand-written steps, each side timed on
its own clock. This VM's speed swings by +-10 % within seconds, so loops timed
one after the other (as this benchmark did first) scattered by +-5-9 % per
round, more than the overhead being measured; interleaved pieces a quarter
second long see the same load. Each round is a fresh process; steps/s are
pooled over the rounds.
"""
from __future__ import annotations

import functools
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import ROOT

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")
LOG_EVERY = 50
STEPS_PER_CALL = 10  # steps_per_call: steps in one compiled call
CHUNK = 10  # steps per interleaved piece: ~0.25 s, the time scale of this VM's load swings


def demo_source_config(data_dir: str, steps: int, **overrides: Any):
    """The demo's source stage with ``steps`` steps (its cadence: metrics every 50, a checkpoint every 300)."""
    from tl_jax import config as config_lib

    config = config_lib.load_config(f"{DEMO}:stage=source")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", f"train.steps={steps}",
                                        f"train.log_every={LOG_EVERY}", "train.checkpoint_every=300",
                                        "train.eval_every=0", "train.progress=false"])
    for key, value in overrides.items():
        config_lib.set_value(config, key, value)
    return config


class HandWritten:
    """The 30-line baseline: flax model, optax Adam, one jitted step, no metrics fetched.

    ``hand.dispatch()`` queues one step on the next of the pre-made device
    batches (in turn) and returns its loss; ``hand(n)`` runs ``n`` steps, blocks
    on the last and returns the seconds taken. ``model``, ``tx`` and
    ``init_params`` (a copy of the initial params) are there to build other
    steps on the same footing.
    """

    def __init__(self, batches: list[dict]):
        import jax
        import jax.numpy as jnp
        import optax

        from tl_jax.models import get_model

        self.model = model = get_model("cnn", 10)
        params = model.init(jax.random.PRNGKey(0), batches[0]["image"][:1])["params"]
        self.init_params = jax.tree.map(jnp.copy, params)
        self.tx = tx = optax.adam(1e-3)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, image, label):
            def loss_fn(p):
                logits = model.apply({"params": p}, image, train=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step, self.batches, self.i = step, batches, 0
        self.state = (params, tx.init(params))
        self(2)  # compiled and warm

    def dispatch(self) -> Any:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        params, opt_state, loss = self.step(*self.state, b["image"], b["label"])
        self.state = (params, opt_state)
        return loss

    def __call__(self, n: int) -> float:
        import jax

        t0 = time.perf_counter()
        loss = None
        for _ in range(n):
            loss = self.dispatch()
        jax.block_until_ready(loss)
        return time.perf_counter() - t0


def interleaved_loop(config: Any, workdir: str, hand: HandWritten, chunk: int = CHUNK) -> dict:
    """``tl_jax.train.loop.train`` with ``hand`` run in between, ``chunk`` steps at a time, from step ``LOG_EVERY``.

    The loop's compiled step is wrapped: after every ``chunk``-th step it
    waits for that step (on tl_jax's clock), runs ``chunk`` hand-written steps
    (on the hand-written clock), and the loop goes on. So both clocks sample
    the machine's load alike, a quarter second apart. While one of tl_jax's
    asynchronous checkpoint saves is still being written, no hand-written
    piece runs (the save's threads stay on tl_jax's clock). Returns the steps
    and seconds of each side, and each ``(tl_jax steps, tl_jax s, hand s,
    saves started)`` of neighbouring pieces.
    """
    import jax

    from tl_jax.parallel import strategy as strategy_lib
    from tl_jax.train import loop as loop_lib
    from tl_jax.train.checkpoint import Checkpoints

    count, mark, saves = [0], [None], [0]
    out: dict[str, Any] = {"tl_jax_steps": 0, "tl_jax_s": 0.0, "hand_steps": 0, "hand_s": 0.0, "pairs": []}
    managers: list = []
    compile_, save = strategy_lib.JitStrategy.compile, Checkpoints.save

    def wrapped_compile(self, fn, state, batch):
        compiled = compile_(self, fn, state, batch)

        def step(*args):
            res = compiled(*args)
            count[0] += 1
            if count[0] % chunk or count[0] < LOG_EVERY or any(m.is_saving_in_progress() for m in managers):
                return res
            jax.block_until_ready(res)
            now = time.perf_counter()
            hand_s = hand(chunk)
            if mark[0] is not None:  # a tl_jax span (longer than ``chunk`` if a save was in flight), then hand's
                out["tl_jax_s"] += now - mark[0][0]
                out["tl_jax_steps"] += count[0] - mark[0][1]
                out["hand_s"] += hand_s
                out["hand_steps"] += chunk
                out["pairs"].append((count[0] - mark[0][1], now - mark[0][0], hand_s, saves[0] - mark[0][2]))
            mark[0] = (time.perf_counter(), count[0], saves[0])
            return res

        return step

    def recorded_save(self, *args, **kwargs):
        managers.append(self.manager)
        saves[0] += 1
        return save(self, *args, **kwargs)

    strategy_lib.JitStrategy.compile, Checkpoints.save = wrapped_compile, recorded_save
    try:
        loop_lib.train(config, workdir, overwrite=True)
    finally:
        strategy_lib.JitStrategy.compile, Checkpoints.save = compile_, save
    return out


def device_batches(config: Any, n: int) -> list[dict]:
    """The first ``n`` batches the tl_jax pipeline yields for ``config``, on the device."""
    import grain
    import jax

    from tl_jax.data import build_preprocess, load_split, train_dataset

    dc = config.data
    split = load_split(dc.name, dc.train_split, dc.data_dir)
    ds = train_dataset(split, build_preprocess(list(dc.train_pp)), batch_size=dc.batch_size, seed=config.seed,
                       cache=True)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    return [jax.device_put(next(it)) for _ in range(n)]


def step_only(batch: dict, rounds: int) -> dict:
    """Seconds per step of the hand-written step and of tl_jax's ``make_train_step`` on one device batch.

    tl_jax's step also computes what it logs: accuracy, the finiteness check
    and the step counter. ``tl_jax``: the program the loop runs on most steps
    (``grad_norm=False``, ``train.grad_norm_program='separate'``);
    ``tl_jax_logged_step``: the one it runs on the logged steps, with the
    gradient norm (also every step under ``nan_policy='skip'``);
    ``tl_jax_cond``: one program for every step, the norm in a ``lax.cond``
    (``train.grad_norm_program='cond'``).
    """
    import jax
    import jax.numpy as jnp

    from benchmarks.common import interleaved
    from tl_jax import config as config_lib
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step

    hand = HandWritten([batch])
    model, tx, params = hand.model, hand.tx, hand.init_params
    loss = Objective(config_lib.base_config(), model).loss
    copy = functools.partial(jax.tree.map, jnp.copy)
    fns = {"hand_written": hand.dispatch}
    for name, flag in (("tl_jax", False), ("tl_jax_logged_step", True), ("tl_jax_cond", None)):
        step = jax.jit(make_train_step(loss, tx, grad_norm_every=LOG_EVERY, grad_norm=flag), donate_argnums=0)
        state = [TrainState(step=jnp.zeros((), jnp.int32), params=copy(params), batch_stats={},
                            opt_state=tx.init(params), rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32),
                            aux={})]

        def run(step=step, state=state):
            state[0], metrics = step(state[0], batch)
            return metrics["train/loss"]

        fns[name] = run
    return interleaved(fns, rounds=rounds, reps=10, sync=jax.block_until_ready)


def steps_per_call(batches: list[dict], rounds: int) -> dict:
    """Milliseconds per step of the hand-written step dispatched once per step vs ``len(batches)`` steps per
    call (Keras' ``steps_per_execution``, a TPU-style host loop): the steps in a ``lax.scan`` over the stacked
    batches, and the same scan unrolled. Interleaved; medians over ``rounds``. Fewer dispatches would take
    the loop's per-step host work off the step's critical path, if XLA:CPU ran the steps as fast in one call.
    """
    import jax
    import jax.numpy as jnp

    hand = HandWritten(batches)
    k = len(batches)
    stacked = {key: jnp.stack([b[key] for b in batches]) for key in ("image", "label")}
    step = hand.step  # jitted: inlined into the scan's program

    def many(params, opt_state, images, labels, unroll):
        def body(carry, batch):
            p, o, loss = step(*carry, *batch)
            return (p, o), loss
        carry, losses = jax.lax.scan(body, (params, opt_state), (images, labels), unroll=unroll)
        return (*carry, losses)

    calls = {name: jax.jit(functools.partial(many, unroll=unroll), donate_argnums=(0, 1))
             for name, unroll in (("scan", 1), ("scan_unrolled", True))}
    states = {name: (jax.tree.map(jnp.copy, hand.init_params), hand.tx.init(hand.init_params)) for name in calls}

    def run(name):
        *state, losses = calls[name](*states[name], stacked["image"], stacked["label"])
        states[name] = tuple(state)
        return losses

    fns = {"one_step_per_call": lambda: hand(k), **{name: functools.partial(run, name) for name in calls}}
    for name in calls:
        jax.block_until_ready(run(name))  # compiled and warm
    out: dict[str, list] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            res = fns[name]()
            if name != "one_step_per_call":
                jax.block_until_ready(res)
            out[name].append((time.perf_counter() - t0) / k)
    return {name: 1000 * float(np.median(v)) for name, v in out.items()}


def host_costs(config: Any, rounds: int) -> dict:
    """Milliseconds of host time per batch of the demo's source stage (cached rows + crop), interleaved.

    ``batch_at_a_time`` vs ``chunked``: :class:`tl_jax.data.shuffle.GatherBatches`
    with ``chunk=1`` vs its default (several batches gathered and cropped in one
    numpy call per op); ``recipes``: what the host makes per batch when the
    step makes the pixels (:class:`tl_jax.data.device_batches.RecipeBatches`:
    row indices and crop offsets); all read by the loop's iterator
    (:func:`tl_jax.data.shuffle.train_iterator`).
    """
    from benchmarks.common import interleaved
    from tl_jax.data import build_preprocess, load_split
    from tl_jax.data import cache as data_cache
    from tl_jax.data.device_batches import RecipeBatches
    from tl_jax.data.shuffle import GatherBatches, train_iterator

    dc = config.data
    split = load_split(dc.name, dc.train_split, dc.data_dir)
    rows, suffix = data_cache.cached_chain(split.source, build_preprocess(list(dc.train_pp)), mode=True,
                                           max_bytes=2**30)

    def dataset(chunk: int | None) -> GatherBatches:
        return GatherBatches(rows.arrays, batch_size=dc.batch_size, seed=0, suffix=suffix, chunk=chunk)

    iters = {"batch_at_a_time": train_iterator(dataset(1)), "chunked": train_iterator(dataset(None)),
             "recipes": train_iterator(RecipeBatches(rows.arrays, batch_size=dc.batch_size, seed=0, suffix=suffix))}
    sec = interleaved({k: (lambda it=it: next(it)) for k, it in iters.items()}, rounds=rounds, reps=64)
    return {k: 1000 * v for k, v in sec.items()}


def fetch_costs(batch: dict, rounds: int) -> dict:
    """Host CPU ms to read one log window (``LOG_EVERY`` steps' metric vectors) while the next step runs.

    The window comes from tl_jax's packed step (:class:`~tl_jax.train.train_metrics.PackedMetrics`, as the
    loop runs it). ``device_get``: ``jax.device_get`` of the window (an asynchronous host copy queued per
    array, then each read); ``fetch``: :func:`tl_jax.train.train_metrics.fetch`, what the loop uses
    (``np.asarray`` of each on CPU devices). Medians of the interleaved rounds, main-thread CPU time.
    """
    import jax
    import jax.numpy as jnp

    from tl_jax import config as config_lib
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step
    from tl_jax.train.train_metrics import PackedMetrics, fetch

    hand = HandWritten([batch])
    tx, params = hand.tx, hand.init_params
    loss = Objective(config_lib.base_config(), hand.model).loss
    step = jax.jit(PackedMetrics(make_train_step(loss, tx, grad_norm=False)), donate_argnums=0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32), aux={})
    ways = {"device_get": jax.device_get, "fetch": fetch}
    out: dict[str, list] = {k: [] for k in ways}
    for r in range(rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            window = []
            for _ in range(LOG_EVERY + 1):  # the window, then the step the loop has queued when it reads it
                state, metrics = step(state, batch)
                window.append(metrics)
            jax.block_until_ready(window[-2])
            t0 = time.thread_time()
            ways[name](window[:-1])
            out[name].append(time.thread_time() - t0)
            jax.block_until_ready(state)
    return {k: 1000 * float(np.median(v)) for k, v in out.items()}


def _configs(data_dir: str, steps: int) -> dict:
    return {"tl_jax": demo_source_config(data_dir, steps),
            "tl_jax_device_batches": demo_source_config(data_dir, steps, **{"data.device_cache": True}),
            "tl_jax_async_checkpoint": demo_source_config(data_dir, steps, **{"train.checkpoint_async": True}),
            "tl_jax_prefetch_thread": demo_source_config(data_dir, steps, **{"data.prefetch": 2})}


def one_round(data_dir: str, steps: int, r: int = 0) -> dict:
    """``tl_jax`` and one other variant (in turn over ``r``), each interleaved with the hand-written loop
    (a worker's job): steps and seconds of both sides per variant; which goes first alternates too."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="tl_jax_bench_overhead_"))
    configs = _configs(data_dir, steps)
    others = [k for k in configs if k != "tl_jax"]
    names = ["tl_jax", others[(r // 2) % len(others)]]  # quick (2 rounds): the first variant only
    names = names[::-1] if r % 2 else names
    hand = HandWritten(device_batches(configs["tl_jax"], 40))
    return {name: interleaved_loop(configs[name], str(root / name), hand) for name in names}


def steps_and_host(data_dir: str, quick: bool) -> dict:
    """The step-only and host-cost figures (a worker's job)."""
    config = _configs(data_dir, 350)["tl_jax"]
    batches = device_batches(config, STEPS_PER_CALL)
    batch = batches[0]
    step_s = step_only(batch, 9 if not quick else 3)
    return {"step_only_ms": {k: 1000 * v for k, v in step_s.items()},
            "steps_per_call_ms": steps_per_call(batches, 5 if not quick else 1),
            "host_ms": host_costs(config, 5 if not quick else 2),
            "fetch_ms": fetch_costs(batch, 5 if not quick else 2)}


def pooled(rounds: list[dict]) -> dict:
    """Per variant, over the rounds that ran it: steps/s of both sides pooled (all steps / all seconds) and
    their ratio; each round's own ratio; the median ratio of neighbouring pieces without a checkpoint
    (robust to this VM's load swings, blind to the checkpoint) and the checkpoint's extra time (its span's
    time minus its steps at the round's median tl_jax piece time)."""
    out = {}
    names = list(dict.fromkeys(k for r in rounds for k in r))
    for name in names:
        runs = [r[name] for r in rounds if name in r]
        sides = {k: sum(x[k] for x in runs) for k in ("tl_jax_steps", "tl_jax_s", "hand_steps", "hand_s")}
        tl, hand = sides["tl_jax_steps"] / sides["tl_jax_s"], sides["hand_steps"] / sides["hand_s"]
        per = [(x["tl_jax_steps"] / x["tl_jax_s"]) / (x["hand_steps"] / x["hand_s"]) for x in runs]
        steady, extra_ms = [], []
        for x in runs:
            pairs = np.asarray(x["pairs"], float).reshape(-1, 4)
            plain = pairs[(pairs[:, 0] == CHUNK) & (pairs[:, 3] == 0)]
            steady += list(plain[:, 2] / plain[:, 1])
            step_s = float(np.median(plain[:, 1])) / CHUNK if len(plain) else float("nan")
            extra_ms += [1000 * (t - n * step_s) / k for n, t, _, k in pairs[pairs[:, 3] > 0]]
        out[name] = {"tl_jax_steps_per_s": tl, "hand_steps_per_s": hand, "ratio": tl / hand,
                     "round_ratios": per, "median_round_ratio": float(np.median(per)), "rounds": len(runs),
                     "steady_pair_ratio": float(np.median(steady)) if steady else None,
                     "checkpoint_extra_ms": float(np.mean(extra_ms)) if extra_ms else None,
                     "tl_jax_steps": sides["tl_jax_steps"], "hand_steps": sides["hand_steps"]}
    return out


def run(data_dir: str, quick: bool = False) -> dict:
    """Rounds of tl_jax and one variant (batches made in the step, async checkpoints, a prefetch thread; in turn), each
    interleaved with the hand-written loop, each round in a fresh process; ratios pooled over the rounds.

    Fresh processes: in one long-lived bench process the same compiled step was once seen to run 15 %
    slower than in fresh ones in every round.
    """
    from benchmarks.common import run_worker

    steps = 350
    rounds = 2 if quick else 6
    per_round = []
    for r in range(rounds):
        res = run_worker("benchmarks.overhead_bench", ["--worker", "round", data_dir, "--round", str(r)])
        if "error" in res:
            return res
        per_round.append(res)
    extra = run_worker("benchmarks.overhead_bench", ["--worker", "steps", data_dir] + (["--quick"] if quick else []))
    if "error" in extra:
        return extra
    step_ms = extra["step_only_ms"]
    variants = pooled(per_round)
    ckpt = run_worker("benchmarks.checkpoint_bench")  # what one save costs, per array and per byte
    return {"variants": variants, "per_round": per_round, "steps": steps, "chunk": CHUNK, "rounds": rounds, **extra,
            "checkpoint_cost": ckpt,
            "step_only_ratio": step_ms["hand_written"] / step_ms["tl_jax"],
            "step_only_ratio_logged_step": step_ms["hand_written"] / step_ms["tl_jax_logged_step"],
            "step_only_ratio_cond": step_ms["hand_written"] / step_ms["tl_jax_cond"],
            "ratio": variants["tl_jax"]["ratio"], "ratio_median_round": variants["tl_jax"]["median_round_ratio"],
            "ratio_device_batches": variants.get("tl_jax_device_batches", {}).get("ratio"),
            "ratio_prefetch_thread": variants.get("tl_jax_prefetch_thread", {}).get("ratio"),
            "ratio_async_checkpoint": variants.get("tl_jax_async_checkpoint", {}).get("ratio"),
            "data_prefetch_auto": _auto_prefetch()}


def _auto_prefetch() -> int:
    from tl_jax.train.prefetch import auto_size

    return auto_size("auto")


if __name__ == "__main__":
    import argparse
    import logging

    import tl_jax  # noqa: F401  (tl_jax's XLA:CPU defaults, before any backend starts)
    from benchmarks.common import emit

    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["round", "steps"], default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("data_dir", nargs="?", default="")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = a.data_dir or tempfile.mkdtemp()
    if a.worker == "round":
        emit(one_round(data, 350, r=a.round))
    elif a.worker == "steps":
        emit(steps_and_host(data, a.quick))
    else:
        emit(run(data, quick=True))
