"""Vision Transformers (ViT, DeiT, DINOv2, CLIP and SigLIP image towers) with big_vision-style param names.

Layout of the param tree (``i`` = block index; optional parts in brackets)::

    backbone/embedding/{kernel[,bias]}        patch embedding: conv p x p, stride p
    [backbone/cls]                            [1, 1, D] class token
    [backbone/dist]                           [1, 1, D] DeiT's distillation token
    backbone/pos_embedding                    [1, P + G, D] learned positions, P prefix tokens, G grid cells
    [backbone/reg]                            [1, R, D] DINOv2 register tokens (no position)
    [backbone/pre_norm]                       LayerNorm after the positions (CLIP's ln_pre)
    backbone/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0, [LayerScale_0/scale],
        LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}, [LayerScale_1/scale]
    backbone/encoder_norm                     final LayerNorm (of the pooled features with pool_norm)
    [backbone/map_head/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}]   pooling='map'
    [backbone/projection/kernel]              [F, projection_dim], no bias (CLIP's visual_projection)
    head/{kernel,bias}

A ``[B, H, W, C]`` image becomes ``G = (H / p) * (W / p)`` patch tokens of width
``D``; the tokens are ``[cls][dist] + patches`` (+ positions), then the registers
after the prefix. Blocks are pre-LayerNorm: ``x + ls1 * MHA(LN(x))``, then
``x + ls2 * MLP(LN(x))`` (``ls`` = LayerScale, DINOv2; 1 otherwise); with stochastic
depth (``drop_path_rate``, train only) each of block ``i``'s two branches is dropped per
example with probability ``rate * i / (depth - 1)`` (timm), the kept scaled by ``1/(1-p)``. After the
final norm the features are pooled (``pooling``):

* ``cls``: the class token ``[B, D]``; ``gap``: the mean of the patch tokens
  ``[B, D]``; ``map``: multihead attention pooling with a learned probe
  (SigLIP, big_vision's MAPHead) ``[B, D]``;
* ``cls_gap``: ``concat(cls, mean of patches)`` ``[B, 2D]`` (DINOv2's classifier input);
* ``cls_dist``: ``concat(cls, dist)`` ``[B, 2D]`` (DeiT: its two heads' average
  is one linear head on this concatenation).

Resolution: with ``pos_grid`` unset the table has one row per patch of the
input, so a model is tied to one input size. With ``pos_grid=(gh, gw)`` (set by
weight import: the pretraining grid) the table keeps that grid and is resized
to the input's grid on the fly with PyTorch's bicubic (``pos_interp``, see
:mod:`tl_jax.models.vit_posemb`), the prefix rows kept, as the source library
does when it fine-tunes at another size; logged once.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, DropPath, Dtype, drop_path_rates
from tl_jax.models.vit_posemb import INTERPOLATIONS, resize_grid
from tl_jax.util.log_once import warn_once

log = logging.getLogger("tl_jax")

# (hidden size D, depth, heads, MLP width) of the standard sizes (Dosovitskiy et al.; DeiT Ti/S).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}
POOLINGS = ("cls", "gap", "map", "cls_gap", "cls_dist")
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # flax's default; SigLIP's gelu_pytorch_tanh
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact (erf): HF ViT, DeiT, DINOv2
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "swiglu": None,  # a gated MLP (MlpBlock), not an elementwise function
}


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> act -> dropout -> Dense(D) -> dropout: ``[B, N, D]`` -> ``[B, N, D]``.

    ``act='swiglu'``: Dense_0 is ``D -> 2 * mlp_dim`` split into ``gate | up`` and the activation is
    ``silu(gate) * up`` (Shazeer 2020; DINOv2 ViT-g).
    """

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        if self.act == "swiglu":  # DINOv2 giant: Dense_0 -> [gate | up], silu(gate) * up
            gate, up = jnp.split(nn.Dense(2 * self.mlp_dim, dtype=self.dtype, name="Dense_0")(x), 2, axis=-1)
            y = nn.silu(gate) * up
        else:
            y = ACTIVATIONS[self.act](nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.Dense(d, dtype=self.dtype, name="Dense_1")(y)
        return nn.Dropout(self.dropout)(y, deterministic=not train)


class LayerScale(nn.Module):
    """``x * scale`` with a learned per-channel ``scale [D]`` (CaiT / DINOv2)."""

    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
        return x * scale.astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + ls1 * MHA(LN(x))``, then ``x + ls2 * MLP(LN(x))``."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    layer_scale: float | None = None
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        dp = (lambda i, y: DropPath(self.drop_path_rate, name=f"drop_path_{i}")(y, train=train)) \
            if self.drop_path_rate else (lambda i, y: y)
        ls = (lambda i, y: LayerScale(self.layer_scale, name=f"LayerScale_{i}")(y)) if self.layer_scale else \
            (lambda i, y: y)
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                            name="MultiHeadDotProductAttention_0")(y, y, deterministic=True)
        x = x + dp(0, nn.Dropout(self.dropout)(ls(0, y), deterministic=not train))
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act, name="MlpBlock_0")(y, train=train)
        return x + dp(1, ls(1, y))


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision / SigLIP): ``[B, N, D]`` -> ``[B, D]``.

    ``x = MHA(probe, tokens)``; ``x = x + MLP(LN(x))``; the probe's row.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
        probe = jnp.broadcast_to(probe.astype(x.dtype), (b, 1, d))
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                            name="MultiHeadDotProductAttention_0")(probe, x, deterministic=True)
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        return (x + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.act, name="MlpBlock_0")(y))[:, 0]


class ViTBackbone(nn.Module):
    """Patchify -> prefix tokens -> +positions -> registers -> blocks -> norm -> pool (see module doc)."""

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    pooling: str = "cls"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    class_token: bool = True
    dist_token: bool = False
    num_registers: int = 0
    patch_bias: bool = True
    pre_norm: bool = False
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    layer_scale: float | None = None
    pos_grid: tuple[int, int] | None = None
    pos_interp: str = "bicubic"
    projection_dim: int | None = None
    drop_path_rate: float = 0.0
    pool_norm: bool = False

    def _positions(self, grid: tuple[int, int], n_prefix: int, d: int) -> jax.Array:
        """``[1, n_prefix + gh * gw, D]``: the table, its patch rows resized from ``pos_grid`` to ``grid``."""
        table_grid = tuple(self.pos_grid) if self.pos_grid else grid
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, n_prefix + table_grid[0] * table_grid[1], d), jnp.float32)
        if table_grid == grid:
            return pos
        warn_once(log, "ViT: position embeddings resized from a %dx%d to a %dx%d patch grid (%s; prefix tokens "
                  "kept)", *table_grid, *grid, self.pos_interp, level=logging.INFO)
        patches = resize_grid(pos[0, n_prefix:].reshape(*table_grid, d), grid, self.pos_interp)
        return jnp.concatenate([pos[:, :n_prefix], patches.reshape(1, grid[0] * grid[1], d)], axis=1)

    def _pool(self, x: jax.Array, n_prefix: int) -> jax.Array:
        patches = x[:, n_prefix + self.num_registers:]
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "gap":
            return jnp.mean(patches, axis=1)
        if self.pooling == "cls_gap":
            return jnp.concatenate([x[:, 0], jnp.mean(patches, axis=1)], axis=-1)
        if self.pooling == "cls_dist":
            return jnp.concatenate([x[:, 0], x[:, 1]], axis=-1)
        return MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.act, self.norm_eps, name="map_head")(x)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT: input {x.shape} must be [B, H, W, C] with H and W multiples of "
                             f"patch_size={p}; resize or pad the images (config.data.*_pp)")
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                    dtype=self.dtype, name="embedding")(x.astype(self.dtype))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # [B, G, D]
        prefix = [name for name, on in (("cls", self.class_token), ("dist", self.dist_token)) if on]
        tokens = [self.param(n, nn.initializers.zeros, (1, 1, d), jnp.float32) for n in prefix]
        x = jnp.concatenate([jnp.broadcast_to(t.astype(x.dtype), (b, 1, d)) for t in tokens] + [x], axis=1)
        x = x + self._positions((h, w), len(prefix), d).astype(x.dtype)
        if self.num_registers:
            reg = self.param("reg", nn.initializers.zeros, (1, self.num_registers, d), jnp.float32)
            reg = jnp.broadcast_to(reg.astype(x.dtype), (b, self.num_registers, d))
            x = jnp.concatenate([x[:, :len(prefix)], reg, x[:, len(prefix):]], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="pre_norm")(x)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.act, self.norm_eps,
                             self.layer_scale, rate, name=f"encoderblock_{i}")(x, train=train)
        norm = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="encoder_norm")
        if self.pool_norm:  # timm's fc_norm: the tokens pooled as they leave the blocks, the pooled ones normed
            x = norm(self._pool(x, len(prefix)))
        else:
            x = self._pool(norm(x), len(prefix))  # [B, F]
        if self.projection_dim:
            x = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="projection")(x)
        return x


class ViT(Classifier):
    """ViT classifier: ``variant`` Ti / S / B / L, any ``patch_size``; sizes may be overridden.

    Attributes (besides :class:`Classifier`'s):
        variant: ``'Ti'`` (D=192, 3 heads), ``'S'`` (D=384, 6 heads), ``'B'``
            (D=768, 12 heads), all 12 blocks deep, or ``'L'`` (D=1024, 24 blocks, 16 heads).
        patch_size: ``p``; the input H and W must be multiples of it.
        pooling: one of :data:`POOLINGS` (module doc).
        hidden_size, depth, num_heads, mlp_dim: override the variant's value
            when not None (e.g. ``depth=2`` for a quick test).
        transformer_dropout: dropout inside the blocks (train only).
        class_token: whether there is a class token (None: when the pooling reads it).
        dist_token: DeiT's distillation token (``pooling='cls_dist'`` needs it).
        num_registers: DINOv2 register tokens (excluded from every pooling).
        patch_bias: the patch embedding has a bias (CLIP's has none).
        pre_norm: a LayerNorm after the position embeddings (CLIP).
        act: MLP activation, a key of :data:`ACTIVATIONS`.
        norm_eps: every LayerNorm's epsilon.
        layer_scale: LayerScale's initial value (DINOv2: 1.0); None: no LayerScale.
        pos_grid: ``(gh, gw)`` patch grid of the position table (None: the input's).
        pos_interp: how the table is resized to another grid (:data:`~tl_jax.models.vit_posemb.INTERPOLATIONS`).
        projection_dim: a bias-free linear map of the pooled features (CLIP); None: none.
        drop_path_rate: stochastic depth of the last block (linear in the block index; train only,
            rng stream 'dropout'); 0: none.
        pool_norm: the final LayerNorm normalises the pooled features, not the tokens (timm's
            ``global_pool='avg'`` models with ``fc_norm``).
    """

    variant: str = "Ti"
    patch_size: int = 16
    pooling: str = "cls"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    transformer_dropout: float = 0.0
    class_token: bool | None = None
    dist_token: bool = False
    num_registers: int = 0
    patch_bias: bool = True
    pre_norm: bool = False
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    layer_scale: float | None = None
    pos_grid: tuple[int, int] | None = None
    pos_interp: str = "bicubic"
    projection_dim: int | None = None
    drop_path_rate: float = 0.0
    pool_norm: bool = False

    def dims(self) -> tuple[int, int, int, int]:
        """``(hidden_size, depth, num_heads, mlp_dim)`` after overrides."""
        if self.variant not in VIT_SIZES:
            raise ValueError(f"ViT: unknown variant {self.variant!r}; known: {sorted(VIT_SIZES)}")
        base = VIT_SIZES[self.variant]
        dims = tuple(b if o is None else int(o)
                     for b, o in zip(base, (self.hidden_size, self.depth, self.num_heads, self.mlp_dim)))
        if dims[0] % dims[2]:
            raise ValueError(f"ViT: hidden_size={dims[0]} is not divisible by num_heads={dims[2]}")
        return dims

    def _check(self) -> bool:
        """Validates the options; returns whether there is a class token."""
        for key, value, allowed in (("pooling", self.pooling, POOLINGS), ("act", self.act, tuple(ACTIVATIONS)),
                                    ("pos_interp", self.pos_interp, INTERPOLATIONS)):
            if value not in allowed:
                raise ValueError(f"ViT: {key} must be one of {allowed}, got {value!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"ViT: patch_size must be a positive int, got {self.patch_size!r}")
        cls = self.pooling in ("cls", "cls_gap", "cls_dist") if self.class_token is None else bool(self.class_token)
        if self.pooling.startswith("cls") and not cls:
            raise ValueError(f"ViT: pooling={self.pooling!r} reads the class token but class_token=False")
        if self.pooling == "cls_dist" and not self.dist_token:
            raise ValueError("ViT: pooling='cls_dist' needs dist_token=True")
        if self.pos_grid is not None and (len(tuple(self.pos_grid)) != 2 or min(self.pos_grid) < 1):
            raise ValueError(f"ViT: pos_grid must be (rows, cols) of patches, got {self.pos_grid!r}")
        return cls

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        del frozen  # no BatchNorm
        cls = self._check()
        d, depth, heads, mlp = self.dims()
        return ViTBackbone(patch_size=self.patch_size, hidden_size=d, depth=depth, num_heads=heads, mlp_dim=mlp,
                           pooling=self.pooling, dropout=self.transformer_dropout, dtype=self.dtype,
                           class_token=cls, dist_token=self.dist_token, num_registers=int(self.num_registers),
                           patch_bias=self.patch_bias, pre_norm=self.pre_norm, act=self.act,
                           norm_eps=float(self.norm_eps), layer_scale=self.layer_scale,
                           pos_grid=tuple(int(g) for g in self.pos_grid) if self.pos_grid else None,
                           pos_interp=self.pos_interp, projection_dim=self.projection_dim,
                           drop_path_rate=float(self.drop_path_rate), pool_norm=bool(self.pool_norm))
