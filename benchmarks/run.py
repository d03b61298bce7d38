"""``make bench``: run every benchmark in one run and write ``BENCHMARKS.md``.

    python -m benchmarks.run            # all sections (about 10-15 min on 2 cores)
    python -m benchmarks.run --quick    # fewer rounds, for a smoke test
    python -m benchmarks.run --only overhead,conv --out /tmp/B.md

Sections run one after the other in this process (the CPU ones with
``JAX_PLATFORMS=cpu``) or in worker processes where they need their own XLA
flags or device count. A section that fails is reported as such and the others
still run. The raw results are written next to the report as JSON
(``--json``, default: a temporary file whose path is printed).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# CPU figures are CPU figures even where a GPU is present; the GPU section asks for it explicitly.
_PLATFORMS = os.environ.get("JAX_PLATFORMS")
os.environ["JAX_PLATFORMS"] = "cpu"

import tl_jax  # noqa: E402,F401  (tl_jax's XLA:CPU defaults, before any backend starts)
from benchmarks import common  # noqa: E402
from benchmarks.report import render  # noqa: E402

SECTIONS = ("overhead", "cache", "compile", "memory", "conv", "parallel", "sweep", "shard", "byo", "methods", "recipes",
            "pipeline",
            "transferability", "vit", "peft", "gpu")


def _optional(module: str, **kwargs: Any) -> Callable[[], dict]:
    """``module.run(**accepted kwargs)`` of a benchmark other code provides, or 'not available'."""
    def call() -> dict:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            return {"not_available": f"{module}: {e}"}
        params = inspect.signature(mod.run).parameters
        return mod.run(**{k: v for k, v in kwargs.items() if k in params})
    return call


def sections(data_dir: str, quick: bool) -> dict[str, Callable[[], dict]]:
    from benchmarks import byo_bench, cache_bench, compile_bench, conv_bench, gpu_bench, memory_bench, overhead_bench

    return {
        "overhead": lambda: overhead_bench.run(data_dir, quick=quick),
        "cache": lambda: cache_bench.run(data_dir, quick=quick),
        "compile": lambda: compile_bench.run(data_dir, quick=quick),
        "memory": lambda: memory_bench.run(data_dir, quick=quick),
        "conv": lambda: conv_bench.run(quick=quick),
        "parallel": _optional("benchmarks.parallel_bench"),
        "sweep": _optional("benchmarks.sweep_bench", data_dir=data_dir),
        "byo": lambda: byo_bench.run(data_dir, quick=quick),
        "shard": _optional("benchmarks.shard_bench", data_dir=data_dir, quick=quick),
        "methods": _optional("benchmarks.methods_bench", data_dir=data_dir, quick=quick),
        "recipes": _optional("benchmarks.recipes_bench", data_dir=data_dir, quick=quick),
        "pipeline": _optional("benchmarks.pipeline_bench", data_dir=data_dir, quick=quick),
        "transferability": _optional("benchmarks.transferability_bench", quick=quick),
        "vit": _optional("benchmarks.vit_bench", quick=quick),
        "peft": _optional("benchmarks.peft_bench", quick=quick),
        "gpu": lambda: gpu_bench.run(quick=quick, platforms=_PLATFORMS),
    }


NOTES_MARKER = "<!-- make bench keeps everything below this line -->"


def kept_notes(path: pathlib.Path) -> str:
    """The hand-written part of an existing report (from :data:`NOTES_MARKER` on), to append to a new one."""
    old = path.read_text() if path.is_file() else ""
    return "\n" + old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test, noisier figures)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(common.ROOT / "BENCHMARKS.md"))
    p.add_argument("--json", default="", help="where to write the raw results (default: a temp file)")
    p.add_argument("--data-dir", default="", help="tfds data_dir for the embedded sets (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="tl_jax_bench_tfds_")
    os.environ.setdefault("TL_JAX_BENCH_DATA_DIR", data_dir)
    t_start = time.time()
    results: dict[str, Any] = {"machine": common.machine(), "versions": common.versions(), "quick": args.quick,
                               "sections": {}}
    runners = sections(data_dir, args.quick)
    for name in SECTIONS:
        if name not in only:
            continue
        print(f"[bench] {name} ...", flush=True)
        t0 = time.time()
        try:
            res = runners[name]()
        except Exception as e:  # noqa: BLE001  (report it, run the rest)
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res["_seconds"] = time.time() - t0
        results["sections"][name] = res
        print(f"[bench] {name}: {res['_seconds']:.0f} s{' (error)' if 'error' in res else ''}", flush=True)
    results["total_s"] = time.time() - t_start
    results["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    json_path = args.json or tempfile.mkstemp(prefix="tl_jax_bench_", suffix=".json")[1]
    pathlib.Path(json_path).write_text(json.dumps(results, indent=1, default=str))
    out = pathlib.Path(args.out)
    out.write_text(render(results) + kept_notes(out))
    print(f"[bench] wrote {args.out} ({results['total_s'] / 60:.1f} min); raw results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
