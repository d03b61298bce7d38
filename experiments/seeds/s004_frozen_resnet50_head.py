"""Seed 004: a frozen ResNet-50 + GAP/Dense(1024, relu)/Dense(n) head on a folder of images, saved, reloaded, predicting.

One command (writes the image folder, prepares it as a dataset, trains, then predicts with the saved run)::

    python experiments/seeds/s004_frozen_resnet50_head.py --workdir runs/seeds/s004

What it reproduces from the document: Keras' ``ResNet50(include_top=False)`` with every layer frozen,
``GlobalAveragePooling2D -> Dense(1024, relu) -> Dense(n, softmax)`` (``config.model.head.hidden=[1024]``)
trained with Adam 1e-3 on a directory of class sub-folders (``tl-jax data prepare --image-folder``), the
model saved and loaded again for prediction (``tl-jax predict --workdir RUN --image-folder DIR``).

``data=embedded`` (default): the folder is made from the embedded optdigits digits (32x32 RGB PNGs,
``images/train/<digit>/`` 1,347 and ``images/test/<digit>/`` 450, :func:`write_digit_folder`) and
prepared into ``WORKDIR/tfds`` as ``seed_digits``; the "ImageNet" backbone is stood in for by a ResNet-50
(CIFAR stem, 8 base channels) pretrained on mnist5k in phase 0. The steps as separate commands::

    tl-jax data prepare --image-folder runs/seeds/s004/images --name seed_digits --data-dir runs/seeds/s004/tfds
    tl-jax sweep --config experiments/seeds/s004_frozen_resnet50_head.py --workdir runs/seeds/s004
    tl-jax predict --workdir runs/seeds/s004/head --image-folder runs/seeds/s004/images/test --out runs/seeds/s004/preds

``data=catalogue``: ``tf_flowers`` (5 classes) at 224x224 on a full ResNet-50 whose weights come from
torchvision's ImageNet checkpoint (``tl-jax weights convert --mapping torchvision_resnet --model resnet50``
into ``weights=DIR``; ``weights=`` empty: a random frozen backbone, for shape checks only);
``dataset=NAME`` takes your own prepared folder instead.

``weights=DIR`` may hold any backbone ``tl-jax weights convert`` wrote (``DIR/tl_jax_weights.json``): a
DINOv2, CLIP, SigLIP or timm ViT, a ConvNeXt, a timm ResNet (docs/models.md). The run then builds the
architecture the conversion recorded (``model`` and ``model_kwargs``) instead of the ResNet-50, and
normalises the images as those weights expect (their recorded mean/std, appended to the pipelines by the
train setup: ``tl_jax/weights/run_preprocessing.py``); the Dense(1024, relu) head and the frozen backbone
are the same. For example, a DINOv2 ViT-S/14 downloaded from Hugging Face::

    huggingface-cli download facebook/dinov2-small --local-dir dinov2-small
    tl-jax weights convert --from dinov2-small --out pretrained/dinov2_small
    tl-jax train --config experiments/seeds/s004_frozen_resnet50_head.py:data=catalogue,weights=pretrained/dinov2_small \
        --workdir runs/seeds/s004_dinov2

Printed on the embedded stand-in (2026-12-06, 2 CPU cores shared with other jobs: 29 min wall, 6 min of CPU,
most of it compiling the ResNet-50; source 150 steps of 64, head 200 steps of 32 on the cached features of
the frozen backbone, seed 0)::

    source ResNet-50 (mnist5k test, 1,000 images): test/accuracy=0.876
    head (frozen backbone: 159 tensors, 373,192 params; trained: 273,418): test/accuracy=0.6444
    tl-jax predict: 450 predictions (step 200), accuracy 0.6444; wrote .../preds.npz and .../preds.csv

The reloaded run predicts the image folder exactly as the run's own test eval scored it; 0.64 is what a
backbone pretrained for 150 steps on another digit style gives a frozen-feature head.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np

from tl_jax import config as config_lib

IMAGENET_NORM = {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
FROZEN_BACKBONE = [["backbone/.*", None], [".*", 1.0]]


def _pp(in_max: float, px: int, normalize: dict | None = IMAGENET_NORM) -> list[dict]:
    """Pixels to [0, 1], RGB, ``px`` x ``px``, then ``normalize`` (None: the converted weights' own, appended
    by the train setup)."""
    ops = [{"op": "rescale", "in_max": in_max}, {"op": "to_rgb"}, {"op": "resize", "size": px}]
    return ops + ([normalize] if normalize else [])


def converted_backbone(weights: str) -> dict | None:
    """``{'model', 'model_kwargs', 'image_size'}`` of a checkpoint ``tl-jax weights convert`` wrote to
    ``weights`` (its ``tl_jax_weights.json``), or None when ``weights`` is empty or not such a folder."""
    meta = pathlib.Path(weights or "").expanduser() / "tl_jax_weights.json"
    if not weights or not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    size = (record.get("preprocessing") or {}).get("image_size")
    return {"model": record["model"], "model_kwargs": record.get("model_kwargs") or {},
            "image_size": size if isinstance(size, int) else None}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, stage="head", data="embedded", seed=0, source="runs/seeds/s004/source",
                             data_dir="runs/seeds/s004/tfds", dataset="", weights="pretrained/resnet50", px=0,
                             steps=0)
    if a.data not in ("embedded", "catalogue"):
        raise config_lib.ConfigError(f"data={a.data!r}: expected 'embedded' or 'catalogue'")
    embedded = a.data == "embedded"
    px = a.px or (32 if embedded else 224)
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = "resnet50"
    c.model.kwargs = {"base_width": 8, "stem": "cifar"} if embedded else {"base_width": 64, "stem": "imagenet"}
    c.data.batch_size = 32
    c.data.eval_batch_size = 250
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3  # the document's Adam(1e-3)
    c.train.progress = False
    c.train.log_every = 50
    if a.stage == "source":  # the stand-in for ImageNet pretraining (embedded only)
        if not embedded:
            raise config_lib.ConfigError("stage=source is the embedded stand-in's pretraining; with data=catalogue "
                                         "the backbone comes from weights=DIR (torchvision's ImageNet ResNet-50)")
        c.model.num_classes = 10
        c.data.name = "mnist5k"
        c.data.train_pp, c.data.eval_pp = _pp(255.0, px), _pp(255.0, px)
        c.data.batch_size = 64
        c.train.steps = a.steps or 150
    elif a.stage == "head":
        c.model.num_classes = 0  # the folder's class count
        c.model.head.hidden = [1024]  # GAP (the backbone's features) -> Dense(1024, relu) -> Dense(n)
        c.model.head.activation = "relu"
        c.param_rules = FROZEN_BACKBONE  # every backbone layer frozen (BatchNorm in inference mode)
        c.dont_load = ["head/.*"]
        if embedded:
            c.data.name = a.dataset or "seed_digits"
            c.data.data_dir = a.data_dir
            c.init_from = a.source
            c.data.train_pp, c.data.eval_pp = _pp(255.0, px), _pp(255.0, px)
        else:
            c.data.name = a.dataset or "tf_flowers"
            c.data.train_split, c.data.test_split = "train[:80%]", "train[80%:]"  # tf_flowers has one split
            c.init_from = a.weights
            backbone = converted_backbone(a.weights)
            norm = IMAGENET_NORM
            if backbone is not None:  # any converted backbone: its architecture, its normalisation
                c.model.name, c.model.kwargs, norm = backbone["model"], backbone["model_kwargs"], None
                px = a.px or backbone["image_size"] or px
            c.data.train_pp, c.data.eval_pp = _pp(255.0, px, norm), _pp(255.0, px, norm)
        c.train.steps = a.steps or (200 if embedded else 2000)
    else:
        raise config_lib.ConfigError(f"stage={a.stage!r}: expected 'source' or 'head'")
    c.train.checkpoint_every = c.train.steps
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Embedded: phase 0 the stand-in backbone, phase 1 the head. Catalogue: the head only."""
    a = config_lib.parse_arg(arg, data="embedded", weights="pretrained/resnet50", px=0)
    if a.data == "catalogue":
        return [{"stage": "head", "data": "catalogue", "weights": a.weights, "_name": "head",
                 **({"px": a.px} if a.px else {})}]
    source = {"stage": "source", "_name": "source", "_report": False}
    head = {"stage": "head", "source": "{workdir}/source", "data_dir": "{workdir}/tfds", "_name": "head",
            "_phase": 1}
    return [source, head]


def write_digit_folder(root: str | pathlib.Path, size: int = 32) -> pathlib.Path:
    """``root/{train,test}/<digit>/<i>.png``: the optdigits digits (0..16) as ``size`` x ``size`` RGB PNGs,
    split 1,347 / 450 (stratified, seed 0). Returns ``root``; an existing folder is kept as it is."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = pathlib.Path(root)
    if (root / "test").is_dir():
        return root
    d = load_digits()
    train, test = train_test_split(np.arange(len(d.target)), test_size=450, stratify=d.target, random_state=0)
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = np.rint(d.images[i] * (255.0 / 16.0)).astype(np.uint8)
            img = Image.fromarray(grey, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(folder / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    """Folder -> dataset -> sweep (backbone, head) -> predict with the saved head run."""
    from tl_jax.cli import main as cli_main
    from tl_jax.data.image_folder import prepare_image_folder
    from tl_jax.data.user_datasets import find_user_dataset
    from tl_jax.sweep.runner import run_sweep

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/seeds/s004")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = pathlib.Path(args.workdir)
    images = write_digit_folder(root / "images")
    if find_user_dataset("seed_digits", str(root / "tfds")) is None:
        prepare_image_folder(images, "seed_digits", str(root / "tfds"))
    run_sweep(__file__, str(root))
    return cli_main(["predict", "--workdir", str(root / "head"), "--image-folder", str(images / "test"),
                     "--out", str(root / "preds")])


if __name__ == "__main__":
    sys.exit(main())
