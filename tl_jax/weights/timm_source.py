"""timm checkpoints -> tl_jax models: ``convnext_*`` -> ``convnext``, ``resnet*`` -> ``resnet18`` / ``resnet50``,
``vit_*`` / ``deit_*`` -> ``vit``.

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
  the deep-stem / avg-down variants (``resnet50d``, ``resnet50s``) and other depths are refused in one line;
* ``vit_`` / ``deit_`` / ``deit3_`` (class-token pooling, timm's ``global_pool='token'``): the sizes from the
  tensors, the heads from ``config.json``'s ``model_args`` or the size name (tiny 3, small 6, base 12,
  large/huge/giant 16); exact GELU (QuickGELU for ``*quickgelu*``), LayerNorm eps 1e-6 (1e-5 for ``*clip*``);
  ``attn.qkv`` split in q/k/v; a patch-only position table (``no_embed_class``, DeiT-3) gets zero rows for
  the prefix tokens; a distilled DeiT's two heads become one head on ``concat(cls, dist)`` (``pooling=
  'cls_dist'``, weights and bias halved: the mean of the two heads' logits, timm's eval output). Position
  tables are resized to other input sizes with antialiased bicubic, as timm does. ``global_pool='avg'``
  (the mean of the patch tokens, registers and class token left out; with ``fc_norm`` the final norm on the
  pooled features: ``pool_norm``) and ``'map'`` (timm's ``attn_pool`` as the ``map`` head, its fused ``kv``
  split; refused when prefix tokens are excluded from it); register tokens (``reg_token``, no positions, as
  timm's ``no_embed_class`` reg models have them).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
from safetensors import safe_open

from tl_jax.weights.convert import Converted, convert_weights, register_source
from tl_jax.weights.convnext import zoo_name
from tl_jax.weights.readers import read_tensors
from tl_jax.weights.source_record import IMAGENET, find_weight_file, image_preprocessing, write_converted
from tl_jax.weights.vit_common import B, MHA, convert_vit, prepend_prefix_positions, split_fused

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
    if arch.startswith(("vit_", "deit_", "deit3_")) and not arch.startswith(("vit_hybrid", "vit_relpos")):
        return "vit"
    raise ValueError(f"timm architecture {architecture!r} is not one tl_jax converts: convnext_* (v1), "
                     f"torchvision-layout resnet18/resnet50 (not the -d/-s deep-stem variants), vit_*/deit_*")


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


def tensor_names(file: pathlib.Path) -> list[str]:
    """The tensor names of ``file``: from a safetensors header alone (no data read), else by reading it."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="numpy") as f:
            return list(f.keys())
    return list(read_tensors(file))


def _resnet_model(tensors, architecture: str) -> str:
    """``resnet18`` / ``resnet50`` from the block counts in the names ``tensors`` (one line for other depths)."""
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

VIT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}
_L, _E = r"blocks\.(\d+)", rf"{B}/encoderblock_\1"
VIT_RULES = (
    (r"cls_token", f"{B}/cls", "token"), (r"dist_token", f"{B}/dist", "token"),
    (r"pos_embed", f"{B}/pos_embedding", "token"),
    (r"patch_embed\.proj\.weight", f"{B}/embedding/kernel", "conv"),
    (r"patch_embed\.proj\.bias", f"{B}/embedding/bias", "copy"),
    (r"norm_pre\.weight", f"{B}/pre_norm/scale", "copy"), (r"norm_pre\.bias", f"{B}/pre_norm/bias", "copy"),
    (rf"{_L}\.norm1\.weight", f"{_E}/LayerNorm_0/scale", "copy"),
    (rf"{_L}\.norm1\.bias", f"{_E}/LayerNorm_0/bias", "copy"),
    (rf"{_L}\.attn\.qkv\.weight\[(query|key|value)\]", rf"{_E}/{MHA}/\2/kernel", "heads_in"),
    (rf"{_L}\.attn\.qkv\.bias\[(query|key|value)\]", rf"{_E}/{MHA}/\2/bias", "heads_in"),
    (rf"{_L}\.attn\.proj\.weight", f"{_E}/{MHA}/out/kernel", "heads_out"),
    (rf"{_L}\.attn\.proj\.bias", f"{_E}/{MHA}/out/bias", "copy"),
    (rf"{_L}\.ls1\.gamma", f"{_E}/LayerScale_0/scale", "copy"),
    (rf"{_L}\.ls2\.gamma", f"{_E}/LayerScale_1/scale", "copy"),
    (rf"{_L}\.norm2\.weight", f"{_E}/LayerNorm_1/scale", "copy"),
    (rf"{_L}\.norm2\.bias", f"{_E}/LayerNorm_1/bias", "copy"),
    (rf"{_L}\.mlp\.fc1\.weight", f"{_E}/MlpBlock_0/Dense_0/kernel", "linear"),
    (rf"{_L}\.mlp\.fc1\.bias", f"{_E}/MlpBlock_0/Dense_0/bias", "copy"),
    (rf"{_L}\.mlp\.fc2\.weight", f"{_E}/MlpBlock_0/Dense_1/kernel", "linear"),
    (rf"{_L}\.mlp\.fc2\.bias", f"{_E}/MlpBlock_0/Dense_1/bias", "copy"),
    (r"(?:fc_)?norm\.weight", f"{B}/encoder_norm/scale", "copy"),  # fc_norm: the same norm on the pooled features
    (r"(?:fc_)?norm\.bias", f"{B}/encoder_norm/bias", "copy"),
    (r"reg_token", f"{B}/reg", "token"), (r"attn_pool\.latent", f"{B}/map_head/probe", "token"),
    (r"attn_pool\.q\.weight", f"{B}/map_head/{MHA}/query/kernel", "heads_in"),
    (r"attn_pool\.q\.bias", f"{B}/map_head/{MHA}/query/bias", "heads_in"),
    (r"attn_pool\.kv\.weight\[(key|value)\]", rf"{B}/map_head/{MHA}/\1/kernel", "heads_in"),
    (r"attn_pool\.kv\.bias\[(key|value)\]", rf"{B}/map_head/{MHA}/\1/bias", "heads_in"),
    (r"attn_pool\.proj\.weight", f"{B}/map_head/{MHA}/out/kernel", "heads_out"),
    (r"attn_pool\.proj\.bias", f"{B}/map_head/{MHA}/out/bias", "copy"),
    (r"attn_pool\.norm\.weight", f"{B}/map_head/LayerNorm_0/scale", "copy"),
    (r"attn_pool\.norm\.bias", f"{B}/map_head/LayerNorm_0/bias", "copy"),
    (r"attn_pool\.mlp\.fc1\.weight", f"{B}/map_head/MlpBlock_0/Dense_0/kernel", "linear"),
    (r"attn_pool\.mlp\.fc1\.bias", f"{B}/map_head/MlpBlock_0/Dense_0/bias", "copy"),
    (r"attn_pool\.mlp\.fc2\.weight", f"{B}/map_head/MlpBlock_0/Dense_1/kernel", "linear"),
    (r"attn_pool\.mlp\.fc2\.bias", f"{B}/map_head/MlpBlock_0/Dense_1/bias", "copy"),
    (r"head\.weight", "params/head/kernel", "linear"), (r"head\.bias", "params/head/bias", "copy"),
)


def _vit_heads(cfg: dict, architecture: str, width: int) -> int:
    """Attention heads: ``model_args.num_heads``, else by the size in the name, else width / 64."""
    if "num_heads" in (cfg.get("model_args") or {}):
        return int(cfg["model_args"]["num_heads"])
    size = next((n for n in VIT_HEADS if f"_{n}_" in f"{architecture.split('.')[0]}_"), None)
    return VIT_HEADS[size] if size else max(1, width // 64)


def timm_vit_tensors(raw: dict[str, np.ndarray], cfg: dict, architecture: str) -> tuple[dict, dict]:
    """(tensors ready for :data:`VIT_RULES`, ``vit`` kwargs) of a timm ViT / DeiT (module doc)."""
    args = cfg.get("model_args") or {}
    pool = args.get("global_pool", cfg.get("global_pool")) or ("map" if "attn_pool.latent" in raw else "avg"
                                                              if "fc_norm.weight" in raw else "token")
    if pool not in ("token", "avg", "map"):
        raise ValueError(f"timm {architecture}: global_pool={pool!r}; tl_jax's vit converts 'token', 'avg' and 'map'")
    registers = int(np.shape(raw["reg_token"])[1]) if "reg_token" in raw else 0
    if pool == "map" and ("cls_token" in raw or registers) and not args.get("pool_include_prefix"):
        raise ValueError(f"timm {architecture}: attention pooling over the patches without the prefix tokens "
                         f"(pool_include_prefix=False); tl_jax's map head reads every token")
    t = split_fused(raw, r"blocks\.\d+\.attn\.qkv\.(?:weight|bias)")
    for name in ("attn_pool.kv.weight", "attn_pool.kv.bias"):  # [2D, ...] -> key, value
        if name in t:
            t[f"{name}[key]"], t[f"{name}[value]"] = np.split(np.asarray(t.pop(name)), 2, axis=0)
    if "head_dist.weight" in t and "head.weight" in t:  # timm eval: (head(cls) + head_dist(dist)) / 2
        t["head.weight"] = np.concatenate([t["head.weight"], t.pop("head_dist.weight")], axis=1) / 2
        t["head.bias"] = (t["head.bias"] + t.pop("head_dist.bias")) / 2
    patch, fc1 = t.get("patch_embed.proj.weight"), t.get("blocks.0.mlp.fc1.weight")
    if patch is None or fc1 is None or "pos_embed" not in t:
        raise ValueError(f"timm {architecture}: no patch_embed.proj / blocks.0.mlp.fc1 / pos_embed tensors")
    n_prefix = int("cls_token" in t) + int("dist_token" in t)
    rows = t["pos_embed"].reshape(-1, t["pos_embed"].shape[-1]).shape[0]
    if n_prefix and int(round(rows ** 0.5)) ** 2 == rows:  # no_embed_class: positions on the patches only
        t["pos_embed"] = prepend_prefix_positions(t["pos_embed"], n_prefix)
        rows += n_prefix
    elif registers and int(round((rows - n_prefix) ** 0.5)) ** 2 != rows - n_prefix:
        raise ValueError(f"timm {architecture}: positions on the {registers} register tokens (no_embed_class="
                         f"False); tl_jax's vit adds none to registers (DINOv2's and timm's reg models')")
    grid = int(round((rows - n_prefix) ** 0.5))
    arch = architecture.split(".")[0]
    kwargs = {"patch_size": int(patch.shape[-1]), "hidden_size": int(patch.shape[0]),
              "depth": 1 + max(int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))),
              "num_heads": _vit_heads(cfg, architecture, int(patch.shape[0])), "mlp_dim": int(fc1.shape[0]),
              "act": "quick_gelu" if "quickgelu" in arch else "gelu", "norm_eps": 1e-5 if "clip" in arch else 1e-6,
              "pos_grid": [grid, grid], "pos_interp": "bicubic_aa", "class_token": "cls_token" in t,
              "pooling": {"avg": "gap", "map": "map"}.get(pool, "cls_dist" if "dist_token" in t else "cls"
                                                          if "cls_token" in t else "gap"),
              "num_registers": registers, "pool_norm": "fc_norm.weight" in t,
              "dist_token": "dist_token" in t, "patch_bias": "patch_embed.proj.bias" in t,
              "pre_norm": "norm_pre.weight" in t, "layer_scale": 1.0 if "blocks.0.ls1.gamma" in t else None}
    return t, kwargs


def _convert_timm_vit(path: pathlib.Path, file: pathlib.Path, cfg: dict, architecture: str, *, out,
                      model_kwargs, num_classes, ignore, overwrite) -> Converted:
    tensors, kwargs = timm_vit_tensors(read_tensors(file), cfg, architecture)
    return convert_vit(tensors, VIT_RULES, {**kwargs, **(model_kwargs or {})}, source=path, files=[file],
                       fmt="timm", architecture=architecture, mapping="timm_vit", dropped=(),
                       preprocessing=preprocessing(cfg, architecture), out=out, num_classes=num_classes,
                       ignore=ignore, overwrite=overwrite)


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
    if fam == "vit":
        return _convert_timm_vit(path, file, cfg, architecture, out=out, model_kwargs=model_kwargs,
                                 num_classes=num_classes, ignore=ignore, overwrite=overwrite)
    if fam == "convnext":
        mapping, model = "timm_convnext", "convnext"
    else:
        mapping, model = "torchvision_resnet", _resnet_model(tensor_names(file), architecture)
    result = convert_weights(file, mapping=mapping, model=model, out=None, model_kwargs=model_kwargs,
                             num_classes=num_classes, ignore=ignore)
    if fam == "convnext":
        result = dataclasses.replace(result, model=zoo_name(result.model_kwargs))
    return write_converted(result, out, source=path, fmt="timm", architecture=architecture, mapping=mapping,
                           files=[file], preprocessing=preprocessing(cfg, architecture), overwrite=overwrite)


register_source("timm", is_timm, convert_timm)
