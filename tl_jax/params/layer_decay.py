"""Layer-wise learning-rate decay as a ``param_rules`` table (timm / BEiT's ``layer_decay``).

Each param gets a depth ``d`` (0 = the input side) and the learning-rate
multiplier ``rate ** (d_max − d)``: the head trains at the base rate, each
layer below it at ``rate`` times the layer above, so the early (generic)
features move least. Depths by model family (param paths of ``tl_jax.models``;
the NNX twins ``*_nnx`` have the same paths):

- ``cnn``: ``backbone/conv1`` 0 < ``conv2`` 1 < ``fc`` 2 < ``head`` 3;
- ``resnet18`` / ``resnet50`` (any ``resnet*``): the stem ``backbone/conv1``,
  ``bn1`` 0 < stage ``backbone/layerS_*`` S (1..4) < ``head`` 5;
- ``vit``: ``backbone/embedding``, ``cls``, ``dist``, ``reg``, ``pos_embedding``,
  ``pre_norm`` 0 < block ``encoderblock_i`` i+1 < ``head`` (and what follows the
  blocks: ``encoder_norm``, ``map_head``, ``projection``) L+1;
- ``bert``: ``backbone/embeddings`` 0 < ``layer_i`` i+1 < ``head`` L+1;
- ``convnext`` (any ``convnext*``): the stem ``backbone/stem_*`` 0 < stage ``backbone/stageS_*`` (its
  downsampling and blocks) S+1 (1..4) < ``head`` (and the pooled-feature ``norm``) 5.

The table has one rule per depth present, ``[regex over '/'-joined paths,
multiplier]``, lowest depth first, so it matches every param and every rule
matches some (what :func:`tl_jax.params.param_rules.match_rules` checks);
it is used as ``config.param_rules = layer_decay("resnet18", 0.7)`` and the
groups table of a run shows one group per multiplier. The depths come from the
params (``params``: a pytree or its ``jax.eval_shape``); without them, from the
model built with its default size and ``model_kwargs`` (only shapes are traced,
nothing runs): pass ``model_kwargs`` (e.g. ``{"depth": 4}``) for a ViT/BERT of
another depth than the default.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tl_jax.models import get_model
from tl_jax.util.tree_paths import flatten_paths

PyTree = Any
HEAD = "head"  # the depth name of the top group: d_max


def _cnn(path: str) -> int | str | None:
    return {"backbone/conv1": 0, "backbone/conv2": 1, "backbone/fc": 2}.get("/".join(path.split("/")[:2]))


def _resnet(path: str) -> int | str | None:
    m = re.match(r"backbone/layer(\d+)_\d+/", path)
    if m:
        return int(m.group(1))
    return 0 if re.match(r"backbone/(conv1|bn1)/", path) else None


def _vit(path: str) -> int | str | None:
    m = re.match(r"backbone/encoderblock_(\d+)/", path)
    if m:
        return int(m.group(1)) + 1
    if re.match(r"backbone/(encoder_norm|map_head|projection)/", path):
        return HEAD
    return 0 if re.match(r"backbone/(embedding/|pre_norm/|(cls|dist|reg|pos_embedding)$)", path) else None


def _bert(path: str) -> int | str | None:
    m = re.match(r"backbone/layer_(\d+)/", path)
    if m:
        return int(m.group(1)) + 1
    return 0 if path.startswith("backbone/embeddings/") else None


def _convnext(path: str) -> int | str | None:
    m = re.match(r"backbone/stage(\d+)_", path)
    if m:
        return int(m.group(1)) + 1
    if path.startswith("backbone/norm/"):
        return HEAD
    return 0 if path.startswith(("backbone/stem_conv/", "backbone/stem_norm/")) else None


FAMILIES: dict[str, Callable[[str], int | str | None]] = {"cnn": _cnn, "resnet": _resnet, "vit": _vit, "bert": _bert,
                                                          "convnext": _convnext}
_INPUTS = {"cnn": (1, 28, 28, 1), "resnet": (1, 32, 32, 3), "vit": (1, 32, 32, 3), "bert": (1, 8),
           "convnext": (1, 32, 32, 3)}


def family(model_name: str) -> str:
    """``'cnn'``, ``'resnet'``, ``'vit'``, ``'bert'`` or ``'convnext'`` for a zoo model name (NNX twins included)."""
    base = model_name[:-len("_nnx")] if model_name.endswith("_nnx") else model_name
    fam = "resnet" if base.startswith("resnet") else "convnext" if base.startswith("convnext") else base
    if fam not in FAMILIES:
        raise ValueError(f"layer_decay: no layer depths for model {model_name!r}; known families: cnn, resnet*, vit, "
                         f"bert (and their *_nnx twins), convnext*; write config.param_rules by hand for other models")
    return fam


def check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
        raise ValueError(f"layer_decay: rate must be in (0, 1] (1 = no decay; e.g. 0.7), got {rate!r}")
    return float(rate)


def default_params(model_name: str, model_kwargs: dict | None = None) -> PyTree:
    """The params' shapes (``jax.eval_shape`` of ``init``) of ``model_name`` with ``model_kwargs``."""
    fam = family(model_name)
    model = get_model(model_name, 2, **(model_kwargs or {}))
    shape = _INPUTS[fam]
    if fam == "vit" and (model_kwargs or {}).get("patch_size"):  # a multiple of the patch (14 for DINOv2)
        p = 2 * int(model_kwargs["patch_size"])
        shape = (1, p, p, shape[-1])
    x = jnp.zeros(shape, jnp.int32 if fam == "bert" else jnp.float32)
    return jax.eval_shape(lambda r: model.init(r, x, train=False), jax.random.PRNGKey(0))["params"]


def depths(model_name: str, params: PyTree) -> dict[str, int]:
    """``{param path: depth}``; the head (and ViT's final norm) at ``max(backbone depth) + 1``."""
    depth_of = FAMILIES[family(model_name)]
    raw = {}
    for path in flatten_paths(params):
        d = HEAD if path.split("/")[0] == HEAD else depth_of(path)
        if d is None:
            raise ValueError(f"layer_decay({model_name!r}): no depth for param {path!r} (not a {family(model_name)} "
                             f"layer); add a rule for it before the layer_decay rules in config.param_rules")
        raw[path] = d
    top = max([d for d in raw.values() if d != HEAD], default=-1) + 1
    return {p: top if d == HEAD else d for p, d in raw.items()}


def layer_decay(model_name: str, rate: float, params: PyTree | None = None, *,
                model_kwargs: dict | None = None) -> list[list]:
    """``[[regex, rate ** (d_max − d)], ...]`` for every depth ``d`` of the params, lowest first.

    ``params``: the run's params (or their shapes); default: :func:`default_params`.
    """
    rate = check_rate(rate)
    params = default_params(model_name, model_kwargs) if params is None else params
    by_path = depths(model_name, params)
    top = max(by_path.values())
    groups: dict[int, list[str]] = {}
    for path, d in by_path.items():
        key = _module_regex(path)
        if key not in groups.setdefault(d, []):
            groups[d].append(key)
    return [["|".join(groups[d]), rate ** (top - d)] for d in sorted(groups)]


def _module_regex(path: str) -> str:
    """The regex of ``path``'s module: ``head/.*``, ``backbone/layer1_0/.*``, or the path of a leaf held by the
    backbone itself (ViT's ``backbone/cls``)."""
    parts = path.split("/")
    if parts[0] == HEAD:
        return "head/.*"
    return re.escape("/".join(parts[:2])) + "/.*" if len(parts) > 2 else re.escape(path)
