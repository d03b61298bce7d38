"""big_vision / vision_transformer ViT ``.npz`` checkpoints -> tl_jax's ``vit``.

The files ``gs://big_vision/...``, ``gs://vit_models/augreg/...`` and the SigLIP
``.npz`` releases: flat ``'/'``-joined flax names, possibly under ``params/``,
``opt/target/`` or (a two-tower SigLIP/LiT model) ``params/img/``, whose text tower
(``params/txt/``) and ``t``/``b`` scalars are dropped on purpose. Recognised from
the names (``embedding/kernel`` under one of those prefixes), no flags needed.

The layouts are flax's already (``MultiHeadDotProductAttention`` q/k/v kernels
``[D, H, hd]``), so tensors are copied; what differs between vintages, as
``big_vision/models/vit.py``'s ``fix_old_checkpoints`` and timm's ``_load_weights``
read them:

* block names: big_vision's ``LayerNorm_0/1``, ``MultiHeadDotProductAttention_0``,
  ``MlpBlock_0``; the original vision_transformer's ``LayerNorm_0/2``, ``..._1``, ``MlpBlock_3``;
* scanned blocks (``Transformer/encoderblock/...`` with a leading depth axis) are unstacked;
* positions: ``pos_embedding`` (big_vision: patches only, added before the class token
  is prepended: a zero row is put first for tl_jax's table over all tokens),
  ``Transformer/posembed_input/pos_embedding`` (vision_transformer: class token included);
* pooling: ``cls`` when there is a ``cls`` token, ``map`` with a ``MAPHead_0``, else ``gap``.

GELU is flax's (tanh) one, LayerNorm eps 1e-6, heads from the query kernel. A
``pre_logits`` layer (the old i21k checkpoints' tanh representation) is refused in
one line: ``ignore=['pre_logits/.*']`` drops it (features are then the pooled
tokens). At another input size the position grid is resized as big_vision's and
vision_transformer's ``resample_posemb`` do it, ``scipy.ndimage.zoom(order=1)``
(``pos_interp='zoom_linear'``: :mod:`tl_jax.models.vit_posemb`), the class row kept.
"""
from __future__ import annotations

import pathlib
import re
import zipfile

import numpy as np

from tl_jax.weights.convert import Converted, register_source
from tl_jax.weights.readers import read_tensors
from tl_jax.weights.vit_common import B, MHA, convert_vit, prepend_prefix_positions

PREFIXES = ("opt/target/", "params/img/", "params/", "")
_L, _E = r"Transformer/encoderblock_(\d+)", rf"{B}/encoderblock_\1"
RULES = (
    (r"embedding/(kernel|bias)", rf"{B}/embedding/\1", "copy"), ("cls", f"{B}/cls", "token"),
    ("pos_embedding", f"{B}/pos_embedding", "token"),
    (rf"{_L}/LayerNorm_0/(scale|bias)", rf"{_E}/LayerNorm_0/\2", "copy"),
    (rf"{_L}/LayerNorm_[12]/(scale|bias)", rf"{_E}/LayerNorm_1/\2", "copy"),
    (rf"{_L}/MultiHeadDotProductAttention_[01]/(\w+)/(kernel|bias)", rf"{_E}/{MHA}/\2/\3", "copy"),
    (rf"{_L}/MlpBlock_[03]/(Dense_[01])/(kernel|bias)", rf"{_E}/MlpBlock_0/\2/\3", "copy"),
    (r"Transformer/encoder_norm/(scale|bias)", rf"{B}/encoder_norm/\1", "copy"),
    (r"MAPHead_0/probe", f"{B}/map_head/probe", "copy"),
    (r"MAPHead_0/(\w+)/(\w+)/(kernel|bias|scale)", rf"{B}/map_head/\1/\2/\3", "copy"),
    (r"MAPHead_0/LayerNorm_0/(scale|bias)", rf"{B}/map_head/LayerNorm_0/\1", "copy"),
    (r"head/(kernel|bias)", r"params/head/\1", "copy"),
)


def _names(path: pathlib.Path) -> list[str]:
    """Array names of an ``.npz`` without reading the arrays."""
    with zipfile.ZipFile(path) as z:
        return [n[:-4] if n.endswith(".npy") else n for n in z.namelist()]


def prefix_of(names: list[str]) -> str | None:
    """The wrapper prefix under which ``embedding/kernel`` sits, or None (not a big_vision ViT)."""
    return next((p for p in PREFIXES if f"{p}embedding/kernel" in names), None)


def is_big_vision(path: pathlib.Path) -> bool:
    """An ``.npz`` file holding a ViT's ``embedding/kernel`` (module doc)."""
    if not (path.is_file() and path.suffix == ".npz"):
        return False
    try:
        return prefix_of(_names(path)) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def canonical(raw: dict[str, np.ndarray], where: str, ignore=()) -> tuple[dict[str, np.ndarray], list[str]]:
    """(tensors under today's big_vision names, names dropped): prefix cut, scan unstacked, ``ignore`` applied.

    ``ignore`` regexes match the names without the wrapper prefix (``pre_logits/.*``); one matching nothing
    is an error, as in :func:`tl_jax.weights.convert.map_tensors`.
    """
    prefix = prefix_of(list(raw))
    if prefix is None:
        raise ValueError(f"{where}: no embedding/kernel under any of {list(PREFIXES)}; is it a big_vision ViT?")
    dropped = sorted(k for k in raw if not k.startswith(prefix))
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = key[len(prefix):]
        if key in dropped or any(re.fullmatch(rx, name) for rx in ignore):
            dropped += [] if key in dropped else [key]
            continue
        name = {"Transformer/posembed_input/pos_embedding": "pos_embedding",
                "Transformer/pos_embedding": "pos_embedding"}.get(name, name)
        m = re.fullmatch(r"Transformer/encoderblock/(.+)", name)
        if m:  # nn.scan: [depth, ...]
            out.update({f"Transformer/encoderblock_{i}/{m.group(1)}": v for i, v in enumerate(np.asarray(value))})
        else:
            out[name] = np.asarray(value)
    for rx in ignore:
        if not any(re.fullmatch(rx, k[len(prefix):]) for k in raw if k.startswith(prefix)):
            raise ValueError(f"{where}: ignore rule {rx!r} matches no tensor (names without {prefix!r})")
    if any(k.startswith("pre_logits/") for k in out):
        raise ValueError(f"{where}: a pre_logits (tanh representation) layer, which tl_jax's vit lacks; pass "
                         f"ignore=['pre_logits/.*'] (--ignore 'pre_logits/.*') to drop it")
    return out, dropped


def vit_kwargs(t: dict[str, np.ndarray], where: str) -> dict:
    """``vit`` kwargs from the shapes (patch, width, depth, heads, MLP, grid, pooling)."""
    embed, block0 = t["embedding/kernel"], "Transformer/encoderblock_0/"

    def first(pattern: str) -> np.ndarray | None:
        return next((v for k, v in t.items() if re.fullmatch(block0 + pattern, k)), None)

    query, mlp = first(r"MultiHeadDotProductAttention_[01]/query/kernel"), first(r"MlpBlock_[03]/Dense_0/kernel")
    if query is None or mlp is None or "pos_embedding" not in t:
        raise ValueError(f"{where}: no attention / MLP / position tensors in block 0")
    cls = "cls" in t
    rows = t["pos_embedding"].reshape(-1, embed.shape[-1]).shape[0]
    grid = int(round((rows - (cls and int(round(rows ** 0.5)) ** 2 != rows)) ** 0.5))
    pooling = "cls" if cls else "map" if "MAPHead_0/probe" in t else "gap"
    return {"patch_size": int(embed.shape[0]), "hidden_size": int(embed.shape[-1]), "num_heads": int(query.shape[1]),
            "depth": 1 + max(int(m.group(1)) for k in t if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))),
            "mlp_dim": int(mlp.shape[1]), "act": "gelu_tanh", "norm_eps": 1e-6, "pos_grid": [grid, grid],
            "pos_interp": "zoom_linear", "pooling": pooling, "class_token": cls, "patch_bias": "embedding/bias" in t}


def convert_big_vision(path: str | pathlib.Path, *, out: str | pathlib.Path | None, model_kwargs: dict | None = None,
                       num_classes: int | None = None, ignore=(), overwrite: bool = False) -> Converted:
    """A big_vision ``.npz`` -> ``vit`` (module doc); ``out=None``: nothing written."""
    path = pathlib.Path(path)
    tensors, dropped = canonical(read_tensors(path, "npz"), str(path), ignore)
    kwargs = {**vit_kwargs(tensors, str(path)), **(model_kwargs or {})}
    if kwargs["class_token"] and tensors["pos_embedding"].reshape(-1, kwargs["hidden_size"]).shape[0] == \
            kwargs["pos_grid"][0] ** 2:  # big_vision: positions added before the class token is prepended
        tensors["pos_embedding"] = prepend_prefix_positions(tensors["pos_embedding"], 1)
    size = kwargs["pos_grid"][0] * kwargs["patch_size"]
    pp = {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": [size, size], "resize": None,
          "interpolation": "bilinear", "source": "defaults of big_vision (value_range(-1, 1))"}
    return convert_vit(tensors, RULES, kwargs, source=path, files=[path], fmt="big_vision",
                       architecture=f"ViT {kwargs['pooling']} D={kwargs['hidden_size']} depth={kwargs['depth']}",
                       mapping="big_vision", dropped=dropped, preprocessing=pp, out=out,
                       num_classes=num_classes, ignore=(), overwrite=overwrite)


register_source("big_vision", is_big_vision, convert_big_vision)
