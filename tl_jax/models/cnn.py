"""A small convolutional classifier (MNIST / CIFAR scale).

Backbone: conv3x3(32w) relu -> maxpool2 -> conv3x3(64w) relu -> maxpool2 ->
flatten -> dense(512w) relu, with ``w = width``. Convs use SAME padding and
pooling is 2x2 stride 2 (VALID), so a ``[B, H, W, C]`` input gives a flattened
vector of size ``(H // 4) * (W // 4) * 64w`` and features ``D = 512w``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, Dtype
from tl_jax.models.im2col import Conv3x3
from tl_jax.models.pooling import max_pool_2x2


class CNNBackbone(nn.Module):
    """Feature extractor of :class:`CNN`: ``[B, H, W, C]`` -> ``[B, 512 * width]``."""

    width: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no train-dependent layers
        x = x.astype(self.dtype)
        # Same params as nn.Conv; a patch matmul for <= 4 input channels (faster on XLA:CPU, models/im2col.py).
        x = Conv3x3(32 * self.width, im2col=x.shape[-1] <= 4, dtype=self.dtype, name="conv1")(x)
        x = max_pool_2x2(nn.relu(x))  # [B, H/2, W/2, 32w]; = nn.max_pool, faster grads on CPU
        x = nn.Conv(64 * self.width, (3, 3), dtype=self.dtype, name="conv2")(x)
        x = max_pool_2x2(nn.relu(x))  # [B, H/4, W/4, 64w]
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(512 * self.width, dtype=self.dtype, name="fc")(x)
        return nn.relu(x)  # [B, 512w]


class CNN(Classifier):
    """Two-conv CNN classifier; ``width`` scales every layer (width=4: teacher).

    Params: ``backbone/{conv1,conv2,fc}/{kernel,bias}``, ``head/{kernel,bias}``.
    Has no BatchNorm, so ``frozen_norms`` must be empty.
    """

    width: int = 1

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        del frozen  # validated empty by Classifier.setup
        return CNNBackbone(width=self.width, dtype=self.dtype)


def cnn_param_count(
    num_classes: int, height: int, width_px: int, channels: int, width: int = 1
) -> int:
    """Number of params of ``CNN(num_classes, width=width)`` on ``[H, W, C]`` input."""
    c1, c2, f = 32 * width, 64 * width, 512 * width
    flat = (height // 4) * (width_px // 4) * c2
    return (
        (9 * channels * c1 + c1)
        + (9 * c1 * c2 + c2)
        + (flat * f + f)
        + (f * num_classes + num_classes)
    )
