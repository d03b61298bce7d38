"""Bring your own data and weights: train on a dataset made by ``tl-jax data prepare``.

Arguments (``get_config`` argument ``key=value,...``):

* ``name``: the prepared dataset (``config.data.name``); ``data_dir`` its tfds dir;
* ``kind``: ``image`` (pixels rescaled to [0, 1]) or ``text`` (token ids, no ops);
* ``weights``: a dir written by ``tl-jax weights convert``: sets ``init_from``,
  the model name and kwargs from its ``tl_jax_weights.json`` (images from a
  torchvision ResNet are also normalised with the ImageNet mean/std);
  without it, ``model`` is trained from scratch (default: a ViT-Ti with
  4-px patches for images, a 2-layer BERT for text);
* ``freeze``: ``none`` (fine-tune all), ``backbone`` (linear probe) or
  ``embeddings`` (text: freeze only the token embeddings).

Example::

    tl-jax train --config experiments/byo.py:kind=text,name=my_reviews,data_dir=data,weights=pretrained/minilm \\
        --workdir runs/reviews
"""
from __future__ import annotations

import json
import pathlib

from tl_jax import config as config_lib

IMAGENET_NORM = {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
FREEZE = {
    "none": [[".*", 1.0]],
    "backbone": [["backbone/.*", None], [".*", 1.0]],
    "embeddings": [["backbone/embeddings/.*", None], [".*", 1.0]],
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, kind="image", name="", data_dir="", weights="", model="", freeze="none",
                             steps=500, batch_size=32, lr=1e-3, seed=0)
    if a.kind not in ("image", "text"):
        raise config_lib.ConfigError(f"kind must be 'image' or 'text', got {a.kind!r}")
    if a.freeze not in FREEZE:
        raise config_lib.ConfigError(f"freeze must be one of {sorted(FREEZE)}, got {a.freeze!r}")
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = a.name or "mnist5k"
    if a.data_dir:
        c.data.data_dir = a.data_dir
    c.model.num_classes = 0  # 0: the dataset's number of classes
    kwargs: dict = {"patch_size": 4} if a.kind == "image" else {"num_layers": 2}
    c.model.name = a.model or ("vit" if a.kind == "image" else "bert")
    pp: list = [{"op": "rescale", "in_max": 255.0}] if a.kind == "image" else []
    if a.weights:
        meta_file = pathlib.Path(a.weights) / "tl_jax_weights.json"
        if not meta_file.is_file():
            raise config_lib.ConfigError(f"weights={a.weights}: no {meta_file.name} (run `tl-jax weights convert`)")
        meta = json.loads(meta_file.read_text())
        c.model.name, kwargs = meta["model"], dict(meta["model_kwargs"])
        c.init_from = str(pathlib.Path(a.weights).absolute())
        if meta["mapping"] == "torchvision_resnet":
            pp.append(IMAGENET_NORM)
    c.model.kwargs = kwargs
    c.data.train_pp = list(pp)
    c.data.eval_pp = list(pp)
    c.data.batch_size = a.batch_size
    c.data.eval_batch_size = 2 * a.batch_size
    c.param_rules = FREEZE[a.freeze]
    c.optimizer.learning_rate = a.lr
    c.train.steps = a.steps
    c.train.log_every = max(1, a.steps // 10)
    c.train.checkpoint_every = a.steps
    return c
