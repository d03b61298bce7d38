"""Hugging Face vision transformers -> tl_jax's ``vit`` (ViT, DeiT, DINOv2 (+ registers), CLIP and SigLIP towers).

A model folder as ``save_pretrained`` writes it or ``huggingface-cli download``
fetches it: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``,
or shards listed in ``model.safetensors.index.json``), optionally
``preprocessor_config.json``. The architecture comes from ``config.json``
(``model_type``; a full ``CLIPModel`` / ``SiglipModel`` gives its
``vision_config`` and its vision tower):

==========================  =========================================================
model_type                  tl_jax ``vit`` kwargs (besides the sizes)
==========================  =========================================================
vit                         cls pooling, exact GELU, eps 1e-12 (the config's)
deit                        + distillation token; the teacher model's two heads ->
                            one head on ``concat(cls, dist)`` (``pooling='cls_dist'``)
dinov2(_with_registers)     LayerScale, registers; a classifier -> ``pooling='cls_gap'``
clip(_vision_model)         pre-norm, no patch bias, QuickGELU; ``visual_projection``
                            -> ``projection_dim``
siglip(_vision_model)       no class token, MAP head (``pooling='map'``) or ``gap``
==========================  =========================================================

Tensors are renamed by :data:`RULES` (both the names on the Hub and transformers
5's in-memory names are accepted) and brought to flax's layout: Linear
``[out, in]`` -> ``[in, out]``; attention q/k/v ``[H*hd, D]`` -> ``[D, H, hd]``
and the output projection -> ``[H, hd, D]``; SigLIP's fused ``in_proj_weight``
split in three. Then :func:`tl_jax.weights.convert.map_tensors` checks that
every tensor is used once or dropped on purpose (:data:`DROPPED`: text towers,
ViT's unused pooler, mask tokens) and every variable filled. The output records
the source (format, architecture, file names and sha256) and the preprocessing
(:mod:`tl_jax.weights.hf_preprocessing`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from tl_jax.weights.convert import (META_FILE, Converted, WeightMappingError, map_tensors, register_source,
                                    target_shapes)
from tl_jax.weights.hf_preprocessing import preprocessing
from tl_jax.weights.mappings import Mapping, Rule
from tl_jax.weights.readers import read_tensors
from tl_jax.weights.source_record import save_and_hash
from tl_jax.weights.vit_common import layout as vit_layout

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
FAMILIES = {"vit": "vit", "deit": "deit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
            "clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
PREFIXES = ("vision_model.", "vit.", "deit.", "dinov2_with_registers.", "dinov2.")
ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_B, _L, _A = "params/backbone", r"(?:encoder\.layers?|layers)\.(\d+)", "MultiHeadDotProductAttention_0"
PATCH = r"embeddings\.(?:patch_embeddings\.projection|patch_embedding)\.weight"


def _pair(src: str, dst: str, w: str = "linear") -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"{dst}/kernel", w), Rule(rf"{src}\.bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"{dst}/scale"), Rule(rf"{src}\.bias", f"{dst}/bias")]


RULES: tuple[Rule, ...] = (
    Rule(r"embeddings\.(?:cls_token|class_embedding)", f"{_B}/cls", "token"),
    Rule(r"embeddings\.distillation_token", f"{_B}/dist", "token"),
    Rule(r"embeddings\.register_tokens", f"{_B}/reg", "token"),
    Rule(r"embeddings\.(?:position_embeddings|position_embedding\.weight)", f"{_B}/pos_embedding", "token"),
    *_pair(r"embeddings\.(?:patch_embeddings\.projection|patch_embedding)", f"{_B}/embedding", "conv"),
    *_norm(r"pre_layrnorm", f"{_B}/pre_norm"),
    *(Rule(rf"{_L}\.(?:attention\.attention\.{n}|(?:attention|self_attn)\.{n[0]}_proj)\.{w}",
           rf"{_B}/encoderblock_\1/{_A}/{n}/{t}", kind)
      for n in ("query", "key", "value")
      for w, t, kind in (("weight", "kernel", "heads_in"), ("bias", "bias", "heads_in"))),
    *_pair(rf"{_L}\.(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)",
           rf"{_B}/encoderblock_\1/{_A}/out", "heads_out"),
    *_norm(rf"{_L}\.(?:layernorm_before|norm1|layer_norm1)", rf"{_B}/encoderblock_\1/LayerNorm_0"),
    *_norm(rf"{_L}\.(?:layernorm_after|norm2|layer_norm2)", rf"{_B}/encoderblock_\1/LayerNorm_1"),
    Rule(rf"{_L}\.layer_scale1\.lambda1", rf"{_B}/encoderblock_\1/LayerScale_0/scale"),
    Rule(rf"{_L}\.layer_scale2\.lambda1", rf"{_B}/encoderblock_\1/LayerScale_1/scale"),
    *_pair(rf"{_L}\.(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)", rf"{_B}/encoderblock_\1/MlpBlock_0/Dense_0"),
    *_pair(rf"{_L}\.(?:output\.dense|mlp\.fc2|mlp\.weights_out)", rf"{_B}/encoderblock_\1/MlpBlock_0/Dense_1"),
    *_norm(r"(?:layernorm|post_layernorm)", f"{_B}/encoder_norm"),
    Rule(r"visual_projection\.weight", f"{_B}/projection/kernel", "linear"),
    Rule(r"head\.probe", f"{_B}/map_head/probe"),
    Rule(r"head\.attention\.in_proj_weight\[(query|key|value)\]", rf"{_B}/map_head/{_A}/\1/kernel", "heads_in"),
    Rule(r"head\.attention\.in_proj_bias\[(query|key|value)\]", rf"{_B}/map_head/{_A}/\1/bias", "heads_in"),
    *_pair(r"head\.attention\.out_proj", f"{_B}/map_head/{_A}/out", "heads_out"),
    *_norm(r"head\.layernorm", f"{_B}/map_head/LayerNorm_0"),
    *_pair(r"head\.mlp\.fc1", f"{_B}/map_head/MlpBlock_0/Dense_0"),
    *_pair(r"head\.mlp\.fc2", f"{_B}/map_head/MlpBlock_0/Dense_1"),
    *_pair(r"(?:classifier|cls_classifier\+distillation_classifier)", "params/head"),
)
# Source tensors the image model does not use: text towers, contrastive scalars, ViT's pooler (unused by its
# classifier), the masked-image-modelling token, buffers.
DROPPED = (r"text_model\..*", r"text_projection\.weight", r"logit_(?:scale|bias)", r"pooler\.dense\..*",
           r"embeddings\.mask_token", r".*position_ids")


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _fuse(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prefixes stripped; SigLIP's fused ``in_proj`` split in q/k/v; DeiT's two classifiers as one."""
    out = {_strip(k): np.asarray(v) for k, v in tensors.items()}
    for part in ("weight", "bias"):
        fused = out.pop(f"head.attention.in_proj_{part}", None)
        if fused is not None:
            for name, piece in zip(("query", "key", "value"), np.split(fused, 3, axis=0)):
                out[f"head.attention.in_proj_{part}[{name}]"] = piece
        cls, dist = out.get(f"cls_classifier.{part}"), out.get(f"distillation_classifier.{part}")
        if cls is not None and dist is not None:  # logits = (W_c cls + b_c + W_d dist + b_d) / 2
            del out[f"cls_classifier.{part}"], out[f"distillation_classifier.{part}"]
            joined = np.concatenate([cls, dist], axis=1) if part == "weight" else cls + dist
            out[f"cls_classifier+distillation_classifier.{part}"] = joined / 2
    return out


def find_weights(folder: pathlib.Path) -> list[pathlib.Path]:
    """The weight file(s) of a model folder (safetensors first; shards from an index)."""
    for name in INDEX_FILES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} has a config.json but none of {list(WEIGHT_FILES + INDEX_FILES)}")


def is_hf_vision(path: pathlib.Path) -> bool:
    """A folder whose ``config.json`` names a model type this module converts."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in FAMILIES
    except json.JSONDecodeError:
        return False


# family -> (attention heads, LayerNorm eps, hidden_act) of its transformers config class, for keys a
# config.json written with use_diff omits
CONFIG_DEFAULTS = {"vit": (12, 1e-12, "gelu"), "deit": (12, 1e-12, "gelu"), "dinov2": (12, 1e-6, "gelu"),
                   "clip": (12, 1e-5, "quick_gelu"), "siglip": (12, 1e-6, "gelu_pytorch_tanh")}


def _vision_config(cfg: dict) -> dict:
    """The image tower's config: ``vision_config`` of a full CLIP/SigLIP model, else the config itself."""
    return cfg.get("vision_config") or {} if cfg.get("model_type") in ("clip", "siglip") else cfg


def vit_kwargs(cfg: dict, tensors: dict[str, np.ndarray], source: str) -> dict:
    """tl_jax ``vit`` kwargs: sizes from the (prefix-stripped, fused) tensors, the rest from the config."""
    model_type = cfg["model_type"]
    family, vc = FAMILIES[model_type], _vision_config(cfg)
    heads, eps, act = (vc.get(k, d) for k, d in zip(("num_attention_heads", "layer_norm_eps", "hidden_act"),
                                                     CONFIG_DEFAULTS[family]))
    if act not in ACTS:
        raise ValueError(f"{source}: hidden_act={act!r} is not one of the activations tl_jax's vit implements "
                         f"{sorted(ACTS)}")
    patch = next((v for k, v in tensors.items() if re.fullmatch(PATCH, k)), None)
    fc1 = next((v for k, v in tensors.items()
                if re.fullmatch(rf"{_L}\.(intermediate\.dense|mlp\.fc1|mlp\.weights_in)\.weight", k)), None)
    swiglu = any(re.fullmatch(rf"{_L}\.mlp\.weights_in\.weight", k) for k in tensors)
    pos = next((v for k, v in tensors.items() if k in ("embeddings.position_embeddings",
                                                       "embeddings.position_embedding.weight")), None)
    if patch is None or fc1 is None or pos is None:
        raise ValueError(f"{source}: no patch embedding, MLP or position table among its tensors; is it a "
                         f"{model_type} image model?")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(rf"{_L}\.", k))}
    dist = "embeddings.distillation_token" in tensors
    cls = family != "siglip"
    grid = int(round((pos.reshape(-1, pos.shape[-1]).shape[0] - cls - dist) ** 0.5))
    kwargs = {"patch_size": int(patch.shape[-1]), "hidden_size": int(patch.shape[0]), "depth": max(layers) + 1,
              "num_heads": int(heads), "mlp_dim": int(fc1.shape[0]) // (2 if swiglu else 1),
              "act": "swiglu" if swiglu else ACTS[act], "norm_eps": float(eps),
              "pos_grid": [grid, grid], "pooling": "cls", "class_token": cls}
    if dist:
        kwargs["dist_token"] = True
        if "cls_classifier+distillation_classifier.weight" in tensors:
            kwargs["pooling"] = "cls_dist"
    if family == "dinov2":
        kwargs["layer_scale"] = float(vc.get("layerscale_value", 1.0))
        kwargs["num_registers"] = int(tensors["embeddings.register_tokens"].shape[1]) \
            if "embeddings.register_tokens" in tensors else 0
        kwargs["pos_interp"] = "bicubic_aa" if model_type == "dinov2_with_registers" else "bicubic"
        if "classifier.weight" in tensors:
            kwargs["pooling"] = "cls_gap"
    if family == "clip":
        kwargs.update(patch_bias=False, pre_norm=True)
        if "visual_projection.weight" in tensors:
            kwargs["projection_dim"] = int(tensors["visual_projection.weight"].shape[0])
    if family == "siglip":
        kwargs["pooling"] = "map" if "head.probe" in tensors else "gap"
    return kwargs


def convert_hf_vision(folder: str | pathlib.Path, *, out: str | pathlib.Path | None, model_kwargs: dict | None = None,
                      num_classes: int | None = None, ignore: Sequence[str] = (), overwrite: bool = False) -> Converted:
    """Converts a Hugging Face model folder into the ``vit`` model (module doc); ``out=None``: no write.

    ``ignore``: regexes of source names (wrapper prefix such as ``vision_model.`` removed) to drop, e.g.
    ``classifier\\..*`` to keep a fresh head of another size, ``visual_projection\\.weight`` for CLIP's
    features before the projection. Raises :class:`WeightMappingError` listing every mismatch.
    """
    folder = pathlib.Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    files = find_weights(folder)
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw.update(read_tensors(f))
    tensors = _fuse(raw)
    dropped = sorted(k for k in tensors if any(re.fullmatch(rx, k) for rx in DROPPED))
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    visible = {k: v for k, v in kept.items() if not any(re.fullmatch(rx, k) for rx in ignore)}
    kwargs = {**vit_kwargs(cfg, visible, str(folder)), **(model_kwargs or {})}
    head = visible.get("classifier.bias", visible.get("cls_classifier+distillation_classifier.bias"))
    if head is not None:
        if num_classes is not None and num_classes != head.shape[0]:
            raise ValueError(f"{folder} has a {head.shape[0]}-class classifier but num_classes={num_classes}: "
                             r"leave num_classes out, or ignore the classifier ('classifier\..*')")
        num_classes = int(head.shape[0])
    num_classes = num_classes or 1
    g, p = kwargs["pos_grid"], kwargs["patch_size"]
    channels = next(v.shape[1] for k, v in kept.items() if re.fullmatch(PATCH, k))
    sample = ((np.zeros((1, g[0] * p, g[1] * p, channels), np.float32),), {})
    targets = target_shapes("vit", num_classes, kwargs, sample)
    heads = int(kwargs["num_heads"])
    flat, ignored = map_tensors(kept, Mapping("hf_vision", ("vit",), RULES), targets, ignore, source=str(folder),
                                layout=lambda kind, x: vit_layout(kind, x, heads))
    variables = traverse_util.unflatten_dict(flat, sep="/")
    result = Converted(None, "vit", num_classes, kwargs, variables, tuple(dropped + ignored))
    if out is None:
        return result
    out = pathlib.Path(out).absolute()
    hashes = save_and_hash(out, variables, files, overwrite=overwrite)
    meta = {"source": str(folder.absolute()), "format": "huggingface", "model_type": cfg["model_type"],
            "architecture": (cfg.get("architectures") or [None])[0],
            "files": hashes, "mapping": "hf_vision", "model": "vit",
            "num_classes": num_classes, "has_head": head is not None, "model_kwargs": kwargs,
            "dropped": list(result.dropped),
            "preprocessing": preprocessing(folder, FAMILIES[cfg["model_type"]], g[0] * p)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return dataclasses.replace(result, out=out)


register_source("huggingface", is_hf_vision, convert_hf_vision)
__all__ = ["WeightMappingError", "convert_hf_vision", "is_hf_vision"]
