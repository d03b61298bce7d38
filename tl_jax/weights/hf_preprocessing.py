"""The input preprocessing a Hugging Face vision model was trained with, recorded beside its converted weights.

A pretrained tower expects its own normalisation: ImageNet's mean/std (DeiT,
DINOv2), CLIP's, or ``[-1, 1]`` (mean = std = 0.5: Google's ViT, SigLIP). Fed
differently normalised pixels it still runs, silently worse, so the conversion
writes it into ``tl_jax_weights.json`` under ``"preprocessing"``::

    {"mean": [r, g, b], "std": [r, g, b], "image_size": [h, w], "resize": 256 | [h, w] | null,
     "interpolation": "bicubic", "source": "preprocessor_config.json" | "defaults of <family>"}

``mean``/``std`` apply to pixels scaled to ``[0, 1]``: ``x = (pixel / 255 - mean) / std``.
``image_size`` is the crop (or the resize when the processor does not crop);
``resize`` the shorter-edge or ``[h, w]`` resize before it. Read from the
folder's ``preprocessor_config.json`` when it is there (``image_mean``,
``image_std``, ``size``, ``crop_size``, ``do_center_crop``, ``resample``), else
the family's published defaults (:data:`DEFAULTS`).
"""
from __future__ import annotations

import json
import pathlib

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # pixels in [-1, 1]
# family -> (mean, std, image size, shorter-edge resize or None, interpolation), from each family's processor
DEFAULTS = {
    "vit": (*HALF, 224, None, "bilinear"),
    "deit": (*IMAGENET, 224, 256, "bicubic"),
    "dinov2": (*IMAGENET, 224, 256, "bicubic"),
    "clip": (*CLIP, 224, 224, "bicubic"),
    "siglip": (*HALF, 224, None, "bicubic"),
}
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PROCESSOR_FILE = "preprocessor_config.json"


def _hw(size: object) -> list[int] | int | None:
    """A processor's ``size`` / ``crop_size``: ``{"height", "width"}`` -> [h, w]; ``{"shortest_edge"}`` -> int."""
    if isinstance(size, int):
        return [size, size]
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return [int(size["height"]), int(size["width"])]
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    return None


def preprocessing(folder: pathlib.Path, family: str, native_size: int | None = None) -> dict:
    """What the model's inputs must look like (module doc); ``native_size``: the pretraining image size."""
    mean, std, size, resize, interp = DEFAULTS[family]
    size = native_size or size
    out = {"mean": mean, "std": std, "image_size": [size, size], "resize": resize, "interpolation": interp,
           "source": f"defaults of {family}"}
    path = folder / PROCESSOR_FILE
    if not path.is_file():
        return out
    try:
        proc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    resize = _hw(proc.get("size"))
    crop = _hw(proc.get("crop_size")) if proc.get("do_center_crop", False) else None
    image = crop if isinstance(crop, list) else (resize if isinstance(resize, list) else out["image_size"])
    out.update(mean=[float(v) for v in proc.get("image_mean", mean)],
               std=[float(v) for v in proc.get("image_std", std)],
               image_size=image, resize=resize if crop is not None or isinstance(resize, int) else None,
               interpolation=PIL_RESAMPLE.get(proc.get("resample"), interp), source=PROCESSOR_FILE)
    return out
