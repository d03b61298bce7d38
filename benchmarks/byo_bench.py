"""Your own model and data (issue 19): an NNX model vs its linen twin, in-memory data vs the train step.

* NNX step: the compiled train step of ``cnn_nnx`` (through
  :class:`tl_jax.models.nnx.bridge.NNXModel`) vs ``cnn`` on the same weights and
  batch (28x28x1, batch 128, Adam), interleaved rounds. Goal: <= 1.03x.
* NNX loop: ``train()`` of the demo's source stage with each model (200 steps,
  a checkpoint at the end), its ``train_s`` (compilation excluded), alternating
  runs. Goal: NNX loop speed >= 0.95x linen's.
* In-memory data: batches/s of the grain pipeline over numpy arrays registered
  with :func:`tl_jax.data.register_dataset` (the demo's source preprocessing:
  random crops) vs the linen train step's steps/s on that batch. Goal: >= 5x.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from benchmarks.common import ROOT, interleaved, table

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")


def _steps(batch: dict):
    """Compiled train steps and states of ``cnn`` and ``cnn_nnx`` from the same weights."""
    import jax
    import jax.numpy as jnp
    import optax

    from tl_jax import config as config_lib
    from tl_jax.models import get_model
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step

    config = config_lib.base_config()
    linen = get_model("cnn", 10)
    variables = linen.init(jax.random.PRNGKey(0), batch["image"][:1])
    out = {}
    for name in ("cnn", "cnn_nnx"):
        model = get_model(name, 10)
        if name == "cnn_nnx":
            model.init(jax.random.PRNGKey(0), batch["image"][:1])  # builds the graph; the weights are linen's
        params = jax.tree.map(jnp.array, variables["params"])
        tx = optax.adam(1e-3)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32), aux={})
        fn = make_train_step(Objective(config, model).loss, tx, grad_norm=False)
        out[name] = (jax.jit(fn).lower(state, batch).compile(), state)
    return out


def _loop_config(name: str, data_dir: str, steps: int):
    from tl_jax import config as config_lib

    config = config_lib.load_config(f"{DEMO}:stage=source")
    for key, value in (("data.data_dir", data_dir), ("model.name", name), ("train.steps", steps),
                       ("train.checkpoint_every", steps), ("train.progress", False),
                       ("tracking.tensorboard", False)):
        config_lib.set_value(config, key, value)
    return config


def run(data_dir: str, quick: bool = False) -> dict[str, Any]:
    import jax
    import numpy as np

    from tl_jax.data import build_preprocess, load_split, register_dataset, train_dataset
    from tl_jax.data.shuffle import train_iterator
    from tl_jax.train.loop import train

    split = load_split("mnist5k", "train", data_dir)
    images = np.stack([split.source[i]["image"] for i in range(len(split))])
    labels = split.labels().astype(np.int64)
    batch = {"image": jax.numpy.asarray(images[:128], jax.numpy.float32) / 255.0,
             "label": jax.numpy.asarray(labels[:128], jax.numpy.int32)}

    # 1. the step
    steps = _steps(batch)
    state = {k: s for k, (_, s) in steps.items()}
    times = interleaved({k: (lambda k=k: steps[k][0](state[k], batch)) for k in steps},
                        rounds=3 if quick else 7, reps=10 if quick else 30, sync=jax.block_until_ready)
    step_ratio = times["cnn_nnx"] / times["cnn"]

    # 2. the loop: alternate fresh runs, compare train_s
    loop_steps = 60 if quick else 200
    train_s: dict[str, list[float]] = {"cnn": [], "cnn_nnx": []}
    with tempfile.TemporaryDirectory(prefix="tl_jax_byo_bench_") as tmp:
        for r in range(1 if quick else 3):
            for name in ("cnn", "cnn_nnx"):
                summary = train(_loop_config(name, data_dir, loop_steps), f"{tmp}/{name}_{r}")
                train_s[name].append(summary["train_s"])
    loop_ratio = min(train_s["cnn"]) / min(train_s["cnn_nnx"])  # > 1: NNX faster

    # 3. in-memory data: batches/s vs the step's steps/s (batch 64, random crops of the padded digit)
    register_dataset("bench_in_memory", train={"image": images, "label": labels})
    config = _loop_config("cnn", data_dir, 1)
    pp = build_preprocess(list(config.data.train_pp), where="config.data.train_pp")
    mem = load_split("bench_in_memory", "train")
    it = train_iterator(train_dataset(mem, pp, batch_size=64, seed=0, cache=True))
    next(it)
    n = 200 if quick else 1000
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    batches_per_s = n / (time.perf_counter() - t0)
    small = {k: v[:64] for k, v in batch.items()}
    step64 = _steps(small)["cnn"]
    t64 = interleaved({"cnn": lambda: step64[0](step64[1], small)}, rounds=3, reps=20,
                      sync=jax.block_until_ready)["cnn"]
    data_ratio = batches_per_s * t64

    rows = [["NNX / linen train step time (CNN, 28x28x1, batch 128; goal <= 1.03)", step_ratio],
            ["NNX loop speed / linen loop speed (demo source stage, best train_s; goal >= 0.95)", loop_ratio],
            ["in-memory batches/s / train steps/s (batch 64, random crops; goal >= 5)", data_ratio]]
    md = (table(["figure", "same-run ratio"], rows) + "\n\n"
          f"Step: {1e3 * times['cnn']:.2f} ms linen, {1e3 * times['cnn_nnx']:.2f} ms NNX (best of the interleaved "
          f"rounds). Loop: {loop_steps} steps, train_s linen {', '.join(f'{s:.2f}' for s in train_s['cnn'])}, "
          f"NNX {', '.join(f'{s:.2f}' for s in train_s['cnn_nnx'])} (median "
          f"{statistics.median(train_s['cnn']):.2f} vs {statistics.median(train_s['cnn_nnx']):.2f}). In-memory "
          f"pipeline: {batches_per_s:.0f} batches/s; step {1e3 * t64:.2f} ms at batch 64.")
    return {"step_ratio": step_ratio, "loop_ratio": loop_ratio, "data_ratio": data_ratio, "markdown": md,
            "train_s": train_s, "step_ms": {k: 1e3 * v for k, v in times.items()}}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), quick="--quick" in sys.argv),
                     default=str, indent=1))
