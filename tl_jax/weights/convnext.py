"""ConvNeXt checkpoints (timm ``convnext_*`` and Hugging Face ``ConvNextModel``) -> tl_jax's ``convnext``.

Two name mappings onto :mod:`tl_jax.models.convnext`'s param tree, registered in
:data:`tl_jax.weights.mappings.MAPPINGS` (``--mapping timm_convnext`` / ``hf_convnext``):

=====================================  ==================================  ===============================
timm                                   Hugging Face (``convnext.`` prefix  tl_jax ``params/backbone/...``
                                       of ...ForImageClassification cut)
=====================================  ==================================  ===============================
stem.0 / stem.1                        embeddings.patch_embeddings /       stem_conv / stem_norm
                                       embeddings.layernorm
stages.S.downsample.0 / .1             encoder.stages.S.downsampling_      stageS_downsample_norm / _conv
                                       layer.0 / .1
stages.S.blocks.J.conv_dw, norm,       encoder.stages.S.layers.J.dwconv,   stageS_blockJ/dwconv, norm,
mlp.fc1, mlp.fc2, gamma                layernorm, pwconv1, pwconv2,        fc1, fc2, gamma
                                       layer_scale_parameter
head.norm / head.fc                    layernorm / classifier              norm / ``params/head``
=====================================  ==================================  ===============================

Layouts: convs ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` (the depthwise one
``[C, 1, 7, 7]`` -> ``[7, 7, 1, C]``), Linear ``[out, in]`` -> ``[in, out]``, and
timm's ``conv_mlp`` variants (atto..nano: the MLP as 1x1 convs ``[out, in, 1, 1]``)
-> ``[in, out]`` too (``pointwise``). Depths, widths, kernel size and whether
LayerScale is present are read from the tensors; Hugging Face's pooled-feature
LayerNorm eps from its ``config.json`` (``layer_norm_eps``). The Hugging Face
folder is recognised by ``config.json``'s ``model_type: convnext`` and converted
with no flags (:func:`convert_hf_convnext`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from tl_jax.models.convnext import CONVNEXT_SIZES
from tl_jax.weights.convert import Converted, convert_weights, register_source
from tl_jax.weights.mappings import MAPPINGS, TRANSFORMS, Mapping, Rule
from tl_jax.weights.source_record import find_weight_file, image_preprocessing, write_converted

TRANSFORMS.setdefault("pointwise", lambda x: x.reshape(x.shape[0], x.shape[1]).T if x.ndim in (2, 4) else x)
_B = "backbone"
MODELS = ("convnext", "convnext_tiny", "convnext_small", "convnext_base")


def _pair(src: str, dst: str, transform: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"params/{dst}/{'scale' if transform == 'norm' else 'kernel'}",
                 "copy" if transform == "norm" else transform),
            Rule(rf"{src}\.bias", f"params/{dst}/bias")]


def _rules(names: dict[str, str]) -> tuple[Rule, ...]:
    """Rules from a source's regexes for each part (keys as in the module doc's table)."""
    blk = rf"{_B}/stage\1_block\2"
    return (
        *_pair(names["stem_conv"], f"{_B}/stem_conv", "conv"),
        *_pair(names["stem_norm"], f"{_B}/stem_norm", "norm"),
        *_pair(names["down_norm"], rf"{_B}/stage\1_downsample_norm", "norm"),
        *_pair(names["down_conv"], rf"{_B}/stage\1_downsample_conv", "conv"),
        *_pair(names["block"] + names["dwconv"], f"{blk}/dwconv", "conv"),
        *_pair(names["block"] + names["norm"], f"{blk}/norm", "norm"),
        *_pair(names["block"] + names["fc1"], f"{blk}/fc1", "pointwise"),
        *_pair(names["block"] + names["fc2"], f"{blk}/fc2", "pointwise"),
        Rule(names["block"] + names["gamma"], f"params/{blk}/gamma"),
        *_pair(names["final_norm"], f"{_B}/norm", "norm"),
        Rule(rf"{names['classifier']}\.weight", "params/head/kernel", "linear"),
        Rule(rf"{names['classifier']}\.bias", "params/head/bias"),
    )


TIMM_NAMES = {"stem_conv": r"stem\.0", "stem_norm": r"stem\.1", "down_norm": r"stages\.(\d+)\.downsample\.0",
              "down_conv": r"stages\.(\d+)\.downsample\.1", "block": r"stages\.(\d+)\.blocks\.(\d+)\.",
              "dwconv": "conv_dw", "norm": "norm", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2", "gamma": "gamma",
              "final_norm": r"head\.norm", "classifier": r"head\.fc"}
HF_NAMES = {"stem_conv": r"embeddings\.patch_embeddings", "stem_norm": r"embeddings\.layernorm",
            "down_norm": r"encoder\.stages\.(\d+)\.downsampling_layer\.0",
            "down_conv": r"encoder\.stages\.(\d+)\.downsampling_layer\.1",
            "block": r"encoder\.stages\.(\d+)\.layers\.(\d+)\.", "dwconv": "dwconv", "norm": "layernorm",
            "fc1": "pwconv1", "fc2": "pwconv2", "gamma": "layer_scale_parameter", "final_norm": "layernorm",
            "classifier": "classifier"}


def _sizes(tensors: dict[str, np.ndarray], names: dict[str, str], normalize) -> dict:
    """``depths``, ``dims``, ``kernel_size``, ``layer_scale`` from the tensor shapes (one source's names)."""
    blocks: dict[int, set[int]] = {}
    dims: dict[int, int] = {}
    kernel, gamma = None, False
    for key, value in tensors.items():
        m = re.fullmatch(names["block"] + r"(.+)", normalize(key))
        if not m:
            continue
        s, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        blocks.setdefault(s, set()).add(j)
        if re.fullmatch(names["dwconv"] + r"\.weight", rest):
            dims[s], kernel = int(value.shape[0]), int(value.shape[-1])
        gamma = gamma or bool(re.fullmatch(names["gamma"], rest))
    if not blocks or sorted(blocks) != list(range(len(blocks))) or set(dims) != set(blocks):
        return {}
    return {"depths": [max(blocks[s]) + 1 for s in sorted(blocks)], "dims": [dims[s] for s in sorted(dims)],
            "kernel_size": kernel, "layer_scale": 1e-6 if gamma else None}


def _sample(tensors: dict[str, np.ndarray], kwargs: dict) -> tuple[tuple, dict]:
    """A ``[1, 32, 32, C]`` image (shapes only): 32 px is the smallest that the stem and 3 downsamplings keep."""
    stem = next((v for k, v in tensors.items() if k.endswith(("stem.0.weight", "patch_embeddings.weight"))), None)
    channels = int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3
    return (np.zeros((1, 32, 32, channels), np.float32),), {}


def _hf_config(path: pathlib.Path | None) -> dict:
    cfg = path.parent / "config.json" if path is not None else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}


def hf_kwargs(tensors: dict[str, np.ndarray], path: pathlib.Path | None) -> dict:
    """Sizes from the tensors; the pooled-feature eps from ``config.json`` (refusing what tl_jax lacks)."""
    out = _sizes(tensors, HF_NAMES, HF_CONVNEXT.normalize)
    cfg = _hf_config(path)
    where = path.parent / "config.json" if path is not None else "config.json"
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}: hidden_act={cfg['hidden_act']!r}; tl_jax's convnext implements 'gelu' (erf)")
    if cfg.get("patch_size", 4) != 4:
        raise ValueError(f"{where}: patch_size={cfg['patch_size']}; tl_jax's convnext has a 4x4 stem")
    out["head_norm_eps"] = float(cfg.get("layer_norm_eps", 1e-12))  # ConvNextConfig's default
    return out


TIMM_CONVNEXT = Mapping("timm_convnext", MODELS, _rules(TIMM_NAMES),
                        infer_kwargs=lambda t, p: _sizes(t, TIMM_NAMES, lambda k: k), sample_input=_sample)
HF_CONVNEXT = Mapping("hf_convnext", MODELS, _rules(HF_NAMES), strip_prefixes=("convnext.",),
                      infer_kwargs=hf_kwargs, sample_input=_sample)
MAPPINGS.update({m.name: m for m in (TIMM_CONVNEXT, HF_CONVNEXT)})


def zoo_name(kwargs: dict) -> str:
    """``convnext_tiny`` / ``_small`` / ``_base`` when the sizes are that variant's, else ``convnext``."""
    names = {"T": "convnext_tiny", "S": "convnext_small", "B": "convnext_base"}
    for variant, (depths, dims) in CONVNEXT_SIZES.items():
        if tuple(kwargs.get("depths", ())) == depths and tuple(kwargs.get("dims", ())) == dims:
            return names[variant]
    return "convnext"


def is_hf_convnext(path: pathlib.Path) -> bool:
    """A folder whose ``config.json`` has ``model_type: convnext`` (``save_pretrained`` / the Hub)."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "convnext"
    except json.JSONDecodeError:
        return False


def hf_preprocessing(folder: pathlib.Path) -> dict:
    """ConvNextImageProcessor's inputs: ImageNet mean/std; shorter edge to ``size/crop_pct``, centre crop ``size``."""
    path = folder / "preprocessor_config.json"
    proc = json.loads(path.read_text()) if path.is_file() else {}
    size = int((proc.get("size") or {}).get("shortest_edge", 224))
    crop_pct = float(proc.get("crop_pct") or 224 / 256)
    resample = {2: "bilinear", 3: "bicubic"}.get(proc.get("resample", 3), "bicubic")
    return image_preprocessing(proc.get("image_mean"), proc.get("image_std"), size,
                               crop_pct if size < 384 else 1.0, resample,  # the processor crops only below 384
                               "preprocessor_config.json" if proc else "defaults of ConvNextImageProcessor")


def convert_hf_convnext(folder: str | pathlib.Path, *, out: str | pathlib.Path | None,
                        model_kwargs: dict | None = None, num_classes: int | None = None, ignore=(),
                        overwrite: bool = False) -> Converted:
    """A Hugging Face ConvNext folder (``config.json`` + weights) -> ``convnext*`` (``out=None``: no write)."""
    folder = pathlib.Path(folder)
    file = find_weight_file(folder)
    result = convert_weights(file, mapping="hf_convnext", model="convnext", out=None, model_kwargs=model_kwargs,
                             num_classes=num_classes, ignore=ignore)
    result = dataclasses.replace(result, model=zoo_name(result.model_kwargs))
    cfg = json.loads((folder / "config.json").read_text())
    return write_converted(result, out, source=folder, fmt="huggingface", mapping="hf_convnext", files=[file],
                           architecture=(cfg.get("architectures") or ["ConvNextModel"])[0],
                           preprocessing=hf_preprocessing(folder), overwrite=overwrite)


register_source("huggingface_convnext", is_hf_convnext, convert_hf_convnext)
