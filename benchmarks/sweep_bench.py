"""Benchmark: an 8-point λ sweep run as ONE vmapped step vs 8 sequential runs, in the same process.

The sweep: the multitask objective (digit + parity + ge5 heads) on the tiny CNN
(mnist5k at 14x14, batch 16), λ = (1, lam, lam) for 8 values of lam, ``STEPS``
steps each, evaluated once at the end. Both ways run through ``tl-jax sweep``'s
runner (:func:`tl_jax.sweep.runner.run_points`, ``vectorize='on'`` and
``'off'``) into fresh workdirs with one fresh compilation cache, so compile
time counts for both: 8 sequential runs compile 8 programs (λ is a constant
of each), the vectorised sweep one. Reported: wall times and their ratio, and
the same split into compile and train time (from the points' summaries).

    python -m benchmarks.sweep_bench        # prints the dict
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

LAMS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STEPS = 20
CONFIG = "tests/configs/tiny.py"


def _points() -> list[dict]:
    return [{"config.objective.multitask.weights": [1.0, lam, lam], "_name": f"lam{lam:g}"} for lam in LAMS]


def _sums(root: str) -> dict[str, float]:
    out = {"compile_s": 0.0, "train_s": 0.0}
    for lam in LAMS:
        with open(os.path.join(root, f"lam{lam:g}", "summary.json")) as f:
            s = json.load(f)
        for k in out:
            out[k] += s[k]
    return out


def run(data_dir: str | None = None) -> dict:
    """Wall time of the 8-point λ sweep vectorised vs sequential (same run, same machine)."""
    from tl_jax.sweep.runner import run_points

    logging.getLogger("tl_jax").setLevel(logging.WARNING)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="tl_jax_sweep_bench_") as tmp:
        overrides = ["objective.name=multitask", f"train.steps={STEPS}", f"train.log_every={STEPS}",
                     "train.eval_every=0", f"train.checkpoint_every={STEPS}", f"compile_cache_dir={tmp}/jax_cache"]
        if data_dir or os.environ.get("TL_JAX_BENCH_DATA_DIR"):
            overrides.append(f"data.data_dir={data_dir or os.environ['TL_JAX_BENCH_DATA_DIR']}")
        config = os.path.join(root, CONFIG)
        warmup = {"config.objective.multitask.weights": [1.0, 0.123, 0.123]}  # a λ outside the sweep
        run_points(config, [warmup], f"{tmp}/warmup", vectorize="off", overrides=overrides)  # data, imports
        wall = {}
        for mode in ("on", "off"):
            t0 = time.perf_counter()
            run_points(config, _points(), f"{tmp}/{mode}", vectorize=mode, overrides=overrides)
            wall[mode] = time.perf_counter() - t0
        vec, seq = _sums(f"{tmp}/on"), _sums(f"{tmp}/off")
    return {
        "points": len(LAMS), "steps": STEPS,
        "vectorized_wall_s": round(wall["on"], 2), "sequential_wall_s": round(wall["off"], 2),
        "ratio_vectorized_over_sequential": round(wall["on"] / wall["off"], 3),
        "vectorized_compile_s": round(vec["compile_s"], 2), "sequential_compile_s": round(seq["compile_s"], 2),
        "vectorized_train_s": round(vec["train_s"], 2), "sequential_train_s": round(seq["train_s"], 2),
        "train_ratio_vectorized_over_sequential": round(vec["train_s"] / seq["train_s"], 3),
        "loadavg_1min": round(os.getloadavg()[0], 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
