"""Shared helpers of the benchmarks: machine facts, interleaved timing, subprocess workers, tables.

Every figure in ``BENCHMARKS.md`` is a *ratio of two timings taken in the same
run*, interleaved round by round (A, B, A, B, ...) and each side summarised by
its best round, so a load that changes during the run touches both sides alike.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "orbax-checkpoint", "torch")


def versions() -> dict[str, str]:
    """Installed versions of the packages the benchmarks touch ('not installed' if absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, load average and date of this machine."""
    model = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cores": os.cpu_count(), "cpu": model, "memory_gib": mem_gb, "platform": platform.platform(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 3, reps: int = 3,
                sync: Callable[[Any], Any] | None = None, settle_s: float = 0.0) -> dict[str, float]:
    """Seconds per call of each function: ``rounds`` interleaved rounds of ``reps`` calls, best round.

    ``sync(result)`` blocks until a result is ready (``jax.block_until_ready``);
    each function is called once first (warm-up, compilation). ``settle_s``:
    a pause and one untimed call before each timed block, so thread pools that
    spin after their work (OpenMP's, Eigen's) are quiet and warm when the
    clock starts (PyTorch and XLA in one process slow each other down by
    several times without it).
    """
    sync = sync or (lambda r: r)
    for fn in fns.values():
        sync(fn())
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
                sync(fn())
            t0 = time.perf_counter()
            out = None
            for _ in range(reps):
                out = fn()
            sync(out)
            best[name] = min(best[name], (time.perf_counter() - t0) / reps)
    return best


def run_worker(module: str, args: Sequence[str] = (), *, env: dict[str, str | None] | None = None,
               timeout: float = 600) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line is a JSON dict.

    ``JAX_PLATFORMS`` defaults to ``cpu``; ``env`` adds variables (``None``
    removes one). Returns ``{"error": ...}`` (with the stderr tail) when the
    worker fails.
    """
    full_env = dict(os.environ)
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in (env or {}).items():  # None removes a variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"}
    return json.loads(lines[-1])


def emit(result: dict) -> None:
    """What a worker prints last: one JSON line."""
    print(json.dumps(result, default=float), flush=True)


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table (``n/a`` for missing)."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers are right-aligned."""
    def cell(v: Any) -> str:
        return fmt(v) if isinstance(v, float) else str(v)

    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
