"""timm checkpoints -> tl_jax models: ``convnext_*`` -> ``convnext``, ``resnet*`` -> ``resnet18`` / ``resnet50``.

What ``huggingface-cli download timm/convnext_tiny.fb_in1k`` fetches (and
``timm.models.save_for_hf`` / ``push_to_hf_hub`` write): a folder with
``model.safetensors`` (or ``pytorch_model.bin``) and timm's ``config.json``
(``{"architecture": ..., "num_classes": ..., "pretrained_cfg": {mean, std,
input_size, crop_pct, interpolation, ...}}``). The architecture name picks the
family; the sizes come from the tensors; the preprocessing is recorded from
``pretrained_cfg`` (:mod:`tl_jax.weights.source_record`). A bare weights file
(a ``timm`` cache's ``.pth``, a ``torch.save(model.state_dict())``) converts with
``timm_name=`` (``--timm-name``) naming its architecture, or with timm's
``config.json`` beside it.

Families (the architecture name's prefix):

* ``convnext_`` (v1: atto .. xxlarge; the tensors give the sizes, :mod:`tl_jax.weights.convnext`);
* ``resnet``: timm's ResNet-18/50 (``resnet50.a1_in1k``, ``.b``, ``tv_in1k`` ...) have torchvision's
  layout and names, so the ``torchvision_resnet`` mapping converts them into ``resnet18`` / ``resnet50``;
  the deep-stem / avg-down variants (``resnet50d``, ``resnet50s``) and other depths are refused in one line.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

from tl_jax.weights.convert import Converted, convert_weights, register_source
from tl_jax.weights.convnext import zoo_name
from tl_jax.weights.readers import read_tensors
from tl_jax.weights.source_record import IMAGENET, find_weight_file, image_preprocessing, write_converted

# torchvision-layout ResNets tl_jax's zoo builds: stage depths -> (model, whether Bottleneck)
RESNET_DEPTHS = {(2, 2, 2, 2): ("resnet18", False), (3, 4, 6, 3): ("resnet50", True)}


def read_config(path: pathlib.Path) -> dict:
    """timm's ``config.json`` in the folder ``path`` (or beside the file ``path``); {} if none."""
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e})") from None


def is_timm(path: pathlib.Path) -> bool:
    """A folder (or a file beside one) whose ``config.json`` is timm's: ``architecture``, no ``model_type``."""
    try:
        cfg = read_config(path)
    except ValueError:
        return False
    return isinstance(cfg.get("architecture"), str) and "model_type" not in cfg


def family(architecture: str) -> str:
    """``'convnext'`` or ``'resnet'`` from a timm architecture name (tag after '.' ignored); one line otherwise."""
    arch = architecture.split(".")[0]
    if arch.startswith("convnext_"):
        return "convnext"
    if re.fullmatch(r"resnet\d+", arch) or re.fullmatch(r"resnet\d+_(?:a1|a1h|a2|a3|b|c|d|tv|tv2)\w*", arch):
        return "resnet"
    raise ValueError(f"timm architecture {architecture!r} is not one tl_jax converts: convnext_* (v1) and "
                     f"torchvision-layout resnet18/resnet50 (not the -d/-s deep-stem variants)")


def preprocessing(cfg: dict, architecture: str) -> dict | None:
    """The eval transform of timm's ``pretrained_cfg`` (input_size, crop_pct, mean/std, interpolation)."""
    pc = cfg.get("pretrained_cfg") or {}
    if not pc:
        if family(architecture) in ("convnext", "resnet"):  # every timm ConvNeXt / ResNet weight uses these
            return image_preprocessing(*IMAGENET, 224, 0.875, "bicubic", f"defaults of timm {architecture}")
        return None
    size = (pc.get("input_size") or [3, 224, 224])[1:]
    return image_preprocessing(pc.get("mean"), pc.get("std"), size, pc.get("crop_pct", 0.875),
                               pc.get("interpolation", "bicubic"), "config.json pretrained_cfg")


def _resnet_model(tensors: dict, architecture: str) -> str:
    """``resnet18`` / ``resnet50`` from the block counts (one line for other depths or stems)."""
    if "conv1.weight" not in tensors:
        raise ValueError(f"timm {architecture}: no conv1.weight; a deep-stem (-d/-s) ResNet is not torchvision's "
                         f"layout, which tl_jax's resnet models have")
    stages = tuple(1 + max((int(m.group(2)) for k in tensors if (m := re.match(r"layer(\d)\.(\d+)\.", k))
                            and int(m.group(1)) == s), default=-1) for s in range(1, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in tensors)
    hit = RESNET_DEPTHS.get(stages)
    if hit is None or hit[1] != bottleneck:
        raise ValueError(f"timm {architecture}: {'Bottleneck' if bottleneck else 'BasicBlock'} stages {stages}; "
                         f"tl_jax's zoo builds resnet18 (2, 2, 2, 2) BasicBlock and resnet50 (3, 4, 6, 3) Bottleneck")
    return hit[0]


def convert_timm(path: str | pathlib.Path, *, out: str | pathlib.Path | None, timm_name: str | None = None,
                 model_kwargs: dict | None = None, num_classes: int | None = None, ignore=(),
                 overwrite: bool = False) -> Converted:
    """A timm folder or weights file -> a tl_jax checkpoint (module doc); ``out=None``: nothing written.

    ``timm_name`` names the architecture of a file without timm's ``config.json``; with both, they must agree.
    Raises :class:`~tl_jax.weights.convert.WeightMappingError` listing every mismatch, ValueError in one line
    for an architecture tl_jax does not build.
    """
    path = pathlib.Path(path)
    file = find_weight_file(path)
    cfg = read_config(path)
    architecture = timm_name or cfg.get("architecture")
    if not architecture:
        raise ValueError(f"{path}: no timm config.json beside it; pass timm_name= (--timm-name), e.g. convnext_tiny")
    if timm_name and cfg.get("architecture") and timm_name.split(".")[0] != cfg["architecture"].split(".")[0]:
        raise ValueError(f"--timm-name {timm_name} but {path}'s config.json says {cfg['architecture']}")
    fam = family(architecture)
    if fam == "convnext":
        mapping, model = "timm_convnext", "convnext"
    else:
        mapping, model = "torchvision_resnet", _resnet_model(read_tensors(file), architecture)
    result = convert_weights(file, mapping=mapping, model=model, out=None, model_kwargs=model_kwargs,
                             num_classes=num_classes, ignore=ignore)
    if fam == "convnext":
        result = dataclasses.replace(result, model=zoo_name(result.model_kwargs))
    return write_converted(result, out, source=path, fmt="timm", architecture=architecture, mapping=mapping,
                           files=[file], preprocessing=preprocessing(cfg, architecture), overwrite=overwrite)


register_source("timm", is_timm, convert_timm)
