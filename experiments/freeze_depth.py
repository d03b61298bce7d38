"""Freeze-depth ablation: how much of the mnist5k-pretrained CNN to freeze when fine-tuning on optdigits.

The source stage is ``experiments/mnist_to_digits.py``'s (``stage=source``: the
CNN pretrained on mnist5k, 600 steps); the target stage is its ``finetune``
method on optdigits with ``shots`` labelled digits per class, with the first
``depth`` layers of the backbone frozen (``config.param_rules``):

* ``none``: every param trains;
* ``conv1``: ``backbone/conv1`` frozen;
* ``conv2``: ``backbone/conv1`` + ``backbone/conv2`` frozen (only ``fc`` and the head train);
* ``backbone``: the whole backbone frozen (a linear probe).

Run the whole ablation (pretraining, 4 depths x 3 seeds, report)::

    tl-jax sweep --config experiments/freeze_depth.py --workdir runs/freeze_depth
    tl-jax sweep --config experiments/freeze_depth.py:shots=1,source=runs/freeze_depth/source \
        --workdir runs/freeze_depth_1shot --vectorize off

or one point::

    tl-jax train --config experiments/freeze_depth.py:stage=target,depth=conv2,source=runs/freeze_depth/source \\
        --workdir runs/fd_conv2

The table it printed is in README.md ("Ablations and sweeps").
"""
from __future__ import annotations

from tl_jax import config as config_lib
from tl_jax.sweep import product, seeds
from tl_jax.sweep.study import sibling_module

DEPTHS = {
    "none": [[".*", 1.0]],
    "conv1": [["backbone/conv1/.*", None], [".*", 1.0]],
    "conv2": [["backbone/conv[12]/.*", None], [".*", 1.0]],
    "backbone": [["backbone/.*", None], [".*", 1.0]],
}


def _mnist_to_digits():
    return sibling_module(__file__, "mnist_to_digits.py")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="target", depth="none", shots=10, seed=0, source="runs/freeze_depth/source")
    base = _mnist_to_digits()
    if a.stage == "source":
        return base.get_config("stage=source")
    if a.depth not in DEPTHS:
        raise config_lib.ConfigError(f"depth={a.depth!r}: known depths {list(DEPTHS)}")
    c = base.get_config(f"stage=target,method=finetune,shots={a.shots},seed={a.seed},source={a.source}")
    c.param_rules = DEPTHS[a.depth]
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Pretraining (phase 0, not in the report), then depth x seed fine-tuning runs (phase 1).

    ``source=DIR``: fine-tune from an existing pretrained workdir instead (no pretraining point).
    """
    a = config_lib.parse_arg(arg, seeds=3, shots=10, depths=";".join(DEPTHS), source="")
    target = {"stage": "target", "source": a.source or "{workdir}/source", "_phase": 1}
    if a.shots != 10:
        target["shots"] = a.shots
    source = [] if a.source else [{"stage": "source", "_name": "source", "_report": False}]
    return source + product(product(target, depth=a.depths.split(";")), seeds(a.seeds))
