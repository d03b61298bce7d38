"""Visual prompt tuning for tl_jax's ViTs (VPT, Jia et al. 2022), ``config.peft.prompt`` (docs/peft.md).

``T = num_tokens`` learned prompt tokens ``[T, D]`` join the token sequence of a
:class:`tl_jax.models.vit.ViTBackbone` (ViT, DeiT, DINOv2, CLIP, SigLIP towers) right after its prefix tokens
(the class token, and DeiT's distillation token), i.e. after the position embeddings (and CLIP's pre-norm):

* VPT-shallow (``deep=False``): at the input of the first block, ``[prefix, P, (registers,) patches]``; the
  later blocks carry the prompts' outputs on;
* VPT-deep (``deep=True``): at every block's input, block ``i`` gets fresh tokens ``P_i`` in place of the
  previous block's prompt outputs.

The prompt tokens' outputs are dropped after the last block, so the final norm and the pooling (``cls``,
``gap``, ``map``, ...) see exactly the tokens they see without prompts (the prompts act through attention only).
Parameters: ``T·D`` (shallow) or ``L·T·D`` (deep, ``L`` blocks), under the top-level key ``prompt``, nested by
the backbone's module path: ``prompt/backbone/tokens`` of shape ``[1 or L, T, D]``.

Init: uniform on ``±sqrt(6 / (3·p² + D))`` (``p`` the patch size), VPT's Xavier-uniform over a patch's
``3·p·p`` pixels and ``D``. Models without a tl_jax ViT backbone are refused with one line.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from tl_jax.models.vit import EncoderBlock, ViTBackbone
from tl_jax.peft.intercepted import InterceptedModel, nest, subtree

log = logging.getLogger("tl_jax")
PyTree = Any
PROMPT = "prompt"  # the top-level params key of the prompt tokens
TOKENS = "tokens"


def block_site(module: Any) -> tuple[ViTBackbone, int] | None:
    """``(backbone, block index)`` when ``module`` is an encoder block called by a ViT backbone, else None."""
    parent = getattr(module, "parent", None)
    if not (isinstance(module, EncoderBlock) and isinstance(parent, ViTBackbone)):
        return None
    prefix, _, index = str(module.name).rpartition("_")
    if prefix != "encoderblock" or not index.isdigit():
        return None
    return parent, int(index)


def n_prefix(backbone: ViTBackbone) -> int:
    """Tokens before the prompts: the class token and DeiT's distillation token, when there."""
    return int(bool(backbone.class_token)) + int(bool(backbone.dist_token))


def with_prompts(x: jax.Array, p: jax.Array, at: int, replace: bool) -> jax.Array:
    """``x [B, N, D]`` with ``p [T, D]`` (broadcast over the batch) inserted at token ``at``, or written over the
    ``T`` tokens from ``at`` (``replace``: VPT-deep's later blocks)."""
    b, t = x.shape[0], p.shape[0]
    tokens = jnp.broadcast_to(p.astype(x.dtype)[None], (b, t, x.shape[-1]))
    rest = x[:, at + t:] if replace else x[:, at:]
    return jnp.concatenate([x[:, :at], tokens, rest], axis=1)


def without_prompts(x: jax.Array, at: int, t: int) -> jax.Array:
    """``x`` without the ``t`` prompt tokens from ``at``."""
    return jnp.concatenate([x[:, :at], x[:, at + t:]], axis=1)


def count_formula(num_tokens: int, d: int, depth: int, deep: bool) -> int:
    """VPT's parameters: ``T·D`` (shallow) or ``L·T·D`` (deep)."""
    return num_tokens * d * (depth if deep else 1)


class PromptModel(InterceptedModel):
    """``module`` (a tl_jax ViT) with ``num_tokens`` learned prompt tokens, VPT-shallow or VPT-deep (module doc)."""

    KEY = PROMPT
    CONFIG = "config.peft.prompt"

    def __init__(self, module: Any, *, num_tokens: int, deep: bool = False):
        super().__init__(module)
        self.num_tokens, self.deep = int(num_tokens), bool(deep)

    def recorder(self, sites: dict):
        def record(next_fun, args, kwargs, context):
            site = block_site(context.module) if context.method_name == "__call__" else None
            if site is not None:
                backbone, _ = site
                sites[tuple(backbone.path)] = (backbone.depth, int(args[0].shape[-1]), backbone.patch_size)
            return next_fun(*args, **kwargs)

        return record

    def init_own(self, rng: jax.Array, sites: dict) -> dict:
        if not sites:
            raise ValueError(f"config.peft.prompt needs a tl_jax ViT (tl_jax/models/vit.py); model "
                             f"{type(self.module).__name__} has no ViT encoder blocks")
        own = {}
        for i, (path, (depth, d, patch)) in enumerate(sorted(sites.items())):
            bound = math.sqrt(6.0 / (3 * patch * patch + d))
            shape = (depth if self.deep else 1, self.num_tokens, d)
            own[(*path, TOKENS)] = jax.random.uniform(jax.random.fold_in(rng, i), shape, jnp.float32, -bound, bound)
        log.info("prompts (config.peft.prompt): VPT-%s, %d tokens, %s params", "deep" if self.deep else "shallow",
                 self.num_tokens, f"{sum(int(v.size) for v in own.values()):,}")
        return nest(own)

    def interceptor(self, own: PyTree):
        def intercept(next_fun, args, kwargs, context):
            site = block_site(context.module) if context.method_name == "__call__" else None
            if site is None:
                return next_fun(*args, **kwargs)
            backbone, i = site
            tokens = subtree(own, (*backbone.path, TOKENS))
            if tokens is None:
                raise ValueError(f"config.peft.prompt: no prompt tokens at {PROMPT}/{'/'.join(backbone.path)}/{TOKENS}")
            at, x = n_prefix(backbone), args[0]
            if i == 0 or self.deep:
                x = with_prompts(x, tokens[i if self.deep else 0], at, replace=i > 0)
            y = next_fun(x, *args[1:], **kwargs)
            return without_prompts(y, at, self.num_tokens) if i == backbone.depth - 1 else y

        return intercept

    def rewrap(self, module: Any) -> "PromptModel":
        return PromptModel(module, num_tokens=self.num_tokens, deep=self.deep)

    def __repr__(self) -> str:
        return f"PromptModel({self.module!r}, num_tokens={self.num_tokens}, deep={self.deep})"
