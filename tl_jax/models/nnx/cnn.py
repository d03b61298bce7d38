"""The Flax NNX twin of :class:`tl_jax.models.cnn.CNN` (same layers, same param paths).

Backbone: conv3x3(32w) relu -> maxpool2 -> conv3x3(64w) relu -> maxpool2 ->
flatten -> dense(512w) relu, ``w = width``; then dropout -> dense head. Params
``backbone/{conv1,conv2,fc}/{kernel,bias}`` and ``head/{kernel,bias}``, with the
shapes of the linen model, so its checkpoints load here unchanged (and back).

NNX layers need their input size when they are built, which the linen model
learns from its first input: ``conv1`` (input channels) and ``fc`` (the
flattened ``(H // 4) * (W // 4) * 64w``) are created on the first call, from
the ``rngs`` kept for that. :class:`tl_jax.models.nnx.bridge.NNXModel` runs
that call at ``init``. ``conv1`` uses the same im2col matmul as the linen model
for <= 4 input channels (:mod:`tl_jax.models.im2col`), so both compile to the
same program.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tl_jax.models.im2col import conv3x3_same_im2col
from tl_jax.models.nnx.layers import ClassifierNNX
from tl_jax.models.nnx.bridge import expose_signature
from tl_jax.models.pooling import max_pool_2x2

Dtype = Any


class Conv3x3NNX(nnx.Module):
    """``nnx.Conv(in, out, (3, 3), padding='SAME')``'s params (lecun-normal ``kernel`` ``[3, 3, C, F]``,
    zero ``bias`` ``[F]``), computed as a patch matmul when ``im2col`` (fast for few input channels)."""

    def __init__(self, in_features: int, out_features: int, *, im2col: bool, dtype: Dtype, rngs: nnx.Rngs):
        shape = (3, 3, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.im2col = im2col
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.im2col:
            y = conv3x3_same_im2col(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class CNNBackboneNNX(nnx.Module):
    """``[B, H, W, C]`` -> ``[B, 512 * width]``; ``conv1`` and ``fc`` are built on the first call."""

    def __init__(self, *, rngs: nnx.Rngs, width: int = 1, dtype: Dtype = jnp.float32):
        self.width = width
        self.dtype = dtype
        self.rngs = rngs  # for the layers sized by the first input
        self.conv1 = nnx.data(None)
        self.conv2 = nnx.Conv(32 * width, 64 * width, (3, 3), padding="SAME", dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
        self.fc = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.conv1 is None:
            self.conv1 = Conv3x3NNX(x.shape[-1], 32 * self.width, im2col=x.shape[-1] <= 4, dtype=self.dtype,
                                    rngs=self.rngs)
        x = max_pool_2x2(nnx.relu(self.conv1(x)))  # [B, H/2, W/2, 32w]
        x = max_pool_2x2(nnx.relu(self.conv2(x)))  # [B, H/4, W/4, 64w]
        x = x.reshape((x.shape[0], -1))
        if self.fc is None:
            self.fc = nnx.Linear(x.shape[-1], 512 * self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                 rngs=self.rngs)
        return nnx.relu(self.fc(x))  # [B, 512w]


@expose_signature
class CNNNNX(ClassifierNNX):
    """Two-conv CNN classifier: ``backbone`` -> dropout -> ``head`` (logits float32 ``[B, num_classes]``).

    Args:
        num_classes: logits.
        rngs: ``nnx.Rngs`` with streams ``params`` and ``dropout``.
        dropout_rate: dropout on the features before the head (train mode only).
        dtype: computation dtype (params are float32).
        width: scales every layer (width=4: the teacher).
    """

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0, dtype: Dtype = jnp.float32,
                 width: int = 1):
        self.attach(CNNBackboneNNX(rngs=rngs, width=width, dtype=dtype), 512 * width, num_classes,
                    dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
