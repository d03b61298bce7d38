"""VTAB-1k (Zhai et al. 2019): 19 classification tasks, 1,000 labelled training images each, fine-tuning a ViT-B/16.

One run (``task`` a key of ``TASKS``; ``weights`` a converted ViT-B/16, e.g. big_vision's ImageNet-21k
``.npz`` or Hugging Face's ``google/vit-base-patch16-224-in21k`` through ``tl-jax weights convert``, docs/models.md;
any other converted backbone works too: the architecture is read from its ``tl_jax_weights.json``)::

    tl-jax train --config experiments/benchmarks/vtab1k.py:task=cifar100,weights=pretrained/vit_b16,data_dir=data \\
        --workdir runs/vtab1k/cifar100

All 19: ``tl-jax sweep --config experiments/benchmarks/vtab1k.py:weights=pretrained/vit_b16,data_dir=data
--workdir runs/vtab1k``. Without the data, ``--mock-data 8`` runs a tfds task on random examples of its real
features (shapes, compile, the pipeline).

The splits are VTAB's (``google-research/task_adaptation``, ``task_adaptation/data/*.py``): ``stage=final`` (default)
trains on ``train800val200`` (1,000 images) and reports ``test/accuracy`` on the task's test split;
``stage=tune`` trains on ``train800`` and scores ``val200`` (``val/accuracy``; its ``test/*`` is val200 too,
so a tuning run never reads the test split). Hyperparameters are the protocol's published ones
(``scripts/run_all_tasks.sh`` of task_adaptation: SGD momentum 0.9, batch 64, lr 0.01, 80 warmup steps, 1,000
steps, images resized to 224x224, no augmentation); any tuning (``lr=``, ``steps=``) is on val200 with
``stage=tune``, never on test. One difference: task_adaptation decays the lr x0.1 at steps 300/600/900; tl_jax
has no step schedule and uses ``warmup_cosine``. The normalisation is the converted weights' own (appended by
the train setup).

Where the data comes from (docs/benchmarks.md): 12 tasks are tfds datasets read directly (``tfds build NAME
--file_format=array_record --data_dir=data`` on a machine with internet; resisc45 and retinopathy need their
manual downloads). The other 7 (Clevr count/distance, KITTI distance, dSprites location/orientation, smallNORB
azimuth/elevation) have labels that VTAB derives from other features (object counts, depth bins, binned
positions), so ``vtab_folders.py`` exports them from their tfds datasets into image folders with those
labels, prepared as ``vtab_<task>`` (train800val200 / test) and ``vtab_<task>_tune`` (train800 / val200).

Published: ``PUBLISHED``, VTAB's leaderboard (task_adaptation ``docs/data/results.csv``, the 1,000-example
columns) for ``Sup-100%``, an ImageNet-supervised ResNet-50 v2 fine-tuned with a 4-setting sweep (mean 66.4
over the 19 tasks). Per-task ViT-B/16 VTAB-1k numbers were not in a source read for this file: that column is
left empty rather than filled from memory.
"""
from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

from tl_jax import config as config_lib

PUBLISHED_SOURCE = ("google-research/task_adaptation docs/data/results.csv (VTAB leaderboard), row Sup-100% "
                    "(ResNet-50 v2, ImageNet), 1,000-example columns")


class Task(NamedTuple):
    """A VTAB-1k task: its tfds dataset (``''``: an image folder exported by ``vtab_folders.py``), class count,
    VTAB's split strings and the published Sup-100% accuracy (%)."""

    tfds: str
    num_classes: int
    train800: str
    val200: str
    test: str
    published: float
    group: str


def _t(tfds, n, val200, test, published, group, train800="train[:800]"):
    return Task(tfds, n, train800, val200, test, published, group)


# name -> Task; val200/test: the split strings of task_adaptation/data/<dataset>.py (VTAB's train/val counts)
TASKS = {
    "caltech101": _t("caltech101", 102, "train[2754:2954]", "test", 91.0, "natural"),
    "cifar100": _t("cifar100", 100, "train[45000:45200]", "test", 57.0, "natural"),
    "dtd": _t("dtd", 47, "validation[:200]", "test", 66.0, "natural"),
    "flowers102": _t("oxford_flowers102", 102, "validation[:200]", "test", 88.6, "natural"),
    "pets": _t("oxford_iiit_pet", 37, "train[2944:3144]", "test", 89.9, "natural"),
    "sun397": _t("sun397/tfds", 397, "validation[:200]", "test", 34.4, "natural"),
    "svhn": _t("svhn_cropped", 10, "train[65931:66131]", "test", 87.3, "natural"),
    "camelyon": _t("patch_camelyon", 2, "validation[:200]", "test", 80.6, "specialized"),
    "eurosat": _t("eurosat/rgb", 10, "train[16200:16400]", "train[21600:]", 95.3, "specialized"),
    "resisc45": _t("resisc45", 45, "train[18900:19100]", "train[25200:]", 80.8, "specialized"),
    "retinopathy": _t("diabetic_retinopathy_detection/btgraham-300", 5, "validation[:200]", "test", 73.2,
                      "specialized"),
    "clevr_count": _t("", 8, "train[63000:63200]", "validation", 41.0, "structured"),
    "clevr_dist": _t("", 6, "train[63000:63200]", "validation", 56.1, "structured"),
    "dmlab": _t("dmlab", 6, "validation[:200]", "test", 36.3, "structured"),
    "kitti_dist": _t("", 4, "validation[:200]", "test", 70.6, "structured"),
    "dsprites_loc": _t("", 16, "train[589824:590024]", "train[663552:]", 85.7, "structured"),
    "dsprites_ori": _t("", 16, "train[589824:590024]", "train[663552:]", 46.0, "structured"),
    "smallnorb_azi": _t("", 18, "test[:200]", "test[50%:]", 45.7, "structured"),
    "smallnorb_ele": _t("", 9, "test[:200]", "test[50%:]", 35.4, "structured"),
}
PUBLISHED = {name: t.published for name, t in TASKS.items()}
PX = 224
SMOKE_VIT = {"variant": "Ti", "patch_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}


def converted_backbone(weights: str) -> tuple[str, dict]:
    """``(model, model_kwargs)`` that ``tl-jax weights convert`` recorded in ``weights/tl_jax_weights.json``;
    ViT-B/16 (``vit``, variant B, patch 16) when ``weights`` is empty or holds no such file."""
    meta = pathlib.Path(weights or "").expanduser() / "tl_jax_weights.json"
    if weights and meta.is_file():
        record = json.loads(meta.read_text())
        return record["model"], dict(record.get("model_kwargs") or {})
    return "vit", {"variant": "B", "patch_size": 16}


def splits(task: Task, name: str, stage: str) -> dict:
    """``config.data`` fields of ``stage`` (final | tune): dataset name, train/val/test splits."""
    if stage not in ("final", "tune"):
        raise config_lib.ConfigError(f"stage={stage!r}: expected 'final' (train800val200 -> test) or 'tune' "
                                     f"(train800 -> val200)")
    if not task.tfds:  # vtab_folders.py's exports: vtab_<task> (1,000 / test), vtab_<task>_tune (800 / 200)
        if stage == "final":
            return {"name": f"vtab_{name}", "train_split": "train", "val_split": None, "test_split": "test"}
        return {"name": f"vtab_{name}_tune", "train_split": "train", "val_split": "test", "test_split": "test"}
    if stage == "final":
        return {"name": task.tfds, "train_split": f"{task.train800}+{task.val200}", "val_split": None,
                "test_split": task.test}
    return {"name": task.tfds, "train_split": task.train800, "val_split": task.val200, "test_split": task.val200}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, task="cifar100", stage="final", seed=0, weights="", data_dir="data", lr=0.01,
                             steps=1000, batch=64, smoke=False)
    if a.task not in TASKS:
        raise config_lib.ConfigError(f"task={a.task!r}: VTAB-1k tasks are {sorted(TASKS)}")
    task = TASKS[a.task]
    px = 32 if a.smoke else PX
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name, c.model.kwargs = ("vit", dict(SMOKE_VIT)) if a.smoke else converted_backbone(a.weights)
    c.model.num_classes = task.num_classes
    c.init_from = a.weights
    for key, value in splits(task, a.task, a.stage).items():
        c.data[key] = value
    c.data.data_dir = a.data_dir
    pp = [{"op": "to_rgb"}, {"op": "resize", "size": px}, {"op": "rescale", "in_max": 255.0}]
    c.data.train_pp, c.data.eval_pp = list(pp), list(pp)
    c.data.batch_size = 4 if a.smoke else a.batch
    c.data.eval_batch_size = 8 if a.smoke else 250
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum = "sgd", a.lr, 0.9
    c.optimizer.schedule, c.optimizer.warmup_steps = "warmup_cosine", min(80, a.steps // 2)
    c.train.steps = a.steps
    c.train.log_every = min(50, a.steps)
    c.train.eval_every = 0 if a.stage == "final" else min(200, a.steps)
    c.train.checkpoint_every = a.steps
    c.train.progress = False
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Every task (``tasks`` ';'-separated, default all 19) at ``stage`` with ``weights``/``data_dir``."""
    a = config_lib.parse_arg(arg, tasks=";".join(TASKS), stage="final", weights="", data_dir="data", seeds=1)
    return [{"task": t, "stage": a.stage, "weights": a.weights, "data_dir": a.data_dir, "seed": s,
             "_name": f"{t}_seed{s}"} for t in a.tasks.split(";") for s in range(a.seeds)]


def markdown_table() -> str:
    """The docs table: task, method, the published Sup-100% accuracy, an empty tl_jax column."""
    rows = ["| task | group | data | method | published (%) | tl_jax |", "|---|---|---|---|---:|---:|"]
    for name, t in TASKS.items():
        data = f"tfds `{t.tfds}`" if t.tfds else f"folder `vtab_{name}`"
        rows.append(f"| {name} | {t.group} | {data} | fine-tune | {t.published:.1f} | |")
    mean = sum(PUBLISHED.values()) / len(PUBLISHED)
    rows.append(f"| mean of 19 | | | fine-tune | {mean:.1f} | |")
    return "\n".join(rows)
