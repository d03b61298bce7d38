"""The Flax NNX twin of :mod:`tl_jax.models.resnet` (BasicBlock ResNets: ResNet-18/34).

Same module names and param / batch_stats paths as the linen model::

    backbone/conv1, backbone/bn1                             stem
    backbone/layer{1..4}_{i}/conv1|bn1|conv2|bn2             BasicBlock
    backbone/layer{1..4}_{i}/downsample_conv|downsample_bn   projection shortcut
    head/kernel, head/bias

Convs have no bias and kaiming-normal (fan_out) init; BatchNorm is
torchvision-compatible (momentum 0.9, i.e. torch's 0.1, eps 1e-5), params
``scale``/``bias`` and statistics ``mean``/``var`` as linen's. The stem conv is
built on the first call (its input channels come from the data).
Train/eval mode, frozen norms and the pmap axis are set on the BatchNorm
layers by :class:`tl_jax.models.nnx.bridge.NNXModel`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import max_pool

from tl_jax.models.nnx.layers import ClassifierNNX
from tl_jax.models.nnx.bridge import expose_signature
from tl_jax.models.resnet import BasicBlock, block_specs

Dtype = Any
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(in_features: int, features: int, kernel: int, stride: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with torch-style symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nnx.Conv(in_features, features, (kernel, kernel), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def _bn(features: int, dtype: Dtype, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.BatchNorm:
    """torchvision-compatible BatchNorm; ``zero_scale`` initialises gamma to zero (zero-init residual)."""
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                         scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones, rngs=rngs)


class BasicBlockNNX(nnx.Module):
    """Two 3x3 convs: ``[B, H, W, in]`` -> ``[B, H/stride, W/stride, planes]``."""

    def __init__(self, in_features: int, planes: int, *, stride: int, downsample: bool, zero_init_residual: bool,
                 dtype: Dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(in_features, planes, 3, stride, dtype, rngs)
        self.bn1 = _bn(planes, dtype, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, dtype, rngs)
        self.bn2 = _bn(planes, dtype, rngs, zero_scale=zero_init_residual)
        self.downsample = downsample
        if downsample:
            self.downsample_conv = _conv(in_features, planes, 1, stride, dtype, rngs)
            self.downsample_bn = _bn(planes, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.downsample:
            x = self.downsample_bn(self.downsample_conv(x))
        return nnx.relu(x + y)


class ResNetBackboneNNX(nnx.Module):
    """Stem + residual stages + global average pool: ``[B, H, W, C]`` -> ``[B, 8 * base_width]``."""

    def __init__(self, *, rngs: nnx.Rngs, stage_sizes: Sequence[int], base_width: int = 64, stem: str = "imagenet",
                 zero_init_residual: bool = False, dtype: Dtype = jnp.float32):
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        self.stem, self.base_width, self.dtype = stem, base_width, dtype
        self.rngs = rngs  # for the stem conv, sized by the first input
        self.conv1 = nnx.data(None)
        self.bn1 = _bn(base_width, dtype, rngs)
        specs = block_specs(stage_sizes, BasicBlock, base_width)
        self.blocks = tuple(name for name, *_ in specs)  # names of the residual blocks, in order
        in_features = base_width
        for name, planes, stride, downsample in specs:
            setattr(self, name, BasicBlockNNX(in_features, planes, stride=stride, downsample=downsample,
                                              zero_init_residual=zero_init_residual, dtype=dtype, rngs=rngs))
            in_features = planes

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.conv1 is None:
            kernel, stride = (7, 2) if self.stem == "imagenet" else (3, 1)
            self.conv1 = _conv(x.shape[-1], self.base_width, kernel, stride, self.dtype, self.rngs)
        x = nnx.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.blocks:
            x = getattr(self, name)(x)
        return jnp.mean(x, axis=(1, 2))


@expose_signature
class ResNetNNX(ClassifierNNX):
    """BasicBlock ResNet v1.5 classifier: ``backbone`` -> dropout -> ``head`` (float32 logits).

    Args:
        num_classes: logits.
        rngs: ``nnx.Rngs`` with streams ``params`` and ``dropout``.
        dropout_rate: dropout on the features before the head (train mode only).
        dtype: computation dtype (params are float32).
        stage_sizes: blocks per stage (``(2, 2, 2, 2)``: ResNet-18).
        base_width: channels of the stem / first stage (64 = torchvision).
        stem: ``'imagenet'`` (conv7x7/2 + maxpool) or ``'cifar'`` (conv3x3/1).
        zero_init_residual: zero-init the last BN scale of each block.
    """

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0, dtype: Dtype = jnp.float32,
                 stage_sizes: Sequence[int] = (2, 2, 2, 2), base_width: int = 64, stem: str = "imagenet",
                 zero_init_residual: bool = False):
        backbone = ResNetBackboneNNX(rngs=rngs, stage_sizes=tuple(stage_sizes), base_width=base_width, stem=stem,
                                     zero_init_residual=zero_init_residual, dtype=dtype)
        self.attach(backbone, 8 * base_width, num_classes, dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)


@expose_signature
class ResNet18NNX(ResNetNNX):
    """ResNet-18 (stages ``(2, 2, 2, 2)``) in Flax NNX; the twin of ``tl_jax.models.ResNet18``."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0, dtype: Dtype = jnp.float32,
                 base_width: int = 64, stem: str = "imagenet", zero_init_residual: bool = False):
        super().__init__(num_classes, rngs=rngs, dropout_rate=dropout_rate, dtype=dtype, stage_sizes=(2, 2, 2, 2),
                         base_width=base_width, stem=stem, zero_init_residual=zero_init_residual)
