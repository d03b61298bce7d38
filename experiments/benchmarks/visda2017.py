"""VisDA-2017 classification (Peng et al. 2017): synthetic renderings -> real photos, 12 classes, one unsupervised
DA task, TLlib's protocol on a ResNet-50.

One run (``method`` one of source_only dann cdan mcc mdd mmd coral self_training; ``weights`` a converted
ImageNet ResNet-50)::

    tl-jax train --config experiments/benchmarks/visda2017.py:method=mcc,weights=pretrained/r50,data_dir=data \\
        --workdir runs/visda2017/S2R_mcc

Every method: ``tl-jax sweep --config experiments/benchmarks/visda2017.py:weights=pretrained/r50,data_dir=data
--workdir runs/visda2017``.

Data (docs/benchmarks.md): ``visda-2017/train/<class>/*.png`` (152,397 synthetic) and
``visda-2017/validation/<class>/*.jpg`` (55,388 real), the classification track's train and validation sets,
each prepared once at 256x256::

    tl-jax data prepare --image-folder visda-2017/train --name visda2017_synthetic --data-dir data --image-size 256 256
    tl-jax data prepare --image-folder visda-2017/validation --name visda2017_real --data-dir data --image-size 256 256

Recipe: TLlib's (``da_protocol.py``) with ``--train-resizing cen.crop`` (a centred 224 crop + flip), 30 epochs x
1,000 iterations = 30,000 steps (``dann.sh``); per method (``SUITE.overrides``): ``erm.sh`` 20 x 1,000,
``mcc.sh`` lr 0.002 and temperature 3, ``mdd.sh`` batch 36, ``dan.sh`` 20 x 500, ``fixmatch.sh`` lr 0.003,
threshold 0.8, 64 target images, 20 epochs. These are the protocol's published hyperparameters; any tuning is
on a validation split (``tune=1``), never on test.

Published (TLlib's README; ``da_protocol.TLLIB``): on a ResNet-101, which tl_jax has no model or converter for,
so they are a reference for the ResNet-50 runs here, not a like-for-like target. ``PUBLISHED`` holds TLlib's
"Avg" column (accuracy over all target images, what tl_jax's ``test/accuracy`` measures, e.g. DANN 74.9) and
``CLASS_MEAN`` its "Mean" column (the mean of the 12 per-class accuracies, VisDA's official metric, e.g. DANN 79.5).
"""
from __future__ import annotations

from tl_jax.sweep.study import sibling_module


def _protocol():
    """``da_protocol.py`` beside this file (config files are loaded by path, not as a package)."""
    return sibling_module(__file__, "da_protocol.py")


CLASSES = ("aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant", "skateboard",
           "train", "truck")
TASKS = ("S2R",)
# tl_jax method: (TLlib's "Mean" = per-class mean, "Avg" = over all images), ResNet-101, read from TLlib's README
_ROWS = {"source_only": (51.7, 56.9), "dann": (79.5, 74.9), "cdan": (80.1, 76.5), "mcc": (83.6, 80.4),
         "mdd": (82.0, 79.8), "mmd": (66.4, 67.2), "self_training": (79.5, 78.4)}
PUBLISHED = {m: {"S2R": avg} for m, (_, avg) in _ROWS.items()}
CLASS_MEAN = {m: {"S2R": mean} for m, (mean, _) in _ROWS.items()}
SUITE = _protocol().Suite(
    name="visda2017", title="VisDA-2017", domains={"S": "synthetic", "R": "real"}, num_classes=len(CLASSES),
    tasks=TASKS, steps=30_000, published=PUBLISHED, published_backbone="ResNet-101", center_crop_train=True,
    overrides={"source_only": {"steps": 20_000}, "mcc": {"lr": 0.002, "temperature": 3.0}, "mdd": {"batch": 36},
               "mmd": {"steps": 10_000},
               "self_training": {"lr": 0.003, "threshold": 0.8, "target_batch": 64, "steps": 20_000}})


def get_config(arg: str | None = None):
    return _protocol().build(SUITE, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    return _protocol().sweep(SUITE, arg)
