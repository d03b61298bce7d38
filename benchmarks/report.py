"""``render(results) -> str``: the markdown of ``BENCHMARKS.md`` from ``benchmarks.run``'s results."""
from __future__ import annotations

from typing import Any

from benchmarks.common import fmt, table
from benchmarks.conv_bench import FLAG_SETS, SHAPES, VARIANTS
from benchmarks.overhead_bench import LOG_EVERY
from benchmarks import pipeline_bench
from benchmarks import peft_bench, vit_bench


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _met(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher else value <= target) else "**no**"


def _error(res: dict) -> str | None:
    if not isinstance(res, dict):
        return "no result"
    for key in ("error", "not_available", "skipped"):
        if key in res:
            return f"{key.replace('_', ' ')}: {res[key]}"
    return None


def summary(s: dict) -> str:
    """One row per speed goal (issue 8's, then :func:`later_goals`): the figure, the target, what this run
    measured."""
    ov, fc, pl = s.get("overhead", {}), _get(s, "cache", "feature_cache"), _get(s, "cache", "pipeline")
    comp, mem, gpu = s.get("compile", {}), s.get("memory", {}), s.get("gpu", {})
    conv = _get(s, "conv", "variants", "ms") or {}
    torch_ratio = {shape: (_get(conv, f"{shape}/b128", "torch") or 0) / (_get(conv, f"{shape}/b128", "tl_jax") or 1)
                   if _get(conv, f"{shape}/b128", "torch") else None for shape in SHAPES}
    pipe = min([r for r in (_get(pl, "source", "ratio_cached"), _get(pl, "target", "ratio_cached")) if r] or [None])
    rows = [
        ["1 no overhead", "tl_jax loop steps/s / hand-written jit loop, interleaved (demo source stage, its "
         "random crops and checkpoint included), pooled over the rounds", ">= 0.97", fmt(_get(ov, "ratio")),
         _met(_get(ov, "ratio"), 0.97)],
        ["1 no overhead", "same, median of the rounds' own ratios", ">= 0.97", fmt(_get(ov, "ratio_median_round")),
         _met(_get(ov, "ratio_median_round"), 0.97)],
        ["1 no overhead", "same with the batches made in the step from rows on the device "
         "(`data.device_cache=true`, off by default), pooled", "(informative)",
         fmt(_get(ov, "ratio_device_batches")), "-"],
        ["1 no overhead", "tl_jax's loop between checkpoints: median ratio of neighbouring 10-step pieces "
         "(the checkpoint's cost is the section's 'checkpoint extra ms')", "(part of the above)",
         fmt(_get(ov, "variants", "tl_jax", "steady_pair_ratio")), "-"],
        ["2 CPU conv gap", "PyTorch eager step time / tl_jax step time, 32x32x3 b128", ">= 1.0",
         fmt(torch_ratio["32x32x3"]), _met(torch_ratio["32x32x3"], 1.0)],
        ["2 CPU conv gap", "same, 28x28x1 b128", ">= 1.0", fmt(torch_ratio["28x28x1"]),
         _met(torch_ratio["28x28x1"], 1.0)],
        ["3 feature cache", "full fine-tune epoch time / cached linear-probe epoch time", ">= 10",
         fmt(_get(fc, "speedup_cached_vs_finetune"), 1), _met(_get(fc, "speedup_cached_vs_finetune"), 10)],
        ["4 input pipeline", "pipeline batches/s / train steps/s (worst demo stage)", ">= 5", fmt(pipe, 1),
         _met(pipe, 5)],
        ["5 compilation", "warm compile_s / cold compile_s (demo source stage), best round of each", "<= 0.20",
         fmt(_get(comp, "compile_ratio")), _met(_get(comp, "compile_ratio"), 0.20, higher=False)],
        ["5 compilation", "same, median of the rounds' own ratios", "<= 0.20",
         fmt(_get(comp, "median_round_ratio")), _met(_get(comp, "median_round_ratio"), 0.20, higher=False)],
        ["6 memory", "linear-probe / fine-tune optimizer-state bytes (CNN)", "frozen hold none",
         fmt(_get(mem, "cnn_28x28x1", "ratio"), 3), "-"],
        ["6 memory", "peak RSS of the demo (MiB)", "report", fmt(_get(mem, "demo", "peak_rss_mib"), 0), "-"],
        ["7 GPU", "ResNet-50 224x224 bf16 MFU", ">= 0.40", fmt(_get(gpu, "mfu")),
         _met(_get(gpu, "mfu"), 0.40) if _get(gpu, "mfu") else "skipped (no GPU)"],
    ]
    return table(["goal", "figure (same-run ratio)", "target", "measured", "met"], rows + later_goals(s))


# methods whose docstring (benchmarks/methods_bench.py) says why they may pass 1.5x: another network's forward
# pass in the step (distillation's teacher) or CDAN's full C·D multilinear map
_METHODS_EXEMPT = ("cdan", "distill", "feature_distill")


def later_goals(s: dict) -> list[list]:
    """Rows for the speed goals of issues 19 (byo), 22 (recipes), 23 (methods), 24 (shard) and 33 (transferability)."""
    byo, rec, shard, methods = (s.get(k, {}) for k in ("byo", "recipes", "shard", "methods"))
    rows = [["19 your model", "NNX / linen train step time (CNN)", "<= 1.03", fmt(_get(byo, "step_ratio")),
             _met(_get(byo, "step_ratio"), 1.03, higher=False)],
            ["19 your model", "NNX / linen loop speed (demo source stage)", ">= 0.95", fmt(_get(byo, "loop_ratio")),
             _met(_get(byo, "loop_ratio"), 0.95)],
            ["19 your data", "in-memory batches/s / train steps/s", ">= 5", fmt(_get(byo, "data_ratio"), 1),
             _met(_get(byo, "data_ratio"), 5)],
            ["22 ranking", "fine-tune K candidates (demo settings, 3 seeds) s / rank them s", ">= 100",
             fmt(_get(rec, "rank_ratio"), 1), _met(_get(rec, "rank_ratio"), 100)],
            ["22 ranking", "same, fine-tuning with seed 0 only", "(informative)", fmt(_get(rec, "rank_ratio_seed0"), 1),
             "-"],
            ["22 few-shot", "one SGD linear probe s / ridge over 4 shots x 3 seeds x 21 L2 s", ">= 20",
             fmt(_get(rec, "fewshot_ratio"), 1), _met(_get(rec, "fewshot_ratio"), 20)]]
    ridge, probe = _get(rec, "ridge10"), _get(rec, "probe10")
    gap = None if ridge is None or probe is None else ridge - probe
    rows.append(["22 few-shot", "10-shot accuracy: ridge - SGD probe (a ridge above the probe meets it)",
                 ">= -0.01", fmt(gap, 4), "n/a" if gap is None else ("yes" if gap >= -0.01 else "**no**")])
    for b, acc in sorted((_get(rec, "accumulation") or {}).items(), key=lambda kv: int(kv[0])):
        for n in ("accum2", "accum4"):
            k = int(n[-1])
            rows.append(["22 accumulation", f"{k} x {int(b) // k} / 1 x {b} step time (same examples)", "<= 1.05",
                         fmt(_get(acc, "ratios", n)), _met(_get(acc, "ratios", n), 1.05, higher=False)])
    ratios = _get(methods, "ratios") or {}
    over = sorted(m for m, r in ratios.items() if r > 1.5 and m not in _METHODS_EXEMPT)
    rows.append(["23 methods", "each method's step / plain fine-tuning's on the same images (worst of those "
                 f"without a stated reason: {', '.join(_METHODS_EXEMPT)} have one)", "<= 1.5",
                 fmt(max([r for m, r in ratios.items() if m not in _METHODS_EXEMPT], default=None)),
                 "n/a" if not ratios else ("yes" if not over else f"**no** ({', '.join(over)})")])
    rows += [["24 sweep tasks", "--shard task: (process wall - points' train_s) / train_s, demo points",
              "<= 0.10", fmt(_get(shard, "overhead_ratio")), _met(_get(shard, "overhead_ratio"), 0.10, higher=False)],
             ["24 sweep tasks", "Ray task overhead per point, local runtime (s)", "<= 1",
              fmt(_get(shard, "ray", "overhead_s_mean")), _met(_get(shard, "ray", "overhead_s_mean"), 1.0, higher=False)]]
    rows += pipeline_bench.goals(s.get("pipeline", {}))
    for score, name in (("logme", "LogME"), ("hscore", "H-score")):
        ratio, rel = _get(s, "transferability", "ratios", score), _get(s, "transferability", "rel_diff", score)
        rows.append(["33 scores", f"{name}: TLlib's numpy s / tl_jax's s, N=5,000 D=2,048 C=100, values equal to "
                     f"1e-6 (measured: {'n/a' if rel is None else f'{rel:.0e}'})", ">= 1.5", fmt(ratio),
                     "n/a" if ratio is None or rel is None else ("yes" if ratio >= 1.5 and rel <= 1e-6 else "**no**")])
    return rows + vit_goals(s.get("vit", {})) + peft_bench.goal_rows(s.get("peft", {}))


def vit_goals(vit: dict) -> list[list]:
    """Issue 30's goals: tl_jax's ViT vs timm eager on this CPU (torch s / tl_jax s), conversion vs reading."""
    rows = []
    for key, what in (("forward", "ViT-B/16 forward, batch 8, 224 px"), ("train_step", "ViT-S/16 train step, batch 8")):
        s = _get(vit, key, "seconds") or {}
        ratio = s["timm eager"] / s["tl_jax"] if s.get("tl_jax") and s.get("timm eager") else None
        rows.append(["30 backbones", f"{what}: timm eager s / tl_jax s", ">= 1.0", fmt(ratio), _met(ratio, 1.0)])
    c = _get(vit, "conversion") or {}
    conv = c["convert_s"] / c["read_s"] if c.get("read_s") else None
    rows.append(["30 backbones", "convert a HF ViT-B/16 folder s / read its file s (first in a process)", "<= 2",
                 fmt(conv), _met(conv, 2.0, higher=False)])
    return rows


def checkpoint_cost_md(c: dict, extra_ms: float | None) -> str:
    """The checkpoint's CPU per save (benchmarks/checkpoint_bench.py): per array, not per byte."""
    if "variants" not in c:
        return f"\n\nCheckpoint cost: {c.get('error', 'n/a')}"
    rows = [[k, v["arrays"], v["mb"], v.get("disk_mb"), v["cpu_ms"]] for k, v in c["variants"].items()]
    plain, zstd = c["variants"].get("demo state", {}), c["variants"].get("demo state, zstd", {})
    zstd_note = ""
    if plain and zstd:
        zstd_note = (f" zstd (`config.train.checkpoint_compression=true`, orbax's default codec) costs "
                     f"{fmt(zstd['cpu_ms'] - plain['cpu_ms'], 0)} ms more CPU per save for "
                     f"{fmt(100 * (1 - zstd['disk_mb'] / plain['disk_mb']), 0)} % fewer bytes (float32 weights "
                     "compress poorly), so tl_jax saves uncompressed by default.")
    return ("\n\nWhat one save costs (`benchmarks/checkpoint_bench.py`: the demo's train state saved by "
            f"`tl_jax.train.checkpoint.Checkpoints` and waited for, median of {c['saves']} saves, the variants "
            "interleaved; process CPU time, all threads):\n\n"
            + table(["saved tree", "arrays", "MB", "MB on disk", "CPU ms per save"], rows)
            + f"\n\nSo ~{fmt(c['fixed_ms'], 0)} ms per save, ~{fmt(c['ms_per_array'], 1)} ms per array and "
            f"~{fmt(c.get('ms_per_mb'), 1)} ms per MB (uncompressed, the first three rows): mostly orbax's per-save "
            "and per-array machinery (event loops, threads, metadata, one TensorStore array each; ocdbt on/off "
            "and zarr3 measured alike on 2026-11-27)." + zstd_note + " Fewer saves per minute is what lowers it"
            + (f": at one save a minute, the {extra_ms:.0f} ms extra per save above would be "
               f"{extra_ms / 600:.1f} % of the loop's time." if extra_ms else "."))


def overhead_md(r: dict) -> str:
    variants = r["variants"]
    auto = r.get("data_prefetch_auto")
    what = {"tl_jax": "`tl_jax.train.loop.train`, the demo's train_pp (random 28x28 crops of the 2-px padded "
                      f"digit), `data.prefetch='auto'` (= {auto} here), `train.checkpoint_async='auto'` "
                      f"(= synchronous here: CPU devices, a {fmt(_get(r, 'checkpoint_cost', 'variants', 'demo state', 'mb'), 0)}"
                      " MB state)",
            "tl_jax_async_checkpoint": "the same with `train.checkpoint_async=true`: orbax writes in background "
                                       "threads while the steps go on",
            "tl_jax_device_batches": "the same with `data.device_cache=true`: the cached rows on the device, the "
                                     "host sends row indices and crop offsets, the step gathers and crops",
            "tl_jax_prefetch_thread": "the demo's train_pp with `data.prefetch=2`: batches made in a background "
                                      "thread"}
    rows = [[k, what.get(k, ""), v["tl_jax_steps_per_s"], v["hand_steps_per_s"], v["ratio"],
             " ".join(f"{x:.3f}" for x in v["round_ratios"]), v["median_round_ratio"],
             fmt(v.get("steady_pair_ratio"), 3), fmt(v.get("checkpoint_extra_ms"), 0)] for k, v in variants.items()]
    out = (f"Demo source stage (mnist5k, CNN, Adam, batch 64) for {r['steps']} steps with the demo's cadence "
           "(metrics every 50 steps, a checkpoint every 300), against the 30-line jit loop (flax + optax Adam, "
           "batches made beforehand and already on the device). The two run *interleaved* in one process: "
           f"every {r['chunk']} steps of tl_jax's loop (from step 50, after compilation), the loop waits for "
           f"its step and {r['chunk']} hand-written steps run, each side on its own clock, so both sample the "
           "same load on this shared 2-core VM (whose speed swings by +-10 % within seconds; loops timed one "
           "after the other scattered by +-5-9 % per round). While an asynchronous checkpoint is being written "
           "no hand-written piece runs, so the save's threads stay on tl_jax's clock. tl_jax makes "
           "every batch (cached rows, the crop) and logs every metrics window; the start-up, compilation and "
           f"final evaluation are outside. {r['rounds']} rounds, each a fresh process (the variants in turn); "
           "steps/s pooled over the rounds (all steps / all seconds), and each round's own ratio.\n\n"
           "Between checkpoints ('steady'), the median ratio of neighbouring pieces is robust to the load "
           "swings; 'checkpoint extra ms' is the time of the piece holding the save (orbax: the device-to-host "
           "copy, then the writing, before the loop goes on or in threads on the same 2 cores as XLA) less its "
           "steps at the round's median piece time, per checkpoint.\n\n"
           + table(["loop", "what", "tl_jax steps/s", "hand-written steps/s", "ratio (pooled)", "per round",
                    "median", "steady", "checkpoint extra ms"], rows))
    if "step_only_ms" in r:
        ms = r["step_only_ms"]
        out += (f"\n\nThe train steps alone, interleaved on one device batch: hand-written "
                f"{fmt(ms['hand_written'])} ms, tl_jax {fmt(ms['tl_jax'])} ms (ratio {fmt(r['step_only_ratio'])}). "
                "tl_jax's step also computes the accuracy, a finiteness check and the skip count on every step. "
                "The gradient norm is computed on the logged steps only (`train.grad_norm_program='separate'`): "
                "the loop compiles the step twice and runs the one with the norm on those steps "
                f"({fmt(ms.get('tl_jax_logged_step'))} ms, ratio {fmt(r.get('step_only_ratio_logged_step'))}; "
                "a reduction over all gradients that XLA:CPU does not fuse into the update, also what every step "
                "costs under `nan_policy='skip'`). One program with the norm in a `lax.cond` "
                f"(`grad_norm_program='cond'`) ran {fmt(ms.get('tl_jax_cond'))} ms (ratio "
                f"{fmt(r.get('step_only_ratio_cond'))}) on the steps whose condition was false.")
    spc = r.get("steps_per_call_ms") or {}
    if spc:
        one = spc["one_step_per_call"]
        out += ("\n\nSeveral steps per compiled call (Keras' `steps_per_execution`, a TPU-style host loop), "
                "which would take the loop's per-step host work off the step's path: the hand-written step "
                f"dispatched once per step {fmt(one)} ms per step; 10 steps in one `lax.scan` "
                f"{fmt(spc['scan'])} ms per step ({fmt(spc['scan'] / one)}x); the same scan unrolled "
                f"{fmt(spc['scan_unrolled'])} ms ({fmt(spc['scan_unrolled'] / one)}x). XLA:CPU runs the "
                "convolutions inside a loop body far slower. The unrolled program "
                + ("was slower here" if spc["scan_unrolled"] / one > 1.02 else
                   "was faster here" if spc["scan_unrolled"] / one < 0.98 else "ran alike here")
                + " (1.07-1.15x slower in four separate runs of 3-30 rounds on 2026-11-28) and compiles ten "
                "copies of the step, so tl_jax dispatches one step per call.")
    host = r.get("host_ms") or {}
    out += ("\n\nWhat closed the gap (issue 8; the loop ran at 0.90x, 0.86x with the crops, in the run before "
            "it):\n\n"
            "| change | before | after |\n|---|---:|---:|\n"
            "| random ops once per batch (`Preprocess.on_batch`: one numpy call per op for the whole batch, "
            "draws keyed by stream position) instead of per example through grain's `random_map`: ms of host "
            "time per demo batch | 1.38 (727 batches/s, previous run) | "
            f"{fmt(host.get('batch_at_a_time'))} (measured here) |\n"
            "| several batches' rows gathered and cropped together (`GatherBatches(chunk)`, same batches): ms per "
            f"batch (measured here) | {fmt(host.get('batch_at_a_time'))} | {fmt(host.get('chunked'))} |\n"
            "| batches made in the loop's thread on <= 2 cores (`data.prefetch='auto'`; JAX's asynchronous "
            "dispatch overlaps them with the step), passed to the compiled step as numpy (it places them "
            f"itself): loop ratio (measured here) | {fmt(r.get('ratio_prefetch_thread'))} | {fmt(r.get('ratio'))} |\n"
            "| checkpoints saved synchronously on CPU devices for states < 256 MiB "
            "(`train.checkpoint_async='auto'`; asynchronously, orbax's writer threads share the cores with XLA's "
            "and part of their cost lands in the pieces after the save, see the variant's 'steady'; the two cost "
            "the loop alike in 6 rounds each on 2026-11-28, pooled 0.918 async vs 0.907 sync at a save every 50 "
            "steps): checkpoint extra ms per save (loop ratio), measured here | "
            f"{fmt(_get(r, 'variants', 'tl_jax_async_checkpoint', 'checkpoint_extra_ms'), 0)} "
            f"({fmt(r.get('ratio_async_checkpoint'))}) | "
            f"{fmt(_get(r, 'variants', 'tl_jax', 'checkpoint_extra_ms'), 0)} ({fmt(r.get('ratio'))}) |\n"
            "| tried, kept off by default: batches made in the step from the cached rows on the device "
            "(`data.device_cache=true`): host ms per batch, then the loop ratio (pooled), measured here | "
            f"{fmt(host.get('chunked'))}, {fmt(r.get('ratio'))} | {fmt(host.get('recipes'))}, "
            f"{fmt(r.get('ratio_device_batches'))} |\n"
            "| gradient norm on the logged steps only: ms per step (measured here) | "
            f"{fmt(_get(r, 'step_only_ms', 'tl_jax_logged_step'))} | {fmt(_get(r, 'step_only_ms', 'tl_jax_cond'))} |\n"
            "| ... in a program of its own instead of a `lax.cond` (`train.grad_norm_program='separate'`: one more "
            "compile per run): ms per unlogged step, best of the step-only rounds here (noisy at this size: the "
            "median gain over 7 runs of 30-80 interleaved rounds on 2026-11-28 was 1.1 %, from -0.8 to +1.4 %) | "
            f"{fmt(_get(r, 'step_only_ms', 'tl_jax_cond'))} | {fmt(_get(r, 'step_only_ms', 'tl_jax'))} |\n"
            "| a step's metrics as one float32 vector, fetched once the next step is queued behind its window "
            "(the devices never wait for logging) | 7 arrays per step, an idle gap per log | 1, none |\n"
            "| a window's vectors read with `np.asarray` on CPU devices (`train_metrics.fetch`) instead of "
            "`jax.device_get` (an asynchronous host copy queued per array): host CPU ms per window of "
            f"{LOG_EVERY} steps while steps run (measured here) | {fmt(_get(r, 'fetch_ms', 'device_get'))} | "
            f"{fmt(_get(r, 'fetch_ms', 'fetch'))} |\n"
            "| checkpoint arrays written uncompressed (`train.checkpoint_compression=false`; orbax's default is "
            "zstd): process CPU ms per save of the demo's state (checkpoint bench below, measured here) | "
            f"{fmt(_get(r, 'checkpoint_cost', 'variants', 'demo state, zstd', 'cpu_ms'), 0)} | "
            f"{fmt(_get(r, 'checkpoint_cost', 'variants', 'demo state', 'cpu_ms'), 0)} |\n"
            "| the heap of imports and the built run frozen out of the garbage collector during the loop "
            "(`tl_jax/train/gc_freeze.py`): full collections in 600 demo steps (measured 2026-11-28) | 1 of 153 ms "
            "| none |\n\n"
            + _spread_note(r)
            + "What remains: the checkpoint (at the demo's cadence, one save per 300 steps of ~7 s, its extra "
            f"time here is {fmt(_get(r, 'variants', 'tl_jax', 'checkpoint_extra_ms'), 0)} ms per save "
            f"synchronously, {fmt(_get(r, 'variants', 'tl_jax_async_checkpoint', 'checkpoint_extra_ms'), 0)} ms "
            f"asynchronously, for the CPU below) and, between checkpoints, {_gap(r)}: the step's own metrics "
            "(accuracy, finiteness, the skip count) and the loop's Python per step. Taking the batch making "
            "off the host (`data.device_cache`, row above) did not move the loop ratio on this CPU.")
    out += checkpoint_cost_md(r.get("checkpoint_cost") or {}, _get(r, "variants", "tl_jax", "checkpoint_extra_ms"))
    return out


def _spread_note(r: dict) -> str:
    """How far apart the rounds were: the loop ratios above are read against it."""
    per = _get(r, "variants", "tl_jax", "round_ratios") or []
    others = [v.get("rounds") for k, v in (r.get("variants") or {}).items() if k != "tl_jax"]
    if not per or not others:
        return ""
    n = f"{min(others)}" if min(others) == max(others) else f"{min(others)}-{max(others)}"
    return (f"The loop ratios in this table come from {n} rounds per variant and "
            f"{len(per)} for tl_jax, whose own rounds spanned {min(per):.3f}-{max(per):.3f} in this run: "
            "differences between loop ratios smaller than that spread are noise.\n\n")


def _gap(r: dict) -> str:
    """``1 - steady ratio`` of tl_jax's loop as a percentage (what the loop loses between checkpoints)."""
    steady = _get(r, "variants", "tl_jax", "steady_pair_ratio")
    return f"{100 * (1 - steady):.1f} %" if steady is not None else "n/a"


def cache_md(r: dict) -> str:
    fc, pl = r["feature_cache"], r["pipeline"]
    ep = fc["epoch_s"]
    rows = [[k, 1000 * v, ep["finetune"] / v] for k, v in ep.items()]
    out = (f"### Feature cache (goal 3)\n\nOne epoch of optdigits' train split ({fc['examples']} examples, "
           f"{fc['steps_per_epoch']} steps of 32, 28x28x1), batches from the tl_jax pipelines, best of the "
           f"interleaved rounds. The one-time feature extraction took {fmt(fc['extract_s'])} s = "
           f"{fmt(fc['extract_in_finetune_epochs'])} fine-tune epochs.\n\n"
           + table(["run", "ms / epoch", "speed-up vs fine-tune"], rows))
    rows = []
    for stage in ("source", "target"):
        st = pl[stage]
        rows.append([f"{stage} ({', '.join(st['ops'])}; batch {st['batch_size']})", st["per_s"]["step"],
                     st["per_s"]["pipeline_cached"], st["ratio_cached"], st["per_s"]["pipeline_uncached"],
                     st["ratio_uncached"]])
    out += (f"\n\n### Input pipeline (goal 4)\n\nBatches/s of one pipeline iterator ({pl['read_threads']} grain "
            f"read threads, as the loop uses on this machine) vs steps/s of the full fine-tune step on the same "
            f"batch shape, interleaved.\n\n"
            + table(["demo stage", "steps/s", "cached batches/s", "ratio", "uncached batches/s", "ratio"], rows))
    return out


def conv_md(r: dict) -> str:
    base = _get(r, "variants", "ms") or {}
    out = ("PyTorch eager time / JAX time for one SGD-momentum train step of the demo CNN (> 1: JAX faster), "
           "measured interleaved in the same worker process. PyTorch's OpenMP threads slow down far more than "
           "XLA's on a loaded machine (spinning barriers on 2 shared cores), so this ratio moves with the load; "
           "the JAX-vs-JAX ratios do not.\n\n")
    speedups = []
    for shape in SHAPES:
        ms = base.get(f"{shape}/b128", {})
        if "tl_jax" in ms and "reduce_window_pool" in ms:
            speedups.append(f"{ms['reduce_window_pool'] / ms['tl_jax']:.2f}x at {shape}")
    if speedups:
        out += ("tl_jax's step vs tl_jax before issue 8 (`reduce_window` pooling, XLA conv1): "
                + ", ".join(speedups) + " faster (same run).\n\n")
    if _error(r.get("variants", {})):
        out += f"Variants: {_error(r['variants'])}\n\n"
    else:
        rows = []
        for name, desc in VARIANTS.items():
            row: list[Any] = [name, desc]
            for shape in SHAPES:
                ms = base.get(f"{shape}/b128", {})
                row.append(ms["torch"] / ms[name] if name in ms and "torch" in ms else "n/a")
                row.append(ms[name] if name in ms else "n/a")
            rows.append(row)
        rows.append(["torch", "PyTorch 2.13 eager, NCHW (the reference)", 1.0,
                     _get(base, "32x32x3/b128", "torch") or "n/a", 1.0, _get(base, "28x28x1/b128", "torch") or "n/a"])
        out += table(["variant", "what", "32x32x3 torch/JAX", "ms", "28x28x1 torch/JAX", "ms"], rows)
        errors = _get(r, "variants", "errors")
        if errors:
            out += "\n\nVariants that failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
    rows = []
    default = {shape: _get(base, f"{shape}/b128") for shape in SHAPES}
    for label, res in (r.get("flags") or {}).items():
        err = _error(res)
        env = FLAG_SETS.get(label, {})
        row: list[Any] = [label, " ".join(f"`{k}={v}`" for k, v in env.items())]
        for shape in SHAPES:
            ms, ref = _get(res, "ms", f"{shape}/b128"), default[shape]
            if err or not ms or not ref:
                row += [err or "n/a", "n/a"]
            else:  # normalised by each process's own PyTorch time
                mine, theirs = ms["torch"] / ms["tl_jax"], ref["torch"] / ref["tl_jax"]
                row += [mine, mine / theirs]
        rows.append(row)
    out += ("\n\nXLA CPU flags of this jaxlib, each in its own process on top of tl_jax's defaults "
            "(`tl_jax/util/xla_flags.py`: YNNPACK fusions off, 10-25 % faster when measured in one process), "
            "tl_jax's step; 'vs tl_jax' divides the process's torch/JAX ratio by the variants process's, the "
            "torch step being the yardstick across processes (> 1: the flag helps). That yardstick moves with "
            "the load (PyTorch's OpenMP threads suffer more from it than XLA's): on 2026-11-27 single flags "
            "read 0.94-1.30 in one run and 0.94-1.10 in the next, with no flag above 1.0 in both shapes of "
            "both runs, so none became a default:\n\n"
            + table(["flags", "environment", "32x32x3 torch/JAX", "vs tl_jax", "28x28x1 torch/JAX", "vs tl_jax"],
                    rows))
    batch = _get(r, "batch", "ms") or {}
    rows = [[key.split("/b")[1], ms["torch"] / ms["tl_jax"], 1000 * int(key.split("/b")[1]) / ms["tl_jax"]]
            for key, ms in batch.items() if "torch" in ms and "tl_jax" in ms]
    if rows:
        out += ("\n\nBatch size (32x32x3, tl_jax step): \n\n"
                + table(["batch", "torch/JAX", "JAX examples/s"], rows))
    return out


def generic_md(r: dict) -> str:
    rows = [[k, v if isinstance(v, (int, float, str)) else str(v)] for k, v in r.items() if not k.startswith("_")]
    return table(["figure", "value"], rows)


def render(results: dict) -> str:
    m, v, s = results["machine"], results["versions"], results["sections"]
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`python -m benchmarks.run`{' --quick' if results.get('quick') else ''}) "
             f"on {m['date']} in {results['total_s'] / 60:.1f} min. Every figure is a ratio of timings taken in "
             "this run, interleaved round by round; absolute times only orient. The machine was shared with other "
             f"work (load average {fmt(m['loadavg'][0], 1) if m.get('loadavg') else 'n/a'} at the start, "
             f"{fmt(results['loadavg_end'][0], 1) if results.get('loadavg_end') else 'n/a'} at the end): "
             "re-run `make bench` on a quiet machine for figures to quote.", "",
             f"**Machine**: {m['cores']} cores, {m['cpu']}, "
             f"{fmt(m['memory_gib'], 0) if m.get('memory_gib') else '?'} GiB, {m['platform']}.  ",
             "**Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             "## Goals", "", summary(s), ""]
    renderers = {"overhead": ("1. No overhead: the training loop vs a hand-written jit loop", overhead_md),
                 "conv": ("2. The CPU convolution gap", conv_md),
                 "cache": ("3-4. Feature cache and input pipeline", cache_md),
                 "compile": ("5. Compilation: cold vs warm start", None),
                 "memory": ("6. Memory", None),
                 "parallel": ("Devices: sharded jit vs pmap (benchmarks/parallel_bench.py)", None),
                 "sweep": ("Vectorised sweep vs sequential runs (benchmarks/sweep_bench.py)", None),
                 "shard": ("Sweep tasks: --shard start-up per point, Ray task per point (benchmarks/shard_bench.py)",
                           None),
                 "methods": ("Adaptation, regularisation and distillation methods: step vs plain fine-tuning "
                             "(benchmarks/methods_bench.py)", None),
                 "byo": ("Your own model and data: NNX vs linen, in-memory data (benchmarks/byo_bench.py)", None),
                 "recipes": ("Choosing and fine-tuning: ranking, few-shot ridge, gradient accumulation "
                             "(benchmarks/recipes_bench.py)", None),
                 "pipeline": ("Strong augmentation: the input pipeline vs the train steps' appetite "
                              "(benchmarks/pipeline_bench.py)", pipeline_bench.render),
                 "transferability": ("Transferability scores vs Transfer-Learning-Library "
                                     "(benchmarks/transferability_bench.py)", None),
                 "vit": ("Pretrained backbones: tl_jax's ViT vs timm on this CPU (benchmarks/vit_bench.py)",
                         vit_bench.render),
                 "peft": ("Parameter-efficient fine-tuning: LoRA vs full fine-tuning of a ViT-S/16 "
                          "(benchmarks/peft_bench.py)", peft_bench.render),
                 "gpu": ("7. GPU: ResNet-50 224x224 bf16", None)}
    for name, (title, fn) in renderers.items():
        if name not in s:
            continue
        res = s[name]
        lines += [f"## {title}", ""]
        err = _error(res)
        if err and name != "gpu":
            lines += [err, ""]
            continue
        if name == "compile":
            c, w = res["cold"], res["warm"]
            lines += [table(["start", "compile_s", "process wall s"],
                            [["cold (empty cache dir), best round", c["compile_s"], c["process_s"]],
                             ["warm (same cache dir), best round", w["compile_s"], w["process_s"]],
                             ["warm / cold", res["compile_ratio"], res["process_ratio"]]])]
            if res.get("round_ratios"):
                lines += ["", f"Best of {res['rounds']} rounds (each a new cache directory) on each side; each "
                          "round's own warm / cold compile_s: "
                          + ", ".join(f"{x:.3f}" for x in res["round_ratios"]) + ". The warm start still traces "
                          "and lowers the steps (JAX caches compiled programs, keyed by the lowered module); only "
                          "XLA's compile is replaced by the cache load."]
        elif name == "memory":
            rows = [[k, d["params"] / 2**20, d["finetune"] / 2**20, d["linear_probe"] / 2**20, f"{d['ratio']:.4f}"]
                    for k, d in res.items() if isinstance(d, dict) and "ratio" in d]
            lines += ["Adam state (MiB) by `tl_jax.params.build_optimizer`; frozen params hold none.", "",
                      table(["model", "params MiB", "fine-tune state MiB", "probe state MiB", "probe / fine-tune"],
                            rows), ""]
            demo = res.get("demo", {})
            lines += [f"Peak RSS of the demo study (`--sweep {demo.get('sweep')}`: source pretraining + "
                      f"{demo.get('runs', '?') - 1 if isinstance(demo.get('runs'), int) else '?'} target runs, one "
                      f"process): **{fmt(demo.get('peak_rss_mib'), 0)} MiB** ({fmt(demo.get('seconds'), 0)} s)."
                      if "peak_rss_mib" in demo else f"Demo peak RSS: {demo.get('error', 'n/a')}"]
        elif name == "gpu" and err:
            lines += [f"{err[0].upper()}{err[1:]}. On a machine with a GPU, `make bench` runs "
                      "`python -m benchmarks.gpu_bench --worker` (tl_jax's ResNet-50 step in bfloat16, batch 256) "
                      "and reports its step time and MFU against the device's dense bf16 peak here."]
        elif fn is not None:
            lines += [fn(res)]
        else:
            lines += [res["markdown"] if "markdown" in res else generic_md(res)]
        lines += ["", f"*{res.get('_seconds', 0):.0f} s*", ""]
    return "\n".join(lines).rstrip() + "\n"
