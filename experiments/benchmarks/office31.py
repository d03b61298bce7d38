"""Office-31 (Saenko et al. 2010): 31 office classes in three domains, the six unsupervised DA tasks, TLlib's
ResNet-50 protocol.

One run (``task`` one of A2W D2W W2D A2D D2A W2A; ``method`` one of source_only dann cdan mcc mdd mmd coral
self_training; ``weights`` a converted ImageNet ResNet-50, docs/models.md)::

    tl-jax train --workdir runs/office31/A2W_dann \\
        --config experiments/benchmarks/office31.py:task=A2W,method=dann,weights=pretrained/r50,data_dir=data

Every task x method (``methods`` ';'-separated, ``seeds``): ``tl-jax sweep --config
experiments/benchmarks/office31.py:weights=pretrained/r50,data_dir=data --workdir runs/office31``.

Data (docs/benchmarks.md): the three folders ``office31/{amazon,dslr,webcam}/images/<class>/*.jpg`` (2,817 /
498 / 795 images), each prepared once at 256x256::

    for d in amazon dslr webcam; do
      tl-jax data prepare --image-folder office31/$d/images --name office31_$d --data-dir data --image-size 256 256
    done

Recipe: TLlib's (``da_protocol.py``: SGD 0.01, backbone 0.1x, weight decay 1e-3, batch 32 + 32, random resized
crop 224 + flip, 20 epochs x 1,000 iterations = 20,000 steps; ``mcc.sh`` runs 20 x 500, ``erm.sh`` 5 x 1,000,
``fixmatch.sh`` lr 0.001 with 96 target images: ``SUITE.overrides``), with the differences that file lists
(cosine lr, no bottleneck). These are the
protocol's published hyperparameters; any tuning is on a validation split (``tune=1``), never on test.

Published (TLlib's README, ResNet-50, target accuracy %, mean of three runs for the adversarial methods;
``da_protocol.TLLIB`` names the file and commit): ``PUBLISHED`` below, e.g. DANN average 86.1, MCC and MDD 89.6.
"""
from __future__ import annotations

from tl_jax.sweep.study import sibling_module


def _protocol():
    """``da_protocol.py`` beside this file (config files are loaded by path, not as a package)."""
    return sibling_module(__file__, "da_protocol.py")


TASKS = ("A2W", "D2W", "W2D", "A2D", "D2A", "W2A")
_COLUMNS = ("avg",) + TASKS  # TLlib's column order: Avg, A→W, D→W, W→D, A→D, D→A, W→A
_ROWS = {  # tl_jax method: TLlib's row (its name in da_protocol.METHODS), read from TLlib's README
    "source_only": (79.5, 75.8, 95.5, 99.0, 79.3, 63.6, 63.8),
    "dann": (86.1, 91.4, 97.9, 100.0, 83.6, 73.3, 70.4),
    "cdan": (87.7, 93.8, 98.5, 100.0, 89.9, 73.4, 70.4),
    "mcc": (89.6, 94.1, 98.4, 99.8, 95.6, 75.5, 74.2),
    "mdd": (89.6, 95.6, 98.6, 100.0, 94.4, 76.6, 72.2),
    "mmd": (83.7, 84.2, 98.4, 100.0, 87.3, 66.9, 65.2),
    "self_training": (86.4, 86.4, 98.2, 100.0, 95.4, 70.0, 68.1),
}
PUBLISHED = {m: dict(zip(_COLUMNS, row)) for m, row in _ROWS.items()}
SUITE = _protocol().Suite(
    name="office31", title="Office-31", domains={"A": "amazon", "D": "dslr", "W": "webcam"}, num_classes=31,
    tasks=TASKS, steps=20_000, published=PUBLISHED,
    overrides={"source_only": {"steps": 5_000}, "mcc": {"steps": 10_000},  # erm.sh: 5 x 1,000; mcc.sh: 20 x 500
               "self_training": {"lr": 0.001, "target_batch": 96}})  # fixmatch.sh: --lr 0.001 -ub 96


def get_config(arg: str | None = None):
    return _protocol().build(SUITE, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    return _protocol().sweep(SUITE, arg)
