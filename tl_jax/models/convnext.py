"""ConvNeXt classifiers (Liu et al. 2022), the layout of timm's and Hugging Face's ConvNeXt.

Layout of the param tree (``s`` = stage 0..3, ``j`` = block index in the stage)::

    backbone/stem_conv/{kernel,bias}           conv 4x4, stride 4: [B, H, W, 3] -> [B, H/4, W/4, C0]
    backbone/stem_norm/{scale,bias}            LayerNorm over channels
    backbone/stage{s}_downsample_norm          LayerNorm, then                  (s >= 1)
    backbone/stage{s}_downsample_conv          conv 2x2, stride 2: C(s-1) -> Cs (s >= 1)
    backbone/stage{s}_block{j}/dwconv          depthwise conv k x k (k=7), bias
        .../norm, fc1 [Cs, 4 Cs], fc2 [4 Cs, Cs], gamma [Cs] (LayerScale; absent when layer_scale is None)
    backbone/norm                              LayerNorm of the pooled features
    head/{kernel,bias}

A block is ``x + gamma * fc2(gelu(fc1(LN(dwconv(x)))))`` (exact, erf GELU, as
both sources use), with stochastic depth on the residual branch when training
(``drop_path_rate``, linear in the block index, timm's schedule). Features fed to
the head: the global average of the last stage, LayerNormed: ``[B, C3]``.
LayerNorm eps is 1e-6 everywhere except ``head_norm_eps`` (the pooled-feature norm:
1e-6 in timm, ``config.layer_norm_eps`` in Hugging Face, 1e-12 by default).

Sizes (``variant``): T (3, 3, 9, 3) x (96, 192, 384, 768), S (3, 3, 27, 3) x the
same widths, B (3, 3, 27, 3) x (128, 256, 512, 1024); ``depths``/``dims``
override (e.g. a tiny test model). Registered as ``convnext`` (any size) and
``convnext_tiny`` / ``convnext_small`` / ``convnext_base``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, Dtype, drop_path, drop_path_rates
from tl_jax.models.registry import register

CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "T": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "S": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "B": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


def _layer_norm(name: str, eps: float, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvNeXtBlock(nn.Module):
    """``x + gamma * MLP(LN(dwconv(x)))``: ``[B, H, W, C]`` -> same shape."""

    kernel_size: int = 7
    mlp_ratio: int = 4
    layer_scale: float | None = 1e-6
    drop_path_rate: float = 0.0
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        c, k = x.shape[-1], self.kernel_size
        y = nn.Conv(c, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)), feature_group_count=c,
                    dtype=self.dtype, param_dtype=jnp.float32, name="dwconv")(x)
        y = _layer_norm("norm", self.eps, self.dtype)(y)
        y = nn.Dense(self.mlp_ratio * c, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(y)
        if self.layer_scale is not None:
            gamma = self.param("gamma", nn.initializers.constant(self.layer_scale), (c,), jnp.float32)
            y = y * gamma.astype(y.dtype)
        if train and self.drop_path_rate > 0:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        return x + y


class ConvNeXtBackbone(nn.Module):
    """Stem -> 4 stages -> global average -> LayerNorm: ``[B, H, W, C]`` -> ``[B, dims[-1]]``."""

    depths: Sequence[int]
    dims: Sequence[int]
    kernel_size: int = 7
    layer_scale: float | None = 1e-6
    drop_path_rate: float = 0.0
    eps: float = 1e-6
    head_norm_eps: float = 1e-6
    stem_patch: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        p = self.stem_patch
        x = nn.Conv(self.dims[0], (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, name="stem_conv")(x.astype(self.dtype))
        x = _layer_norm("stem_norm", self.eps, self.dtype)(x)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        n = 0
        for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if s > 0:
                x = _layer_norm(f"stage{s}_downsample_norm", self.eps, self.dtype)(x)
                x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                            param_dtype=jnp.float32, name=f"stage{s}_downsample_conv")(x)
            for j in range(depth):
                x = ConvNeXtBlock(self.kernel_size, layer_scale=self.layer_scale, drop_path_rate=rates[n],
                                  eps=self.eps, dtype=self.dtype, name=f"stage{s}_block{j}")(x, train=train)
                n += 1
        x = jnp.mean(x, axis=(1, 2))  # [B, dims[-1]]
        return _layer_norm("norm", self.head_norm_eps, self.dtype)(x)


class ConvNeXt(Classifier):
    """ConvNeXt classifier (see module doc).

    Attributes (besides :class:`Classifier`'s):
        variant: ``'T'``, ``'S'`` or ``'B'``.
        depths, dims: blocks and channels per stage (4 each), overriding the variant's when not None.
        kernel_size: depthwise kernel (7).
        layer_scale: initial LayerScale ``gamma``; None: no LayerScale params.
        drop_path_rate: stochastic depth of the last block (train only; rng stream 'dropout').
        eps, head_norm_eps: LayerNorm epsilons of the blocks/stem/downsampling and of the pooled features.
    """

    variant: str = "T"
    depths: Sequence[int] | None = None
    dims: Sequence[int] | None = None
    kernel_size: int = 7
    layer_scale: float | None = 1e-6
    drop_path_rate: float = 0.0
    eps: float = 1e-6
    head_norm_eps: float = 1e-6

    def sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(depths, dims)`` after overrides; both 4 stages."""
        if self.variant not in CONVNEXT_SIZES:
            raise ValueError(f"ConvNeXt: unknown variant {self.variant!r}; known: {sorted(CONVNEXT_SIZES)}")
        depths, dims = CONVNEXT_SIZES[self.variant]
        depths = tuple(int(d) for d in (self.depths if self.depths is not None else depths))
        dims = tuple(int(d) for d in (self.dims if self.dims is not None else dims))
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"ConvNeXt: depths {depths} and dims {dims} must have one entry per stage")
        return depths, dims

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        del frozen  # no BatchNorm
        depths, dims = self.sizes()
        return ConvNeXtBackbone(depths=depths, dims=dims, kernel_size=self.kernel_size,
                                layer_scale=self.layer_scale, drop_path_rate=self.drop_path_rate, eps=self.eps,
                                head_norm_eps=self.head_norm_eps, dtype=self.dtype)


register("convnext")(ConvNeXt)
ConvNeXtTiny = register("convnext_tiny")(functools.partial(ConvNeXt, variant="T"))
ConvNeXtSmall = register("convnext_small")(functools.partial(ConvNeXt, variant="S"))
ConvNeXtBase = register("convnext_base")(functools.partial(ConvNeXt, variant="B"))
