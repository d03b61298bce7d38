"""Vision Transformer (ViT) classifiers, with big_vision-style param names.

Layout of the param tree (``i`` = block index)::

    backbone/embedding/{kernel,bias}          patch embedding: conv p x p, stride p
    backbone/cls                              [1, 1, D] class token (pooling='cls' only)
    backbone/pos_embedding                    [1, N (+1), D] learned positions
    backbone/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0,
        LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
    backbone/encoder_norm                     final LayerNorm
    head/{kernel,bias}

A ``[B, H, W, C]`` image becomes ``N = (H / p) * (W / p)`` tokens of width
``D`` (H and W must be multiples of the patch size ``p``; p=16 for 224-px
images, p=4 for 28/32-px ones). Blocks are pre-LayerNorm. Features fed to the
head: the class token (``pooling='cls'``) or the mean of the patch tokens
(``pooling='gap'``) after the final norm, ``[B, D]``. Because the position
table has one row per patch, a model is tied to one input size.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, Dtype

# (hidden size D, depth, heads, MLP width) of the standard sizes (Dosovitskiy et al.; DeiT Ti/S).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}
POOLINGS = ("cls", "gap")


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU -> dropout -> Dense(D) -> dropout: ``[B, N, D]`` -> ``[B, N, D]``."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.Dense(d, dtype=self.dtype, name="Dense_1")(y)
        return nn.Dropout(self.dropout)(y, deterministic=not train)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                            name="MultiHeadDotProductAttention_0")(y, y, deterministic=True)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_1")(x)
        return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="MlpBlock_0")(y, train=train)


class ViTBackbone(nn.Module):
    """Patchify -> (+cls) -> +positions -> blocks -> norm -> pool: ``[B, H, W, C]`` -> ``[B, D]``."""

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    pooling: str = "cls"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT: input {x.shape} must be [B, H, W, C] with H and W multiples of "
                             f"patch_size={p}; resize or pad the images (config.data.*_pp)")
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="embedding")(x.astype(self.dtype))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # [B, N, D]
        if self.pooling == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], d), jnp.float32)
        x = nn.Dropout(self.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                             name=f"encoderblock_{i}")(x, train=train)
        x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
        return x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)  # [B, D]


class ViT(Classifier):
    """ViT classifier: ``variant`` Ti / S / B, any ``patch_size``; sizes may be overridden.

    Attributes (besides :class:`Classifier`'s):
        variant: ``'Ti'`` (D=192, 3 heads), ``'S'`` (D=384, 6 heads) or ``'B'``
            (D=768, 12 heads), all 12 blocks deep.
        patch_size: ``p``; the input H and W must be multiples of it.
        pooling: ``'cls'`` (class token) or ``'gap'`` (mean of patch tokens).
        hidden_size, depth, num_heads, mlp_dim: override the variant's value
            when not None (e.g. ``depth=2`` for a quick test).
        transformer_dropout: dropout inside the blocks (train only).
    """

    variant: str = "Ti"
    patch_size: int = 16
    pooling: str = "cls"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    transformer_dropout: float = 0.0

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

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        del frozen  # no BatchNorm
        if self.pooling not in POOLINGS:
            raise ValueError(f"ViT: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"ViT: patch_size must be a positive int, got {self.patch_size!r}")
        d, depth, heads, mlp = self.dims()
        return ViTBackbone(patch_size=self.patch_size, hidden_size=d, depth=depth, num_heads=heads, mlp_dim=mlp,
                           pooling=self.pooling, dropout=self.transformer_dropout, dtype=self.dtype)
