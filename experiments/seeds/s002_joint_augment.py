"""Seed 002: source and target trained at once, ``L = Σ_d Σ_i λ_{d,i} L_{d,i}``, with θ_fix / θ_upd groups.

One command (phase 0 pretrains the shared CNN, phase 1 trains the joint objective without and with θ_fix)::

    tl-jax sweep --config experiments/seeds/s002_joint_augment.py --workdir runs/seeds/s002

What it reproduces from the document: "同时学习" (learning source and target together) with one dataset
seen as two domains under different augmentation, the source with random horizontal flips + random crops,
the target centre-cropped (``config.objective.name='joint'``, domains ``source`` and ``target``); and its
split of the parameters into θ_fix (pretrained, kept fixed: the conv layers, ``fix=conv``) and θ_upd
(updated: the rest), against updating everything (``fix=none``), via ``config.param_rules``.

``data=embedded`` (default): both domains are mnist5k (source: all 4,000 train images, flip + random 28-px
crop of the 2-px padded digit; target: 10 labelled images per class, centre 20-px crop resized to 28), tasks
``digit`` and ``parity`` with λ = [[1, 0.5], [1, 0.5]] (``λ_{d,i}``: domain d, task i). ``data=catalogue``:
both domains cifar10 (flip + random 32-px crop of the 4-px padded image; centre 24-px crop resized to 32),
task ``digit`` (= the label), λ = [[1], [1]], a ResNet-18 with the CIFAR stem.

Printed on the embedded stand-ins (2026-12-06, 2 CPU cores shared with other jobs, 5 min for the sweep;
base 150 steps, joint 200 steps of 64 at Adam 1e-3, proportions 0.5/0.5, seed 0; mnist5k test, 1,000
images per domain: source uncropped, target centre-cropped)::

    base (plain classification, eval on uncropped digits): test/accuracy=0.9040
    | fix | test/accuracy (macro) | source/digit | source/parity | target/digit | target/parity |
    | none (θ_upd = all) | 0.943 | 0.935 | 0.969 | 0.901 | 0.967 |
    | conv (θ_fix = conv1, conv2) | 0.939 | 0.924 | 0.966 | 0.900 | 0.964 |
"""
from __future__ import annotations

from tl_jax import config as config_lib

MNIST_NORM = {"op": "normalize", "mean": 0.1307, "std": 0.3081}
CIFAR_NORM = {"op": "normalize", "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}
FIX = {  # fix -> param_rules: θ_fix (null: frozen) first, θ_upd (lr x1) after
    "none": [[".*", 1.0]],
    "conv": [["backbone/conv.*", None], [".*", 1.0]],
}


def _pps(embedded: bool) -> tuple[list, list, list]:
    """(source train_pp: flip + random crop, source eval_pp: none, target pp: centre crop) for the data mode."""
    base = [{"op": "rescale", "in_max": 255.0}]
    if embedded:
        source = base + [{"op": "flip_lr"}, {"op": "random_crop", "size": 28, "pad": 2}, MNIST_NORM]
        target = base + [{"op": "center_crop", "size": 20}, {"op": "resize", "size": 28}, MNIST_NORM]
        return source, base + [MNIST_NORM], target
    source = base + [{"op": "flip_lr"}, {"op": "random_crop", "size": 32, "pad": 4}, CIFAR_NORM]
    target = base + [{"op": "center_crop", "size": 24}, {"op": "resize", "size": 32}, CIFAR_NORM]
    return source, base + [CIFAR_NORM], target


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="joint", fix="conv", data="embedded", shots=10, seed=0,
                             base="runs/seeds/s002/base", steps=0)
    if a.data not in ("embedded", "catalogue"):
        raise config_lib.ConfigError(f"data={a.data!r}: expected 'embedded' or 'catalogue'")
    embedded = a.data == "embedded"
    source_pp, source_eval_pp, target_pp = _pps(embedded)
    c = config_lib.base_config()
    c.seed = a.seed
    if embedded:
        c.model.name = "cnn"
    else:
        c.model.name = "resnet18"
        c.model.kwargs = {"base_width": 64, "stem": "cifar"}
    c.model.num_classes = 10
    c.data.name = "mnist5k" if embedded else "cifar10"
    c.data.train_pp, c.data.eval_pp = source_pp, source_eval_pp  # domain 0 ("source") is config.data
    c.data.batch_size = 64
    c.data.eval_batch_size = 250
    c.optimizer.learning_rate = 1e-3
    c.train.progress = False
    c.train.log_every = 50
    if a.stage == "base":  # the pretrained θ that θ_fix keeps
        c.train.steps = a.steps or (150 if embedded else 5000)
    elif a.stage == "joint":
        if a.fix not in FIX:
            raise config_lib.ConfigError(f"fix={a.fix!r}: known θ_fix groups {sorted(FIX)}")
        c.train.steps = a.steps or (200 if embedded else 5000)
        c.init_from = a.base
        c.dont_load = ["head/.*"]
        c.param_rules = FIX[a.fix]
        c.objective.name = "joint"
        j = c.objective.joint
        j.domains = [{"name": "source", "dataset": "config.data"},
                     {"name": "target", "dataset": c.data.name, "train_pp": target_pp, "eval_pp": target_pp,
                      "shots": a.shots or None, "shots_seed": a.seed}]
        j.tasks = ["digit", "parity"] if embedded else ["digit"]
        j.weights = [[1.0, 0.5], [1.0, 0.5]] if embedded else [[1.0], [1.0]]
        j.proportions = [0.5, 0.5]
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'base' or 'joint'")
    c.train.checkpoint_every = c.train.steps
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Phase 0: the base model; phase 1: the joint objective with each θ_fix choice."""
    a = config_lib.parse_arg(arg, data="embedded", seeds=1, shots=10)
    base = {"stage": "base", "data": a.data, "_name": "base", "_report": False}
    joint = {"stage": "joint", "data": a.data, "shots": a.shots, "base": "{workdir}/base", "_phase": 1}
    return [base] + [{**joint, "fix": f, "seed": s, "_name": f"fix_{f}_seed{s}"} for f in FIX for s in range(a.seeds)]
