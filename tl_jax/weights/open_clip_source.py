"""open_clip image towers -> tl_jax's ``vit`` (with the projection to the joint embedding).

What ``huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` (or any
``hf-hub:`` open_clip model) fetches, and open_clip's ``push_to_hf_hub`` writes: a
folder with ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``) and
``open_clip_config.json`` (``{"model_cfg": {"embed_dim", "quick_gelu", "vision_cfg":
{...}}, "preprocess_cfg": {"mean", "std", ...}}``); a weights file with that config
beside it converts too. Only the ``visual.`` tensors are converted; the text tower
and ``logit_scale`` are dropped on purpose (listed in the record).

Tower (open_clip's ``VisionTransformer``): conv patch embedding without bias, a
class token, positions on all tokens, ``ln_pre`` (tl_jax ``pre_norm``), pre-LN
blocks (``nn.MultiheadAttention``: ``in_proj`` split in q/k/v), optional LayerScale
(``ls_1``/``ls_2``), ``ln_post`` then the class token (``pool_type='tok'``), then
``proj`` (``[width, embed_dim]``, already ``x @ proj``: tl_jax ``projection``).
GELU exact, or QuickGELU when ``model_cfg.quick_gelu`` (OpenAI weights); LayerNorm
eps 1e-5; heads = ``width / head_width`` (64 by default). Attention pooling,
``avg`` pooling, ``final_ln_after_pool`` and timm-trunk towers are refused in one line.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from tl_jax.weights.convert import Converted, register_source
from tl_jax.weights.readers import read_tensors
from tl_jax.weights.source_record import find_weight_file
from tl_jax.weights.vit_common import B, MHA, convert_vit, split_fused

CONFIG = "open_clip_config.json"
OPENAI_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_L, _E = r"transformer\.resblocks\.(\d+)", rf"{B}/encoderblock_\1"


def _pair(src: str, dst: str, kind: str = "copy") -> list[tuple[str, str, str]]:
    weight = "kernel" if kind in ("linear", "heads_out") else "scale"
    return [(rf"{src}\.weight", f"{dst}/{weight}", kind), (rf"{src}\.bias", f"{dst}/bias", "copy")]


RULES = (
    ("class_embedding", f"{B}/cls", "token"), ("positional_embedding", f"{B}/pos_embedding", "token"),
    ("conv1\\.weight", f"{B}/embedding/kernel", "conv"), *_pair("ln_pre", f"{B}/pre_norm"),
    *_pair(rf"{_L}\.ln_1", f"{_E}/LayerNorm_0"), *_pair(rf"{_L}\.ln_2", f"{_E}/LayerNorm_1"),
    (rf"{_L}\.attn\.in_proj_weight\[(query|key|value)\]", rf"{_E}/{MHA}/\2/kernel", "heads_in"),
    (rf"{_L}\.attn\.in_proj_bias\[(query|key|value)\]", rf"{_E}/{MHA}/\2/bias", "heads_in"),
    *_pair(rf"{_L}\.attn\.out_proj", f"{_E}/{MHA}/out", "heads_out"),
    (rf"{_L}\.ls_1\.gamma", f"{_E}/LayerScale_0/scale", "copy"),
    (rf"{_L}\.ls_2\.gamma", f"{_E}/LayerScale_1/scale", "copy"),
    *_pair(rf"{_L}\.mlp\.c_fc", f"{_E}/MlpBlock_0/Dense_0", "linear"),
    *_pair(rf"{_L}\.mlp\.c_proj", f"{_E}/MlpBlock_0/Dense_1", "linear"),
    *_pair("ln_post", f"{B}/encoder_norm"), ("proj", f"{B}/projection/kernel", "copy"),
)


def _config_path(path: pathlib.Path) -> pathlib.Path:
    return (path if path.is_dir() else path.parent) / CONFIG


def is_open_clip(path: pathlib.Path) -> bool:
    """A folder with ``open_clip_config.json`` (or a weights file beside one)."""
    return _config_path(path).is_file()


def tower_kwargs(cfg: dict, t: dict[str, np.ndarray], where: str) -> dict:
    """``vit`` kwargs of the image tower: sizes from the tensors, heads/activation from the config."""
    model_cfg = cfg.get("model_cfg") or {}
    vc = model_cfg.get("vision_cfg") or {}
    for key, bad in (("timm_model_name", lambda v: bool(v)), ("attentional_pool", lambda v: bool(v)),
                     ("pool_type", lambda v: v not in (None, "tok")), ("final_ln_after_pool", lambda v: bool(v))):
        if key in vc and bad(vc[key]):
            raise ValueError(f"{where}: vision_cfg.{key}={vc[key]!r}; tl_jax converts open_clip's plain ViT tower "
                             f"(class-token pooling, ln_post before the pooling)")
    conv, fc = t.get("conv1.weight"), t.get("transformer.resblocks.0.mlp.c_fc.weight")
    if conv is None or fc is None or "positional_embedding" not in t:
        raise ValueError(f"{where}: no visual.conv1 / resblocks.0.mlp.c_fc / positional_embedding tensors; "
                         f"is it an open_clip ViT?")
    width = int(conv.shape[0])
    grid = int(round((t["positional_embedding"].reshape(-1, width).shape[0] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("transformer.resblocks."))
    kwargs = {"patch_size": int(conv.shape[-1]), "hidden_size": width, "depth": depth,
              "num_heads": width // int(vc.get("head_width", 64)), "mlp_dim": int(fc.shape[0]),
              "act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu", "norm_eps": 1e-5,
              "pos_grid": [grid, grid], "pos_interp": "bicubic_aa", "pooling": "cls", "class_token": True,
              "patch_bias": False, "pre_norm": "ln_pre.weight" in t,
              "layer_scale": 1.0 if "transformer.resblocks.0.ls_1.gamma" in t else None}
    if "proj" in t:
        kwargs["projection_dim"] = int(t["proj"].shape[1])
    return kwargs


def preprocessing(cfg: dict, image_size: int) -> dict:
    """open_clip's eval transform: shorter edge to ``image_size`` (bicubic), centre crop, the config's mean/std."""
    pp = cfg.get("preprocess_cfg") or {}
    size = (cfg.get("model_cfg") or {}).get("vision_cfg", {}).get("image_size", image_size)
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    return {"mean": [float(v) for v in pp.get("mean", OPENAI_MEAN_STD[0])],
            "std": [float(v) for v in pp.get("std", OPENAI_MEAN_STD[1])], "image_size": size,
            "resize": min(size), "interpolation": pp.get("interpolation", "bicubic"), "source": CONFIG}


def convert_open_clip(path: str | pathlib.Path, *, out: str | pathlib.Path | None, model_kwargs: dict | None = None,
                      num_classes: int | None = None, ignore=(), overwrite: bool = False) -> Converted:
    """An open_clip folder / file -> ``vit`` with ``projection_dim`` (module doc); ``out=None``: nothing written."""
    path = pathlib.Path(path)
    file = find_weight_file(path)
    cfg_path = _config_path(path)
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    raw = read_tensors(file)
    has_prefix = any(k.startswith("visual.") for k in raw)
    dropped = sorted(k for k in raw if has_prefix and not k.startswith("visual."))
    tower = {k[len("visual."):] if has_prefix else k: v for k, v in raw.items() if k not in dropped}
    tower = split_fused(tower, r"transformer\.resblocks\.\d+\.attn\.in_proj_(?:weight|bias)")
    kwargs = {**tower_kwargs(cfg, tower, str(path)), **(model_kwargs or {})}
    image = kwargs["pos_grid"][0] * kwargs["patch_size"]
    return convert_vit(tower, RULES, kwargs, source=path, files=[file], fmt="open_clip",
                       architecture=(cfg.get("model_cfg") or {}).get("name") or "open_clip ViT", mapping="open_clip",
                       dropped=dropped, preprocessing=preprocessing(cfg, image), out=out, num_classes=num_classes,
                       ignore=ignore, overwrite=overwrite)


register_source("open_clip", is_open_clip, convert_open_clip)
