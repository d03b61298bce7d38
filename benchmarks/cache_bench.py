"""Goals 3 and 4: the feature cache per epoch, and the input pipeline's throughput vs the train step's.

Goal 3 times one epoch of optdigits' training split (the demo's target
domain, 28x28x1 after its preprocessing, batch 32) for a full fine-tune, a
linear probe on images (frozen backbone: forward pass only) and the linear
probe on cached features, each fetching its batches from its tl_jax pipeline;
the one-time feature extraction is reported apart. Goal 4 times the demo's two
pipelines (source stage: random crops per example; target stage: 10 shots,
deterministic) against the full fine-tune step on the same batch shape.
"""
from __future__ import annotations

import time
from typing import Any

from benchmarks.common import ROOT

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")
PROBE = [["backbone/.*", None], [".*", 1.0]]
FINETUNE = [[".*", 1.0]]


def _config(stage: str, data_dir: str, shots: int = 0):
    from tl_jax import config as config_lib

    config = config_lib.load_config(f"{DEMO}:stage={stage},shots={shots}")
    config_lib.set_value(config, "data.data_dir", data_dir)
    return config


def _step(config: Any, rules: list, sample: dict, objective: Any = None):
    """A jitted tl_jax train step (Adam, ``rules``) and a fresh state for ``sample``'s shapes."""
    import jax
    import jax.numpy as jnp
    import optax

    from tl_jax.models import get_model
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step
    from tl_jax.params import param_rules as rules_lib

    model = get_model("cnn", 10)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    objective = objective or Objective(config, model)
    tx = rules_lib.build_optimizer(params, rules, lambda m: optax.adam(1e-3 * m))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32), aux={})
    fn = make_train_step(objective.loss, tx, trainable=rules_lib.trainable_mask(params, rules))
    compiled = jax.jit(fn, donate_argnums=0).lower(state, jax.device_put(sample)).compile()
    return compiled, state, model, params


def _epoch(step: Any, state: Any, iterator: Any, steps: int) -> tuple[float, Any]:
    import jax

    t0 = time.perf_counter()
    metrics = None
    for _ in range(steps):
        state, metrics = step(state, jax.device_put(next(iterator)))
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0, state


def feature_cache(data_dir: str, rounds: int) -> dict:
    """Seconds per epoch of full fine-tuning, the uncached probe and the cached probe."""
    from tl_jax.data import build_preprocess, load_split, train_dataset
    from tl_jax.data import cache as data_cache
    from tl_jax.data.shuffle import train_iterator
    from tl_jax.train import feature_cache as fc

    config = _config("target", data_dir)
    dc = config.data
    split = load_split(dc.name, dc.train_split, dc.data_dir)
    pp = build_preprocess(list(dc.train_pp))
    batch = dc.batch_size
    steps = len(split) // batch
    images = train_iterator(train_dataset(split, pp, batch_size=batch, seed=0, cache=True))
    sample = next(images)
    ft_step, ft_state, model, params = _step(config, FINETUNE, sample)
    pr_step, pr_state, _, _ = _step(config, PROBE, sample)
    t0 = time.perf_counter()
    rows = data_cache.materialize(list(split.source[i] for i in range(len(split))), pp, max_bytes=2**30)
    feats = fc.compute_features(model, params, {}, rows.arrays["image"], dc.eval_batch_size)
    extract_s = time.perf_counter() - t0
    feature_ds = data_cache.array_dataset({fc.FEATURES: feats, "label": rows.arrays["label"]}, batch_size=batch,
                                          seed=0)
    features = train_iterator(feature_ds)
    cached_obj = fc.CachedFeaturesObjective(config, model)
    ca_step, ca_state, _, _ = _step(config, PROBE, next(iter(feature_ds.slice(slice(0, 1)))), cached_obj)
    best = {"finetune": float("inf"), "probe_images": float("inf"), "probe_cached_features": float("inf")}
    for _ in range(rounds):
        t, ft_state = _epoch(ft_step, ft_state, images, steps)
        best["finetune"] = min(best["finetune"], t)
        t, pr_state = _epoch(pr_step, pr_state, images, steps)
        best["probe_images"] = min(best["probe_images"], t)
        t, ca_state = _epoch(ca_step, ca_state, features, steps)
        best["probe_cached_features"] = min(best["probe_cached_features"], t)
    return {"epoch_s": best, "examples": len(split), "steps_per_epoch": steps, "extract_s": extract_s,
            "speedup_cached_vs_finetune": best["finetune"] / best["probe_cached_features"],
            "speedup_probe_images_vs_finetune": best["finetune"] / best["probe_images"],
            "extract_in_finetune_epochs": extract_s / best["finetune"]}


def pipeline(data_dir: str, rounds: int) -> dict:
    """Batches/s of the demo's pipelines (cached and not) vs steps/s of the fine-tune step."""
    import jax

    from tl_jax.data import build_preprocess, load_split, sample_shots, train_dataset
    from tl_jax.data.shuffle import read_threads, train_iterator

    out: dict[str, Any] = {"read_threads": read_threads()}
    for stage, shots in (("source", 0), ("target", 10)):
        config = _config(stage, data_dir, shots)
        dc = config.data
        split = load_split(dc.name, dc.train_split, dc.data_dir)
        idx = sample_shots(split.labels(), dc.shots, dc.shots_seed) if dc.shots else None
        pp = build_preprocess(list(dc.train_pp))
        its = {c: train_iterator(train_dataset(split, pp, batch_size=dc.batch_size, seed=0, indices=idx, cache=c))
               for c in (True, False)}
        sample = next(its[True])
        step, state, _, _ = _step(config, FINETUNE, sample)
        device_batch = jax.device_put(sample)
        n = 30
        best = {"pipeline_cached": 0.0, "pipeline_uncached": 0.0, "step": 0.0}
        for _ in range(rounds):
            for cache in (True, False):
                t0 = time.perf_counter()
                for _ in range(n):
                    next(its[cache])
                key = "pipeline_cached" if cache else "pipeline_uncached"
                best[key] = max(best[key], n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            metrics = None
            for _ in range(n):
                state, metrics = step(state, device_batch)
            jax.block_until_ready(metrics)
            best["step"] = max(best["step"], n / (time.perf_counter() - t0))
        out[stage] = {"per_s": best, "batch_size": dc.batch_size, "ops": list(pp.op_names),
                      "ratio_cached": best["pipeline_cached"] / best["step"],
                      "ratio_uncached": best["pipeline_uncached"] / best["step"]}
    return out


def run(data_dir: str, quick: bool = False) -> dict:
    rounds = 2 if quick else 3
    return {"feature_cache": feature_cache(data_dir, rounds), "pipeline": pipeline(data_dir, rounds)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1], quick=True), indent=1, default=float))
