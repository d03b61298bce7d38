"""Seed 000: a CNN pretrained on MNIST, then transferred with SGD (momentum 0.9): feature- vs model-based.

One command (phase 0 pretrains the source CNN, phase 1 runs the three methods side by side)::

    tl-jax sweep --config experiments/seeds/s000_mnist_finetune.py --workdir runs/seeds/s000

What it reproduces from the document: its PyTorch CNN trained with ``optim.SGD(lr, momentum=0.9)``,
and its two kinds of knowledge transfer: *feature-based* (the pretrained conv features frozen, a new
classifier trained on them: ``method=feature``) and *model-based* (the whole pretrained model
fine-tuned: ``method=model``), against training from scratch (``method=scratch``).

``data=embedded`` (default): source mnist5k (4,000 images), target optdigits (10 labelled 8x8 digits per
class, drawn onto MNIST's 28x28 frame), tested on the 450 optdigits test digits. ``data=catalogue``: source
``mnist`` (60,000), target ``svhn_cropped`` (street-view house numbers, grey 28x28), 10 shots per class;
prepare both with ``tfds build NAME --file_format=array_record`` and pass ``--config.data.data_dir``.

Printed on the embedded stand-ins (2026-12-06, 2 CPU cores shared with other jobs; source 300 steps of 64,
target 150 steps of 32 at SGD lr 0.01, 10 shots, seed 0; 2 min 41 s for the whole sweep)::

    source (mnist5k test, 1,000 images): test/accuracy=0.9700
    | method | test/accuracy |          (optdigits test, 450 digits)
    | scratch | 0.927 |
    | feature | 0.958 |
    | model | 0.949 |
"""
from __future__ import annotations

from tl_jax import config as config_lib
from tl_jax.sweep import product

MNIST_NORM = {"op": "normalize", "mean": 0.1307, "std": 0.3081}
METHODS = {  # method -> (loads the source run, param_rules)
    "scratch": (False, [[".*", 1.0]]),
    "feature": (True, [["backbone/.*", None], [".*", 1.0]]),  # feature-based: frozen conv features + new head
    "model": (True, [[".*", 1.0]]),                            # model-based: every param fine-tuned
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="target", method="model", data="embedded", shots=10, seed=0,
                             source="runs/seeds/s000/source", lr=0.01, steps=0)
    if a.data not in ("embedded", "catalogue"):
        raise config_lib.ConfigError(f"data={a.data!r}: expected 'embedded' or 'catalogue'")
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "cnn"
    c.model.num_classes = 10
    c.optimizer.name = "sgd"  # the document's optim.SGD(..., momentum=0.9)
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = a.lr
    c.train.progress = False
    c.train.log_every = 50
    if a.stage == "source":
        c.data.name = "mnist5k" if a.data == "embedded" else "mnist"
        pp = [{"op": "rescale", "in_max": 255.0}, MNIST_NORM]
        c.data.train_pp, c.data.eval_pp = pp, list(pp)
        c.data.batch_size = 64
        c.train.steps = a.steps or 300
    elif a.stage == "target":
        if a.method not in METHODS:
            raise config_lib.ConfigError(f"method={a.method!r}: known methods {sorted(METHODS)}")
        if a.data == "embedded":
            c.data.name = "optdigits"
            pp = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 20}, {"op": "pad", "size": 28},
                  MNIST_NORM]
        else:
            c.data.name = "svhn_cropped"
            pp = [{"op": "rescale", "in_max": 255.0}, {"op": "to_gray"}, {"op": "resize", "size": 28}, MNIST_NORM]
        c.data.train_pp, c.data.eval_pp = pp, list(pp)
        c.data.shots = a.shots  # 0 = all examples
        c.data.shots_seed = a.seed
        c.data.batch_size = 32
        c.train.steps = a.steps or 150
        pretrained, rules = METHODS[a.method]
        c.init_from = a.source if pretrained else ""
        c.param_rules = rules
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'source' or 'target'")
    c.train.checkpoint_every = c.train.steps
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Phase 0: the source CNN; phase 1: every method on the target (``seeds`` seeds each)."""
    a = config_lib.parse_arg(arg, data="embedded", shots=10, seeds=1)
    source = {"stage": "source", "data": a.data, "_name": "source", "_report": False}
    target = {"stage": "target", "data": a.data, "shots": a.shots, "source": "{workdir}/source", "_phase": 1}
    return [source] + product(target, method=list(METHODS), seed=list(range(a.seeds)))
