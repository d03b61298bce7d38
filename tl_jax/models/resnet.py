"""ResNet v1.5 classifiers with torchvision-compatible module names.

Layout of the param / batch_stats trees (``i`` = block index in the stage)::

    backbone/conv1, backbone/bn1                       stem
    backbone/layer{1..4}_{i}/conv1|bn1|conv2|bn2       BasicBlock
    backbone/layer{1..4}_{i}/conv3|bn3                 Bottleneck only
    backbone/layer{1..4}_{i}/downsample_conv|downsample_bn   projection shortcut
    head/kernel, head/bias

so torchvision ``layer1.0.bn2.weight`` maps to ``backbone/layer1_0/bn2/scale``.
Convs have no bias and use kaiming-normal (fan_out) init; BN uses momentum 0.9
(torch 0.1) and eps 1e-5. Note flax keeps the *biased* batch variance in its
running average whereas torch keeps the unbiased one.

Stems: ``'imagenet'`` = conv7x7/2 (pad 3) + maxpool3x3/2 (pad 1);
``'cifar'`` = conv3x3/1 (pad 1), no maxpool, for 28/32-px inputs.
Features after global average pooling: ``D = base_width * 8 * block.expansion``.
Stochastic depth (``drop_path_rate``, train only): block ``i`` of ``N`` drops its
residual branch (after the last BN, before the shortcut is added) per example with
probability ``rate * i / (N - 1)`` (timm's schedule), the kept scaled by ``1/(1-p)``.
"""
from __future__ import annotations

import functools
from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, DropPath, Dtype, batch_norm, drop_path_rates, sub_paths

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    """Bias-free conv with torch-style symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class _ResidualBlock(nn.Module):
    """What both blocks share: their fields, and the residual branch's end (drop path, shortcut, ReLU)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    frozen: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    norm_axis_name: str | None = None
    drop_path_rate: float = 0.0

    def _norm(self, train: bool):
        return functools.partial(batch_norm, train=train, frozen=self.frozen, dtype=self.dtype,
                                 axis_name=self.norm_axis_name)

    def _join(self, x: jax.Array, y: jax.Array, features: int, train: bool) -> jax.Array:
        """``relu(shortcut(x) + drop_path(y))``; the shortcut is a strided 1x1 conv + BN when ``downsample``."""
        if self.drop_path_rate:
            y = DropPath(self.drop_path_rate, name="drop_path")(y, train=train)
        if self.downsample:
            x = _conv(features, 1, self.stride, "downsample_conv", self.dtype)(x)
            x = self._norm(train)("downsample_bn")(x)
        return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs; ``[B, H, W, Cin]`` -> ``[B, H/stride, W/stride, planes]``."""

    expansion: ClassVar[int] = 1
    norm_names: ClassVar[tuple[str, ...]] = ("bn1", "bn2")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        bn = self._norm(train)
        y = _conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y))
        y = _conv(self.planes, 3, 1, "conv2", self.dtype)(y)
        y = bn("bn2", zero_scale=self.zero_init_residual)(y)
        return self._join(x, y, self.planes, train)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs; output channels ``4 * planes``."""

    expansion: ClassVar[int] = 4
    norm_names: ClassVar[tuple[str, ...]] = ("bn1", "bn2", "bn3")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        bn = self._norm(train)
        out = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y))
        y = _conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)
        y = nn.relu(bn("bn2")(y))
        y = _conv(out, 1, 1, "conv3", self.dtype)(y)
        y = bn("bn3", zero_scale=self.zero_init_residual)(y)
        return self._join(x, y, out, train)


def block_specs(
    stage_sizes: Sequence[int], block: type[nn.Module], base_width: int
) -> list[tuple[str, int, int, bool]]:
    """Static ``(name, planes, stride, downsample)`` of every residual block."""
    specs = []
    in_ch = base_width
    for s, n in enumerate(stage_sizes):
        planes = base_width * 2**s
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            downsample = stride != 1 or in_ch != planes * block.expansion
            specs.append((f"layer{s + 1}_{i}", planes, stride, downsample))
            in_ch = planes * block.expansion
    return specs


class ResNetBackbone(nn.Module):
    """Stem + residual stages + global average pool: ``[B,H,W,C]`` -> ``[B, D]``."""

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    base_width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    frozen: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    norm_axis_name: str | None = None
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.base_width, 7, 2, "conv1", self.dtype)(x)
        elif self.stem == "cifar":
            x = _conv(self.base_width, 3, 1, "conv1", self.dtype)(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet' or 'cifar'")
        x = batch_norm(
            "bn1", train=train, frozen=self.frozen, dtype=self.dtype, axis_name=self.norm_axis_name
        )(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        specs = block_specs(self.stage_sizes, self.block, self.base_width)
        rates = drop_path_rates(self.drop_path_rate, len(specs))
        for (name, planes, stride, downsample), rate in zip(specs, rates):
            x = self.block(
                planes=planes,
                stride=stride,
                downsample=downsample,
                zero_init_residual=self.zero_init_residual,
                frozen=sub_paths(self.frozen, name),
                dtype=self.dtype,
                norm_axis_name=self.norm_axis_name,
                drop_path_rate=rate,
                name=name,
            )(x, train=train)
        return jnp.mean(x, axis=(1, 2))  # [B, 8 * base_width * expansion]


class ResNet(Classifier):
    """ResNet v1.5 classifier (defaults: ResNet-18 layout, ImageNet stem).

    Attributes (besides :class:`Classifier`'s):
        stage_sizes: number of blocks per stage, e.g. ``(2, 2, 2, 2)``.
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        base_width: channels of the stem / first stage (64 = torchvision).
        stem: ``'imagenet'`` or ``'cifar'``.
        zero_init_residual: zero-init the last BN scale of each block.
        drop_path_rate: stochastic depth of the last block's residual branch, linear
            in the block index (timm's schedule; train only, rng stream 'dropout').
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock
    base_width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0

    def norm_module_paths(self) -> tuple[str, ...]:
        """Every BN path, e.g. ``'backbone/bn1'``, ``'backbone/layer1_0/bn2'``."""
        paths = ["backbone/bn1"]
        for name, _, _, downsample in block_specs(
            self.stage_sizes, self.block, self.base_width
        ):
            names = self.block.norm_names + (("downsample_bn",) if downsample else ())
            paths += [f"backbone/{name}/{n}" for n in names]
        return tuple(paths)

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        return ResNetBackbone(
            stage_sizes=tuple(self.stage_sizes),
            block=self.block,
            base_width=self.base_width,
            stem=self.stem,
            zero_init_residual=self.zero_init_residual,
            frozen=frozen,
            dtype=self.dtype,
            norm_axis_name=self.norm_axis_name,
            drop_path_rate=self.drop_path_rate,
        )


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
