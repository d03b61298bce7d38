"""Issue 22's speed goals, side by side in one process: ranking vs fine-tuning, few-shot ridge vs an SGD
linear probe, gradient accumulation vs one big batch.

* **ranking**: ``K`` small-CNN sources (the demo's source stage cut to 150, 60 and 20 steps) are ranked on
  optdigits 10-shot by every score of :mod:`tl_jax.transferability` (``rank``: target examples, features,
  6 scores; the first call of the process, its compilation included) and each is fine-tuned with the demo's
  ``finetune`` settings (150 steps, 10 shots, seeds 0-2: the demo's table and the ranking experiment's
  ground truth are means over 3 seeds); figure = Σ fine-tune wall s / rank wall s (goal >= 100), also
  given for seed 0 alone.
* **few-shot ridge**: :func:`~tl_jax.evaluation.fewshot_ridge.fewshot_run` on the 150-step source (4 shots x
  3 seeds x 21 L2 values: the fits; the features are extracted once, reported apart) vs one SGD linear probe
  at 10 shots (the demo's ``linear_probe``: 150 steps on cached features, seed 0): figure = the probe's
  wall s / the ridge's seconds (goal >= 20), and 10-shot ridge accuracy (mean of 3 draws) minus the
  probes' (mean of seeds 0-2; goal within 0.01).
* **accumulation**: the demo source stage's step (CNN 28x28x1, Adam) with ``config.optimizer.accum_steps``
  = 2 and 4 on the same B examples vs one step on them, B = 64 and 256, timed interleaved (best round);
  figure = step_k / step_1 (goal <= 1.05). Also step_k / (k x a plain step on B/k examples): what the
  accumulation itself adds to running its micro-batches. On XLA:CPU a step on B/2 examples costs far more
  than half a step on B when B is small, so small micro-batches are slow whoever accumulates them.
"""
from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any

from benchmarks.common import ROOT, interleaved, table

DEMO = str(ROOT / "experiments" / "mnist_to_digits.py")
SOURCE_STEPS = (150, 60, 20)
ACCUM_BATCHES = (64, 256)
# accumulation variant -> (micro-batches k, the plain step on B/k examples it is also compared with)
ACCUM = {"accum2": (2, "plain_half"), "accum4": (4, "plain_quarter")}


def _config(arg: str, data_dir: str, **over):
    from tl_jax import config as config_lib

    c = config_lib.load_config(f"{DEMO}:{arg}")
    c.data.data_dir = data_dir
    c.train.progress = False
    c.tracking.tensorboard = False
    for k, v in over.items():
        config_lib.set_value(c, k, v)
    return c


def _accumulation(data_dir: str, quick: bool, batch_size: int) -> dict[str, Any]:
    """Step time with ``accum_steps`` 2 and 4 over the same ``batch_size`` examples vs one step on all of them."""
    import jax
    import numpy as np

    from tl_jax.parallel import mesh as mesh_lib
    from tl_jax.train.build import build_model_and_state
    from tl_jax.train.programs import pure_train_step

    r = np.random.default_rng(0)
    batch = {"image": r.normal(size=(batch_size, 28, 28, 1)).astype(np.float32),
             "label": (np.arange(batch_size) % 10).astype(np.int32)}
    steps = {}
    variants = [("accum1", 1, batch_size)] + [(n, k, batch_size) for n, (k, _) in ACCUM.items()]
    variants += [(plain, 1, batch_size // k) for k, plain in ACCUM.values()]
    for name, k, b in variants:
        c = _config("stage=source", data_dir, **{"optimizer.accum_steps": k, "data.batch_size": b})
        part = {n: v[:b] for n, v in batch.items()}
        obj, tx, state = build_model_and_state(c, 10, {n: v[:1] for n, v in batch.items()}, mesh_lib.make_mesh(1))
        fn = jax.jit(pure_train_step(c, obj, tx, state.params, grad_norm=False)).lower(state, part).compile()
        steps[name] = (fn, state, part)
    times = interleaved({n: (lambda n=n: steps[n][0](steps[n][1], steps[n][2])) for n in steps},
                        rounds=2 if quick else 5, reps=3 if quick else 10, sync=jax.block_until_ready)
    return {"step_ms": {n: 1e3 * t for n, t in times.items()},
            "ratios": {n: times[n] / times["accum1"] for n in ACCUM},
            # the accumulation's own cost: k micro-batches in one step vs k separate steps of the micro-batch size
            "vs_micro_steps": {n: times[n] / (k * times[plain]) for n, (k, plain) in ACCUM.items()}}


def run(data_dir: str, quick: bool = False) -> dict[str, Any]:
    from tl_jax.train.loop import train
    from tl_jax.transferability import DEFAULT_SCORES
    from tl_jax.evaluation.fewshot_ridge import fewshot_run
    from tl_jax.transferability.ranking import rank

    root = pathlib.Path(tempfile.mkdtemp(prefix="tl_jax_bench_recipes_"))
    sources = {n: root / f"source_{n}" for n in SOURCE_STEPS}
    for n, wd in sources.items():
        train(_config("stage=source", data_dir, **{"train.steps": n, "train.checkpoint_every": n}), str(wd))
    target = _config("stage=target,shots=10,seed=0", data_dir)
    ft_seed_s = {seed: 0.0 for seed in range(3)}
    for n, wd in sources.items():
        for seed in ft_seed_s:
            t0 = time.perf_counter()
            train(_config(f"stage=target,method=finetune,shots=10,seed={seed},source={wd}", data_dir),
                  str(root / f"ft_{n}_{seed}"))
            ft_seed_s[seed] += time.perf_counter() - t0
    ft_s = sum(ft_seed_s.values())
    t0 = time.perf_counter()
    rank(target, [str(wd) for wd in sources.values()], scores=DEFAULT_SCORES)
    rank_s = time.perf_counter() - t0

    best = sources[SOURCE_STEPS[0]]
    probe_acc, probe_s = [], []
    for seed in range(3):
        t0 = time.perf_counter()
        s = train(_config(f"stage=target,method=linear_probe,shots=10,seed={seed},source={best}", data_dir),
                  str(root / f"lp_{seed}"))
        probe_s.append(time.perf_counter() - t0)
        probe_acc.append(s["test/accuracy"])
    fs = fewshot_run(str(best), target, shots=(1, 5, 10, 25), seeds=3)
    ridge10 = fs["shots"][10]["accuracy"]
    acc = {b: _accumulation(data_dir, quick, b) for b in ACCUM_BATCHES}
    out = {"rank_s": rank_s, "finetune_s": ft_s, "rank_ratio": ft_s / rank_s, "candidates": len(sources),
           "finetune_seed0_s": ft_seed_s[0], "rank_ratio_seed0": ft_seed_s[0] / rank_s,
           "ridge_s": fs["seconds"], "extract_s": fs["extract_s"], "probe_s": probe_s[0],
           "fewshot_ratio": probe_s[0] / fs["seconds"], "fewshot_ratio_with_extraction":
           probe_s[0] / (fs["seconds"] + fs["extract_s"]), "ridge10": ridge10,
           "probe10": sum(probe_acc) / len(probe_acc), "accumulation": acc}
    rows = [[f"rank {len(sources)} candidates (6 scores) vs fine-tune them (3 seeds each)",
             f"{ft_s:.1f} s / {rank_s:.2f} s", out["rank_ratio"], ">= 100", "yes" if out["rank_ratio"] >= 100 else "no"],
            [f"rank {len(sources)} candidates vs fine-tune them (seed 0 only)",
             f"{ft_seed_s[0]:.1f} s / {rank_s:.2f} s", out["rank_ratio_seed0"], "-", "-"],
            ["few-shot ridge (4 shots x 3 seeds x 21 L2) vs one SGD linear probe (10 shots)",
             f"{probe_s[0]:.2f} s / {fs['seconds']:.3f} s (+{fs['extract_s']:.2f} s features)",
             out["fewshot_ratio"], ">= 20", "yes" if out["fewshot_ratio"] >= 20 else "no"],
            ["10-shot accuracy: ridge (3 draws) - probe (3 seeds)", f"{ridge10:.4f} - {out['probe10']:.4f}",
             ridge10 - out["probe10"], ">= -0.01", "yes" if ridge10 - out["probe10"] >= -0.01 else "no"]]
    rows += [[f"accumulation {k} x {b // k} vs 1 x {b} (step time, same examples)",
              f"{a['step_ms'][n]:.1f} / {a['step_ms']['accum1']:.1f} ms", a["ratios"][n], "<= 1.05",
              "yes" if a["ratios"][n] <= 1.05 else "no"] for b, a in acc.items() for n, (k, _) in ACCUM.items()]
    rows += [[f"accumulation {k} x {b // k} vs {k} plain steps of {b // k} (the machinery's own cost)",
              f"{a['step_ms'][n]:.1f} / {k} x {a['step_ms'][plain]:.1f} ms", a["vs_micro_steps"][n], "-", "-"]
             for b, a in acc.items() for n, (k, plain) in ACCUM.items()]
    out["markdown"] = table(["figure", "times", "ratio", "goal", "met"], rows)
    return out


if __name__ == "__main__":
    import json
    import sys

    res = run(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else tempfile.mkdtemp(),
              quick="--quick" in sys.argv)
    print(res["markdown"])
    print(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1, default=str))
