"""MNIST (mnist5k) -> UCI optdigits transfer with the small CNN.

Stages (``get_config`` argument ``stage=...``):

* ``source``: pretrain the CNN on the 4,000 mnist5k train images::

    tl-jax train --config experiments/mnist_to_digits.py:stage=source --workdir runs/src

  printed ``test/accuracy=0.980`` (1,000 test images) in 21 s on 2 cores (2026-11-27).
  ``evals=1`` adds a few-shot ridge evaluation of the features on optdigits every
  100 steps (``fewshot/optdigits/{1,5,10}shot`` in metrics.jsonl).

* ``target``: optdigits (8x8, 0..16) mapped onto MNIST's frame (resize to
  20x20, pad to 28x28, same normalisation), ``shots`` labelled examples per
  class (sampled with ``seed``), evaluated on all 450 optdigits test digits::

    tl-jax train --config experiments/mnist_to_digits.py:stage=target,shots=10 --workdir runs/ft \\
        --config.init_from=runs/src --config.param_rules='[["backbone/.*", null], [".*", 1.0]]'

  ``method=`` sets init_from/param_rules for the four methods of the study:
  ``scratch``, ``linear_probe`` (backbone frozen), ``finetune`` (all params),
  ``finetune_lr0.1`` (backbone at 0.1x the learning rate); ``source=DIR``
  names the pretrained workdir (default runs/demo/source).

The whole study (``make demo``, ``python experiments/mnist_to_digits.py``)
pretrains once, runs {4 methods} x {1, 10 shots} x {3 seeds} and writes
``results.md``, ``results.csv`` and ``results.png`` into ``runs/demo``; the
table it printed is in README.md.
"""
from __future__ import annotations

import argparse
import sys

from tl_jax import config as config_lib

MNIST_NORM = {"op": "normalize", "mean": 0.1307, "std": 0.3081}
# optdigits (8x8, 0..16) onto MNIST's frame: the digit resized to 20x20 and padded to 28x28, same normalisation.
DIGITS_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 20}, {"op": "pad", "size": 28}, MNIST_NORM]
METHODS = {
    "scratch": (False, [[".*", 1.0]]),
    "linear_probe": (True, [["backbone/.*", None], [".*", 1.0]]),
    "finetune": (True, [[".*", 1.0]]),
    "finetune_lr0.1": (True, [["backbone/.*", 0.1], [".*", 1.0]]),
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="source", shots=0, seed=0, method="", source="runs/demo/source", evals=0)
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "cnn"
    c.model.num_classes = 10
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    if a.stage == "source":
        c.data.name = "mnist5k"
        # Random 28x28 crops of the 2-px padded digit: features that tolerate the
        # shifts and stroke styles of the target domain (+0.015-0.03 transfer at 10 shots).
        c.data.train_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "random_crop", "size": 28, "pad": 2},
                           MNIST_NORM]
        c.data.eval_pp = [{"op": "rescale", "in_max": 255.0}, MNIST_NORM]
        c.data.batch_size = 64
        c.data.eval_batch_size = 250
        c.train.steps = 600
        c.train.log_every = 50
        c.train.checkpoint_every = 300
        if a.evals:  # optdigits few-shot ridge on the features every 100 steps (tl_jax/evaluation/evaluators.py)
            c.evals = [{"kind": "fewshot", "name": "optdigits", "every": 100, "dataset": "optdigits",
                        "eval_pp": list(DIGITS_PP), "shots": [1, 5, 10], "seeds": 3}]
    elif a.stage == "target":
        c.data.name = "optdigits"
        c.data.train_pp = list(DIGITS_PP)
        c.data.eval_pp = list(DIGITS_PP)
        c.data.shots = a.shots or None
        c.data.shots_seed = a.seed
        c.data.batch_size = 32
        c.data.eval_batch_size = 250
        c.train.steps = 150
        c.train.log_every = 10  # 15 points per curve in curves.png (the numbers do not depend on it)
        c.train.checkpoint_every = 150
        if a.method:
            if a.method not in METHODS:
                raise config_lib.ConfigError(f"method={a.method!r}: known methods {sorted(METHODS)}")
            pretrained, rules = METHODS[a.method]
            c.init_from = a.source if pretrained else ""
            c.param_rules = rules
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'source' or 'target'")
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """The demo study's target-stage points: method x shots x seed (as get_config args)."""
    a = config_lib.parse_arg(arg, shots="1;10", seeds=3, methods=";".join(METHODS))
    return [dict(stage="target", method=m, shots=int(k), seed=s)
            for m in a.methods.split(";") for k in a.shots.split(";") for s in range(a.seeds)]


def get_search(arg: str | None = None) -> dict:
    """The learning rate of the 10-shot fine-tune, chosen by Optuna on a validation split (never test).

    The validation digits (``val_fraction``, stratified) are carved out of optdigits' *training* split
    before the 10 shots per class are drawn from the rest::

        tl-jax train --config experiments/mnist_to_digits.py:stage=source --workdir runs/demo/source
        tl-jax search --config experiments/mnist_to_digits.py --workdir runs/lr_search --trials 10
        # the default learning rate (1e-3), same split, for comparison:
        tl-jax train --config experiments/mnist_to_digits.py:stage=target,method=finetune,shots=10 \
            --config.data.val_fraction=0.2 --workdir runs/lr_default
    """
    from tl_jax.sweep.search import loguniform

    a = config_lib.parse_arg(arg, source="runs/demo/source", shots=10, seed=0, val_fraction=0.2)
    return {"space": {"config.optimizer.learning_rate": loguniform(1e-4, 3e-2)},
            "metric": "val/accuracy", "direction": "maximize", "startup_trials": 4,
            "fixed": {"stage": "target", "method": "finetune", "shots": a.shots, "seed": a.seed,
                      "source": a.source, "config.data.val_fraction": a.val_fraction}}


def main(argv: list[str] | None = None) -> int:
    """Run the whole study: source pretraining, then every target point, then the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--sweep", default="", help="get_sweep argument, e.g. 'shots=10,seeds=1'")
    args = p.parse_args(argv)
    from tl_jax.sweep.study import run_transfer_study

    return run_transfer_study(__file__, args.workdir, get_sweep(args.sweep or None))


if __name__ == "__main__":
    sys.exit(main())
