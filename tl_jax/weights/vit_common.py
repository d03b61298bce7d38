"""Shared end of the timm / open_clip / big_vision ViT imports: layouts, strict mapping, the written record.

Each source renames nothing itself: it hands :func:`convert_vit` its tensors
(fused ones already split, e.g. timm's ``attn.qkv.weight`` as
``attn.qkv.weight[query]`` / ``[key]`` / ``[value]``), a list of
``(source regex, target template, layout)`` and the ``vit`` kwargs it read
from the files. Layouts bring a tensor to :mod:`tl_jax.models.vit`'s flax shapes:

* ``linear``: torch ``[out, in]`` -> ``[in, out]``; ``conv``: ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``;
* ``token``: ``[D]`` / ``[N, D]`` / ``[1, N, D]`` -> ``[1, N, D]``;
* ``heads_in``: a q/k/v projection, torch ``[H*hd, D]`` -> ``[D, H, hd]``, bias ``[H*hd]`` -> ``[H, hd]``;
* ``heads_out``: the attention output, torch ``[D, H*hd]`` -> ``[H, hd, D]``;
* ``copy``: as stored (flax-native sources, norms, biases).

Then :func:`tl_jax.weights.convert.map_tensors` checks one to one (every tensor
used or dropped on purpose, every variable filled, one line per problem naming
both paths) and :func:`tl_jax.weights.source_record.write_converted` writes the
checkpoint with its source record.
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from tl_jax.weights.convert import Converted, map_tensors, target_shapes
from tl_jax.weights.mappings import Mapping, Rule, transposed
from tl_jax.weights.source_record import write_converted

B = "params/backbone"
MHA = "MultiHeadDotProductAttention_0"


def layout(kind: str, x: np.ndarray, heads: int) -> np.ndarray:
    """``x`` in the source's layout -> flax's (module doc); ``heads``: attention heads of the tower."""
    x = np.asarray(x)
    if kind == "linear":
        return transposed(x) if x.ndim == 2 else x
    if kind == "conv":
        return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    if kind == "token":
        return x.reshape(1, -1, x.shape[-1])
    if kind == "heads_in":
        return transposed(x).reshape(x.shape[1], heads, -1) if x.ndim == 2 else x.reshape(heads, -1)
    if kind == "heads_out":
        return transposed(x).reshape(heads, -1, x.shape[0]) if x.ndim == 2 else x
    if kind == "copy":
        return x
    raise ValueError(f"unknown layout {kind!r}")


def split_fused(tensors: dict[str, np.ndarray], pattern: str) -> dict[str, np.ndarray]:
    """Splits each fused q/k/v tensor whose name fully matches ``pattern`` into ``name[query|key|value]`` (dim 0)."""
    out = {}
    for name, value in tensors.items():
        if re.fullmatch(pattern, name):
            for part, piece in zip(("query", "key", "value"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{name}[{part}]"] = piece
        else:
            out[name] = value
    return out


def prepend_prefix_positions(pos: np.ndarray, n_prefix: int) -> np.ndarray:
    """A patch-only position table ``[1, G, D]`` -> ``[1, n_prefix + G, D]`` with zero rows for the prefix tokens.

    timm's ``no_embed_class`` models and big_vision add positions to the patches only, then prepend the
    class token; tl_jax's vit adds a table over prefix + patches, so a zero row gives the same sum.
    """
    pos = pos.reshape(1, -1, pos.shape[-1])
    return np.concatenate([np.zeros((1, n_prefix, pos.shape[-1]), pos.dtype), pos], axis=1)


def convert_vit(tensors: dict[str, np.ndarray], rules: Sequence[tuple[str, str, str]], kwargs: dict, *,
                source: pathlib.Path, files: Sequence[pathlib.Path], fmt: str, architecture: str | None,
                mapping: str, dropped: Sequence[str], preprocessing: dict | None, out: str | pathlib.Path | None,
                num_classes: int | None = None, ignore: Sequence[str] = (), overwrite: bool = False) -> Converted:
    """Tensors (source names) -> the ``vit`` model's variables, checked one to one, written to ``out`` (or not).

    ``dropped``: source names the format leaves out on purpose (a text tower); ``ignore``: the caller's regexes.
    ``num_classes`` comes from the source's classifier when it has one (a different value is refused).
    """
    heads = int(kwargs["num_heads"])
    rule_map = Mapping(mapping, ("vit",), tuple(Rule(p, t, kind) for p, t, kind in rules))
    visible = [k for k in tensors if not any(re.fullmatch(rx, k) for rx in ignore)]
    head = next((k for k in visible if (t := rule_map.target(k)) and t[0] == "params/head/bias"), None)
    if head is not None:
        n_src = int(np.shape(tensors[head])[0])
        if num_classes is not None and num_classes != n_src:
            raise ValueError(f"{source}: its classifier {head} has {n_src} outputs but num_classes={num_classes}; "
                             f"leave num_classes out, or ignore the classifier tensors")
        num_classes = n_src
    num_classes = num_classes or 1
    embed = next((k for k in tensors if (t := rule_map.target(k)) and t[0] == f"{B}/embedding/kernel"), None)
    if embed is None:
        raise ValueError(f"{source}: no patch-embedding tensor among {sorted(tensors)[:5]}...; is it a ViT?")
    (gh, gw), p = kwargs["pos_grid"], kwargs["patch_size"]
    shape_only = np.broadcast_to(np.float32(0), np.shape(tensors[embed]))  # its layout's shape, no copy
    channels = layout(rule_map.target(embed)[1], shape_only, heads).shape[2]
    sample = ((np.zeros((1, gh * p, gw * p, channels), np.float32),), {})
    targets = target_shapes("vit", num_classes, kwargs, sample)
    flat, ignored = map_tensors(tensors, rule_map, targets, ignore, source=str(source),
                                layout=lambda kind, x: layout(kind, x, heads))
    variables = traverse_util.unflatten_dict(flat, sep="/")
    result = Converted(None, "vit", num_classes, kwargs, variables, tuple(list(dropped) + ignored))
    return write_converted(result, out, source=source, fmt=fmt, architecture=architecture, mapping=mapping,
                           files=files, preprocessing=preprocessing, overwrite=overwrite)
