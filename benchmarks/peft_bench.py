"""Issue 31's speed and memory goals: LoRA r=8 vs full fine-tuning of a ViT-S/16, and merging LoRA back.

Three runs of tl_jax's own machinery in one process (``tl_jax/train/build.py`` ``build_model_and_state``:
the model chain with ``config.peft.lora`` set, its param groups and optimizer; the compiled step of
``tl_jax/train/programs.py`` over ``tl_jax/train/step.py``, the program the loop runs on unlogged steps):

* ``lora``: ViT-S/16 (width 384, depth 12, 6 heads, MLP 1536), 224², batch 8, 10 classes, Adam, LoRA r=8
  (alpha 16) on every attention projection (query, key, value, out) and both MLP layers of every block
  (:data:`TARGETS`: 72 layers), the base frozen (``config.peft.freeze_base``: LoRA and the head train);
* ``full``: the same model without LoRA, every param trained (the base model's step);
* ``merged``: the plain model (no ``config.peft``) loaded with ``config.init_from`` from the LoRA run's params
  folded by :func:`tl_jax.peft.merge` (after a few LoRA steps, so ``B != 0``) and written by
  :func:`tl_jax.weights.convert.save_variables`, fully fine-tuned: its step must cost what the base's does.

Figures: seconds per step, interleaved round by round, best round, wall clock and process CPU (:func:`timed`);
optimizer-state bytes (the state's ``opt_state`` leaves); the compiled step's ``memory_analysis()``
(argument + output + temp bytes is the "peak" figure; outputs alias the donated state, so the live total is
that less ``alias``, also shown); XLA's ``cost_analysis()`` FLOPs of each step; and the RSS high-water growth
over two steps (``/proc/self/clear_refs`` resets the high-water mark, ``malloc_trim`` first). The merge check:
logits of the merged plain model vs the unmerged LoRA model on 8 other images, ``max|Δ| / max|logits|``.

``--quick`` (the test's): depth 2 and 32² images, 2 rounds of 1 step: a smoke test, not the goal's model.
Standalone::

    python -m benchmarks.peft_bench [--quick]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import fmt, machine, table

SIZE, BATCH, CLASSES, RANK, ALPHA = 224, 8, 10, 8, 16.0
QUICK_SIZE, QUICK_DEPTH = 32, 2
TARGETS = r"backbone/.*/(MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_[01])"
VARIANTS = ("lora", "full", "merged")
GOALS = {"step": 0.8, "opt_state": 0.02, "peak": 0.75, "merge_rel": 1e-5, "merged_step": 1.05}


def config(rank: int, quick: bool, init_from: str = ""):
    """The run's config: ViT-S/16 (depth 2 in ``quick``), Adam, LoRA of ``rank`` (0: none) on :data:`TARGETS`."""
    from tl_jax import config as config_lib

    c = config_lib.base_config()
    c.model.name, c.model.num_classes = "vit", CLASSES
    c.model.kwargs = dict(variant="S", patch_size=16, **({"depth": QUICK_DEPTH} if quick else {}))
    c.data.batch_size, c.train.steps = BATCH, 1000
    c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.targets = rank, ALPHA, TARGETS
    if init_from:
        c.init_from, c.dont_load = init_from, []  # the merged head too
    return c


class Variant:
    """One run's finished objective, its state and its compiled plain step (``grad_norm=False``)."""

    def __init__(self, name: str, cfg, batch: dict):
        import jax

        from tl_jax.parallel import make_strategy
        from tl_jax.train.build import build_model_and_state, param_groups
        from tl_jax.train.programs import StepPrograms

        self.name, self.config, self.batch = name, cfg, batch
        strategy = make_strategy(cfg)
        self.objective, tx, state = build_model_and_state(cfg, CLASSES, {"image": batch["image"][:1]}, strategy.mesh,
                                                         groups_log_level=logging.DEBUG)
        self.state = strategy.to_device(strategy.init_state(state))
        programs = StepPrograms(cfg, self.objective, tx, self.state.params, strategy)
        self.compiled = strategy.compile(programs.steps[False], self.state, batch)
        trainable = param_groups(cfg, self.objective, self.state.params).trainable()
        sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), self.state.params)
        self.params = sum(jax.tree.leaves(sizes))
        self.trainable = sum(n for n, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(trainable)) if t)
        self.opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state.opt_state))

    def step(self):
        self.state, _ = self.compiled(self.state, self.batch)
        return self.state.params

    def figures(self) -> dict:
        """Params, optimizer state, ``memory_analysis()`` bytes and ``cost_analysis()`` FLOPs of the step."""
        mem = self.compiled.memory_analysis()
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        m = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
        return {"params": self.params, "trainable": self.trainable, "opt_state_bytes": self.opt_bytes, **m,
                "peak_bytes": m["argument"] + m["output"] + m["temp"],
                "live_bytes": m["argument"] + m["output"] + m["temp"] - m["alias"],
                "gflop": float(cost.get("flops", float("nan"))) / 1e9}


def timed(fns: dict, rounds: int, reps: int) -> dict[str, dict[str, float]]:
    """``{name: {'wall', 'cpu'}}`` seconds per call: ``rounds`` interleaved rounds of ``reps`` calls after one
    warm-up call each, best round (:func:`benchmarks.common.interleaved`'s scheme), on the wall clock and on the
    process's CPU clock (all threads). On this shared VM the CPU seconds are the steadier figure: other jobs
    stretch the wall clock of whichever step is running (two runs of the same program differed by 15 %)."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {k: {"wall": math.inf, "cpu": math.inf} for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = None
            for _ in range(reps):
                out = fn()
            jax.block_until_ready(out)
            best[name]["wall"] = min(best[name]["wall"], (time.perf_counter() - t0) / reps)
            best[name]["cpu"] = min(best[name]["cpu"], (time.process_time() - c0) / reps)
    return best


def rss_growth_mib(v: Variant, steps: int = 2) -> float | None:
    """RSS high-water growth (MiB) over ``steps`` steps: VmHWM after them less VmRSS before (None where
    ``/proc/self/clear_refs`` cannot reset the high-water mark)."""
    import jax

    def status(key: str) -> float:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024
        raise KeyError(key)

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so reused pages show as growth
        before = status("VmRSS")
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except (OSError, KeyError):
        return None
    for _ in range(steps):
        jax.block_until_ready(v.step())
    return status("VmHWM") - before


def merge_check(lora: Variant, quick: bool, tmp: str, images: np.ndarray) -> tuple[Variant, dict]:
    """Fold the LoRA run's params into the base, write them, build the plain model from them
    (``config.init_from``); logits of both on ``images``."""
    import jax

    from tl_jax import peft
    from tl_jax.peft.lora import lora_pairs
    from tl_jax.weights.convert import save_variables

    params = jax.tree.map(np.asarray, jax.device_get(lora.state.params))  # copies: the step donates the state
    out = pathlib.Path(tmp) / "merged"
    save_variables(out, {"params": peft.merge(params, lora.config)})
    merged = Variant("merged", config(0, quick, init_from=str(out)), lora.batch)

    def logits(model, p):
        return np.asarray(model.apply({"params": p}, images, train=False), np.float64)

    zero_b = {**params, "lora": jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == "b" else x, params["lora"])}
    unmerged = logits(lora.objective.model, params)
    folded = logits(merged.objective.model, merged.state.params)
    base = logits(lora.objective.model, zero_b)
    scale = np.max(np.abs(unmerged))
    return merged, {"rel_diff": float(np.max(np.abs(folded - unmerged)) / scale),
                    "lora_vs_base_rel": float(np.max(np.abs(unmerged - base)) / scale),
                    "lora_params": peft.count(params["lora"]), "adapted_layers": len(lora_pairs(params["lora"]))}


def run(quick: bool = False) -> dict[str, Any]:
    """The section's figures (module doc): per variant, the ratios to ``full``, the merge check."""
    import jax

    size = QUICK_SIZE if quick else SIZE
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(BATCH, size, size, 3)).astype(np.float32),
             "label": (np.arange(BATCH) % CLASSES).astype(np.int32)}
    images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
    start = machine()
    with tempfile.TemporaryDirectory(prefix="tl_jax_bench_peft_") as tmp:
        v = {"lora": Variant("lora", config(RANK, quick), batch), "full": Variant("full", config(0, quick), batch)}
        for _ in range(3):  # B moves off zero: the merge has something to fold
            jax.block_until_ready(v["lora"].step())
        v["merged"], merge = merge_check(v["lora"], quick, tmp, images)
    seconds = timed({k: v[k].step for k in VARIANTS}, rounds=2 if quick else 3, reps=1 if quick else 2)
    figs = {k: {**v[k].figures(), "step_s": seconds[k]["wall"], "step_cpu_s": seconds[k]["cpu"],
                "rss_growth_mib": rss_growth_mib(v[k])} for k in VARIANTS}
    full = figs["full"]
    ratios = {"step": figs["lora"]["step_cpu_s"] / full["step_cpu_s"],
              "step_wall": figs["lora"]["step_s"] / full["step_s"],
              "opt_state": figs["lora"]["opt_state_bytes"] / full["opt_state_bytes"],
              "peak": figs["lora"]["peak_bytes"] / full["peak_bytes"],
              "live": figs["lora"]["live_bytes"] / full["live_bytes"],
              "gflop": figs["lora"]["gflop"] / full["gflop"],
              "merged_step": figs["merged"]["step_cpu_s"] / full["step_cpu_s"],
              "merged_step_wall": figs["merged"]["step_s"] / full["step_s"]}
    rss = [figs[k]["rss_growth_mib"] for k in ("lora", "full")]
    ratios["rss_growth"] = rss[0] / rss[1] if None not in rss and rss[1] > 0 else None
    end = machine()
    return {"quick": quick, "size": size, "depth": QUICK_DEPTH if quick else 12, "variants": figs, "ratios": ratios,
            "merge": merge, "loadavg": [start["loadavg"], end["loadavg"]], "date": start["date"],
            "cpu": f"{start['cores']} cores, {start['cpu']}"}


def _met(x: float | None, goal: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else ("yes" if x <= goal else "**no**")


def goal_rows(res: dict) -> list[list]:
    """The goals table's rows of issue 31 (``n/a`` where the section did not run)."""
    r, m = res.get("ratios") or {}, res.get("merge") or {}
    what = "ViT-S/16 224², batch 8" if not res.get("quick") else f"QUICK: depth 2, {res.get('size')}²"
    rows = [["LoRA r=8 / full fine-tune step time (process CPU s)", "step", "<= 0.80"],
            ["LoRA / full optimizer-state bytes", "opt_state", "<= 0.02"],
            ["LoRA / full peak bytes (compiled step: argument + output + temp)", "peak", "<= 0.75"]]
    out = [["31 PEFT", f"{label} ({what})", target, fmt(r.get(key), 3), _met(r.get(key), GOALS[key])]
           for label, key, target in rows]
    rel = m.get("rel_diff")
    out.append(["31 PEFT", "merged plain model vs unmerged LoRA model: max abs(Δ logits) / max abs(logits)", "<= 1e-5",
                "n/a" if rel is None else f"{rel:.1e}", _met(rel, GOALS["merge_rel"])])
    out.append(["31 PEFT", f"merged model / base model step time (process CPU s; {what}; no PEFT left)", "~1 (<= 1.05)",
                fmt(r.get("merged_step"), 3), _met(r.get("merged_step"), GOALS["merged_step"])])
    return out


def render(res: dict) -> str:
    """The section's markdown: one row per variant, then the merge check and what the figures are."""
    mib = lambda b: b / 2**20  # noqa: E731
    rows = []
    for k in VARIANTS:
        f = res["variants"][k]
        full = res["variants"]["full"]
        rows.append([k, f"{f['trainable']:,} / {f['params']:,}", f["step_s"], f["step_s"] / full["step_s"],
                     f["step_cpu_s"], f["step_cpu_s"] / full["step_cpu_s"], f["gflop"], mib(f["opt_state_bytes"]), mib(f["argument"]), mib(f["output"]), mib(f["temp"]),
                     mib(f["alias"]), mib(f["peak_bytes"]), fmt(f["rss_growth_mib"], 0)])
    head = ["run", "trained / all params", "step s", "/ full", "CPU s", "/ full (CPU)", "GFLOP (XLA)", "opt state MiB", "argument MiB",
            "output MiB", "temp MiB", "alias MiB", "arg+out+temp MiB", "RSS growth MiB"]
    r, m = res["ratios"], res["merge"]
    quick = (f"**QUICK run (`--quick`): ViT-S dims at depth {res['depth']}, {res['size']}² images, 2 rounds of 1 "
             "step: a smoke test, not the goal's figures.** ") if res["quick"] else ""
    return (f"{quick}ViT-S/16 (width 384, depth {res['depth']}, 6 heads, MLP 1536), {res['size']}², batch {BATCH}, "
            f"{CLASSES} classes, Adam; built by `build_model_and_state`, the loop's compiled step (no grad norm). "
            f"`lora`: r={RANK}, alpha {ALPHA:g} on {m['adapted_layers']} layers (query/key/value/out and both MLP "
            f"Denses of every block; {m['lora_params']:,} LoRA params), base frozen; `full`: every param trained; "
            "`merged`: the plain model loaded (`init_from`) from the LoRA params folded by `tl_jax.peft.merge`, "
            f"fully fine-tuned. {res['cpu']}, {res['date']}, load average {fmt(res['loadavg'][0][0], 1)} at the "
            f"start, {fmt(res['loadavg'][1][0], 1)} at the end. Step time: best of the interleaved rounds, wall clock "
            "and process CPU seconds (all threads; the goal rows use these: steadier under other jobs' load).\n\n"
            + table(head, rows)
            + f"\n\nLoRA / full: step CPU time {fmt(r['step'], 3)} (wall {fmt(r['step_wall'], 3)}), XLA FLOPs {fmt(r['gflop'], 3)}, optimizer state "
            f"{fmt(r['opt_state'], 4)}, argument + output + temp bytes {fmt(r['peak'], 3)} (less the aliased "
            f"donated state: {fmt(r['live'], 3)}), RSS growth over two steps {fmt(r['rss_growth'], 3)}. "
            f"Merge: the merged plain model's logits differ from the LoRA model's by {m['rel_diff']:.1e} of "
            f"max |logits| (the LoRA delta itself moved them by {m['lora_vs_base_rel']:.1e}); merged / base step "
            f"CPU time {fmt(r['merged_step'], 3)} (wall {fmt(r['merged_step_wall'], 3)}).\n\n"
            + table(["goal", "figure", "target", "measured", "met"], goal_rows(res)))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import tl_jax  # noqa: F401  (tl_jax's XLA:CPU defaults, before any backend starts)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="", help="also write the raw figures here")
    args = ap.parse_args()
    result = run(quick=args.quick)
    if args.json:
        import json

        pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(render(result))
