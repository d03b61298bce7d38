"""Which source to transfer to optdigits (10 shots)? Transferability scores vs fine-tuned accuracy.

Eight candidate sources of the small CNN that differ in what they learned
(``get_sweep``: ``name=`` points of ``stage=source``):

* source dataset: ``mnist5k`` (28x28 MNIST digits) vs ``optdigits`` (the target's own
  train split, 8x8 digits in MNIST's frame: an in-domain source);
* training length: 20, 100 or 300 steps (and ``random``: 1 step of a tiny learning
  rate, i.e. a random init, the deliberately bad one);
* width: ``cnn`` width 1 vs 2.

Each candidate is (a) ranked on the target's 10-shot train set by every score of
:mod:`tl_jax.transferability` at two layers (``features`` = the backbone output,
``backbone/conv2`` = the second conv's map averaged over positions), and (b)
fine-tuned on it with the demo's ``finetune`` settings (``mnist_to_digits.py``:
``stage=target,method=finetune,shots=10``, 150 steps, all 450 optdigits test digits).
The table gives each score's Kendall τ against the fine-tuned test accuracy, and
the time to rank all candidates vs the time to fine-tune all of them; then the
few-shot ridge evaluator (1/5/10/25 shots x 3 seeds x 21 L2 values) vs one SGD
linear probe (``method=linear_probe``, 10 shots) on the best mnist5k source.

    python experiments/rank_sources.py --workdir runs/rank_sources [--seeds 1]

or pieces::

    tl-jax train --config experiments/rank_sources.py:stage=source,name=mnist_w1_300 --workdir runs/rs/mnist_w1_300
    tl-jax rank --target experiments/mnist_to_digits.py:stage=target,shots=10 --candidates runs/rs/*_*

With ``--seeds 3`` it printed (2 busy CPU cores, 2026-12-06) Kendall τ against the fine-tuned accuracy,
at the backbone output: TransRate +0.86, LogME +0.79, LEEP +0.79, NCE +0.71, H-score n/a (9 = C-1 for
every candidate: N <= D), Ledoit-Wolf H-score -0.07; ranking all 8 took 2.7 s vs 403 s to fine-tune them
(3 seeds); the 10-shot ridge 0.9511 vs one SGD probe 0.9600. The whole table is in docs/transferability.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from tl_jax import config as config_lib
from tl_jax.sweep.study import sibling_module

# name: (dataset, steps, width, learning rate)
SOURCES = {
    "mnist_w1_300": ("mnist5k", 300, 1, 1e-3),
    "mnist_w1_100": ("mnist5k", 100, 1, 1e-3),
    "mnist_w1_20": ("mnist5k", 20, 1, 1e-3),
    "mnist_w2_300": ("mnist5k", 300, 2, 1e-3),
    "mnist_w2_20": ("mnist5k", 20, 2, 1e-3),
    "optdigits_w1_300": ("optdigits", 300, 1, 1e-3),
    "optdigits_w1_20": ("optdigits", 20, 1, 1e-3),
    "random_w1": ("mnist5k", 1, 1, 1e-9),
}
LAYERS = ("features", "backbone/conv2")


def _mnist_to_digits():
    return sibling_module(__file__, "mnist_to_digits.py")


def get_config(arg: str | None = None):
    """``stage=source,name=N``: pretrain source ``N``; ``stage=target,name=N,source=DIR,method=M,seed=S``:
    fine-tune (or linear-probe) it on optdigits 10-shot with the demo's settings."""
    a = config_lib.parse_arg(arg, stage="source", name="mnist_w1_300", source="", method="finetune", seed=0,
                             shots=10)
    if a.name not in SOURCES:
        raise config_lib.ConfigError(f"name={a.name!r}: known sources {list(SOURCES)}")
    dataset, steps, width, lr = SOURCES[a.name]
    base = _mnist_to_digits()
    if a.stage == "source":
        c = base.get_config("stage=source")
        if dataset == "optdigits":  # the target's train split in MNIST's frame, as the target stage reads it
            t = base.get_config("stage=target")
            c.data.name, c.data.train_pp, c.data.eval_pp = "optdigits", t.data.train_pp, t.data.eval_pp
        c.train.steps = steps
        c.train.checkpoint_every = steps
        c.optimizer.learning_rate = lr
    elif a.stage == "target":
        c = base.get_config(f"stage=target,method={a.method},shots={a.shots},seed={a.seed},source={a.source}")
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'source' or 'target'")
    c.model.kwargs = {"width": width}
    c.train.log_every = max(1, min(c.train.log_every, c.train.steps))
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """The candidate sources (``stage=source`` points)."""
    return [dict(stage="source", name=n) for n in SOURCES]


def _train(spec: str, workdir: pathlib.Path, data_dir: str | None) -> dict:
    from tl_jax.train.loop import train

    c = get_config(spec)
    if data_dir:
        c.data.data_dir = data_dir
    t0 = time.perf_counter()
    summary = train(c, str(workdir))
    return {**summary, "seconds": time.perf_counter() - t0}


def _tau(kendalltau, scores: list[float], acc: list[float]) -> float:
    """Kendall τ (b) of a score against the accuracies; NaN for a score that is constant up to rounding."""
    import numpy as np

    if np.ptp(scores) <= 1e-6 * max(1.0, float(np.abs(scores).max())):
        return float("nan")
    return float(kendalltau(scores, acc)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/rank_sources")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (shots drawn per seed)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    import numpy as np
    from scipy.stats import kendalltau

    from tl_jax.transferability import DEFAULT_SCORES
    from tl_jax.evaluation.fewshot_ridge import fewshot_run
    from tl_jax.transferability.ranking import rank

    root = pathlib.Path(args.workdir).absolute()
    t0 = time.perf_counter()
    src = {n: root / "sources" / n for n in SOURCES}
    pretrain_s = sum(_train(f"stage=source,name={n}", wd, args.data_dir)["wall_s"] for n, wd in src.items())
    acc, ft_s = {}, 0.0
    for n in SOURCES:  # the actual transfer: fine-tune each candidate
        runs = [_train(f"stage=target,name={n},source={src[n]},seed={s}", root / "finetune" / f"{n}_s{s}",
                       args.data_dir) for s in range(args.seeds)]
        acc[n] = float(np.mean([r["test/accuracy"] for r in runs]))
        ft_s += sum(r["wall_s"] for r in runs)  # as the runs recorded it (a finished run is not trained again)
    target = _mnist_to_digits().get_config("stage=target,shots=10,seed=0")
    if args.data_dir:
        target.data.data_dir = args.data_dir
    tables, tau, rank_s = {}, {}, {}
    for layer in LAYERS:
        t1 = time.perf_counter()
        rows = rank(target, [str(src[n]) for n in SOURCES], layer=layer, scores=DEFAULT_SCORES)
        rank_s[layer] = time.perf_counter() - t1
        by = {pathlib.Path(r["candidate"]).name: r for r in rows}
        tables[layer] = by
        tau[layer] = {s: _tau(kendalltau, [by[n][s] for n in SOURCES], [acc[n] for n in SOURCES])
                      for s in DEFAULT_SCORES}
    # few-shot ridge vs one SGD linear probe at 10 shots, on the best-fine-tuned mnist5k source
    best = max((n for n in SOURCES if SOURCES[n][0] == "mnist5k"), key=acc.get)
    lp = _train(f"stage=target,name={best},source={src[best]},method=linear_probe,seed=0",
                root / "linear_probe" / best, args.data_dir)
    fs = fewshot_run(str(src[best]), target, shots=(1, 5, 10, 25), seeds=3)
    lines = [f"| source | fine-tuned acc ({args.seeds} seed{'s' if args.seeds > 1 else ''}) | "
             + " | ".join(f"{s} ({'conv2' if layer != 'features' else 'feat'})" for layer in LAYERS
                          for s in DEFAULT_SCORES) + " |",
             "|---|---|" + "---|" * (len(LAYERS) * len(DEFAULT_SCORES))]
    for n in sorted(SOURCES, key=lambda n: -acc[n]):
        lines.append(f"| {n} | {acc[n]:.4f} | " + " | ".join(f"{tables[layer][n][s]:.4g}" for layer in LAYERS
                                                            for s in DEFAULT_SCORES) + " |")
    fmt_tau = lambda t: f"**{t:+.2f}**" if t == t else "n/a (constant)"  # noqa: E731 - NaN: a constant score
    lines.append("| **Kendall τ** | | " + " | ".join(fmt_tau(tau[layer][s]) for layer in LAYERS
                                                      for s in DEFAULT_SCORES) + " |")
    report = "\n".join(lines)
    report += (f"\n\npretraining {len(SOURCES)} sources: {pretrain_s:.0f} s; fine-tuning all {len(SOURCES)} x "
               f"{args.seeds} seed(s): {ft_s:.1f} s; ranking all {len(SOURCES)} (6 scores): "
               + ", ".join(f"{layer} {rank_s[layer]:.1f} s" for layer in LAYERS)
               + f"; ratio fine-tune/rank(features) = {ft_s / rank_s['features']:.1f}x\n")
    r10 = fs["shots"][10]
    report += (f"\nfew-shot ridge on {best} (features): "
               + ", ".join(f"{k}-shot {v['accuracy']:.4f}" for k, v in fs["shots"].items())
               + f" ({len(fs['shots'])} shots x 3 seeds x {len(fs['l2s'])} L2 values in {fs['seconds']:.2f} s"
               f" + {fs['extract_s']:.2f} s features); one SGD linear probe at 10 shots (150 steps): "
               f"accuracy {lp['test/accuracy']:.4f} in {lp['wall_s']:.1f} s; "
               f"ratio {lp['wall_s'] / fs['seconds']:.1f}x (ridge only), "
               f"{lp['wall_s'] / (fs['seconds'] + fs['extract_s']):.1f}x (with extraction); "
               f"10-shot ridge - probe = {r10['accuracy'] - lp['test/accuracy']:+.4f}\n")
    (root / "results.md").write_text(report)
    (root / "results.json").write_text(json.dumps({"accuracy": acc, "tau": tau, "rank_s": rank_s, "finetune_s": ft_s,
                                                   "fewshot": {str(k): v for k, v in fs["shots"].items()},
                                                   "linear_probe": lp["test/accuracy"]}, indent=1))
    print(report)
    print(f"finished in {time.perf_counter() - t0:.0f} s; {root / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
