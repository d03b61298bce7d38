"""Office-Home (Venkateswara et al. 2017): 65 classes in four domains (Art, Clipart, Product, Real World), the 12
unsupervised DA tasks, TLlib's ResNet-50 protocol.

One run (``task`` one of Ar2Cl Ar2Pr Ar2Rw Cl2Ar Cl2Pr Cl2Rw Pr2Ar Pr2Cl Pr2Rw Rw2Ar Rw2Cl Rw2Pr; ``method`` one
of source_only dann cdan mcc mdd mmd coral self_training; ``weights`` a converted ImageNet ResNet-50)::

    tl-jax train --workdir runs/office_home/Ar2Cl_mdd \\
        --config experiments/benchmarks/office_home.py:task=Ar2Cl,method=mdd,weights=pretrained/r50,data_dir=data

Every task x method: ``tl-jax sweep --config experiments/benchmarks/office_home.py:weights=pretrained/r50,data_dir=data
--workdir runs/office_home``.

Data (docs/benchmarks.md): ``OfficeHomeDataset/{Art,Clipart,Product,Real_World}/<class>/*.jpg`` (2,427 / 4,365 /
4,439 / 4,357 images), each prepared once at 256x256::

    for d in Art Clipart Product Real_World; do
      tl-jax data prepare --image-folder OfficeHomeDataset/$d --name office_home_$(echo $d | tr A-Z a-z) \\
          --data-dir data --image-size 256 256
    done

Recipe: TLlib's (``da_protocol.py``), 30 epochs x 1,000 iterations = 30,000 steps (``dann.sh``); per method
(``SUITE.overrides``): ``erm.sh`` 5 x 500, ``dan.sh`` 20 x 500, ``fixmatch.sh`` lr 0.003 for 20 epochs. These are
the protocol's published hyperparameters; any tuning is on a validation split (``tune=1``), never on test.

Published (TLlib's README, ResNet-50, target accuracy %; ``da_protocol.TLLIB``): ``PUBLISHED``, e.g. DANN
average 65.2, MDD 69.7, MCC 72.4.
"""
from __future__ import annotations

from tl_jax.sweep.study import sibling_module


def _protocol():
    """``da_protocol.py`` beside this file (config files are loaded by path, not as a package)."""
    return sibling_module(__file__, "da_protocol.py")


TASKS = ("Ar2Cl", "Ar2Pr", "Ar2Rw", "Cl2Ar", "Cl2Pr", "Cl2Rw", "Pr2Ar", "Pr2Cl", "Pr2Rw", "Rw2Ar", "Rw2Cl", "Rw2Pr")
_COLUMNS = ("avg",) + TASKS  # TLlib's column order: Avg, then the tasks as above
_ROWS = {  # tl_jax method: TLlib's row (its name in da_protocol.METHODS), read from TLlib's README
    "source_only": (58.4, 41.1, 65.9, 73.7, 53.1, 60.1, 63.3, 52.2, 36.7, 71.8, 64.8, 42.6, 75.2),
    "dann": (65.2, 53.8, 62.6, 74.0, 55.8, 67.3, 67.3, 55.8, 55.1, 77.9, 71.1, 60.7, 81.1),
    "cdan": (68.8, 55.2, 72.4, 77.6, 62.0, 69.7, 70.9, 62.4, 54.3, 80.5, 75.5, 61.0, 83.8),
    "mcc": (72.4, 58.4, 79.6, 83.0, 67.5, 77.0, 78.5, 66.6, 54.8, 81.8, 74.4, 61.4, 85.6),
    "mdd": (69.7, 56.2, 75.4, 79.6, 63.5, 72.1, 73.8, 62.5, 54.8, 79.9, 73.5, 60.9, 84.5),
    "mmd": (61.4, 45.6, 67.7, 73.9, 57.7, 63.8, 66.0, 54.9, 40.0, 74.5, 66.2, 49.1, 77.9),
    "self_training": (70.8, 56.4, 76.4, 79.9, 65.3, 73.8, 71.2, 67.2, 56.4, 80.6, 74.9, 63.5, 84.3),
}
PUBLISHED = {m: dict(zip(_COLUMNS, row)) for m, row in _ROWS.items()}
SUITE = _protocol().Suite(
    name="office_home", title="Office-Home",
    domains={"Ar": "Art", "Cl": "Clipart", "Pr": "Product", "Rw": "Real_World"}, num_classes=65, tasks=TASKS,
    steps=30_000, published=PUBLISHED,
    overrides={"source_only": {"steps": 2_500}, "mmd": {"steps": 10_000},  # erm.sh: 5 x 500; dan.sh: 20 x 500
               "self_training": {"lr": 0.003, "steps": 20_000}})  # fixmatch.sh: --lr 0.003 --epochs 20


def get_config(arg: str | None = None):
    return _protocol().build(SUITE, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    return _protocol().sweep(SUITE, arg)
