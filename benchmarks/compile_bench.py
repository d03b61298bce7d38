"""Goal 5, compilation: a cold vs a warm start of the demo's source stage (persistent compile cache).

Each start is a fresh ``python -m tl_jax.train`` process running the demo's
source stage for a few steps with ``config.compile_cache_dir`` set: *cold* on
an empty cache directory, *warm* on the directory the cold run filled. The
figures are the run's ``compile_s`` (tracing + lowering + XLA compile or cache
load of the train and eval steps, from ``summary.json``) and the whole
process's wall time.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import ROOT

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")


def start(data_dir: str, cache_dir: str, workdir: str) -> dict:
    """One process running 20 steps of the demo's source stage; its summary and wall time."""
    args = [sys.executable, "-m", "tl_jax.train", "--config", f"{DEMO}:stage=source", "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", f"--config.compile_cache_dir={cache_dir}",
            "--config.train.steps=20", "--config.train.log_every=10", "--config.train.checkpoint_every=20",
            "--config.train.progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo source stage failed: {proc.stderr[-1000:]}")
    summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
    return {"compile_s": summary["compile_s"], "process_s": wall, "wall_s": summary["wall_s"]}


def run(data_dir: str, quick: bool = False) -> dict:
    """Cold then warm start, ``rounds`` times (each round a new cache directory); best of each, and each
    round's own warm / cold ratio (the warm start's ~0.3 s swings more with the load than the cold's ~2 s,
    so a single round reads 0.15-0.22)."""
    rounds = 1 if quick else 5
    root = pathlib.Path(tempfile.mkdtemp(prefix="tl_jax_bench_compile_"))
    best: dict[str, dict] = {}
    per_round = []
    for r in range(rounds):
        cache = str(root / f"cache{r}")
        res = {kind: start(data_dir, cache, str(root / f"{kind}{r}")) for kind in ("cold", "warm")}
        per_round.append(res["warm"]["compile_s"] / res["cold"]["compile_s"])
        for kind, v in res.items():
            if kind not in best or v["compile_s"] < best[kind]["compile_s"]:
                best[kind] = v
    return {**best, "rounds": rounds, "round_ratios": per_round, "median_round_ratio": float(np.median(per_round)),
            "compile_ratio": best["warm"]["compile_s"] / best["cold"]["compile_s"],
            "process_ratio": best["warm"]["process_s"] / best["cold"]["process_s"]}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], quick=True), indent=1))
