"""A 3x3 SAME convolution written as one matmul over image patches (im2col), for few input channels.

XLA:CPU's convolution kernels are slow for a first layer with 1 or 3 input
channels, above all for the kernel gradient, while one matmul over patches
uses its fast GEMM (``BENCHMARKS.md``, "CPU convolution gap"). :class:`Conv3x3` has the
params of ``nn.Conv(features, (3, 3))`` (``kernel`` ``[3, 3, C, F]`` with the
same ``lecun_normal`` init, ``bias`` ``[F]`` zeros), so checkpoints and
``init`` values are interchangeable with it, and computes the same function:
the 9 shifted views of the zero-padded input are concatenated into ``[B, H, W,
9C]`` rows (tap-major, channel-minor: the order of ``kernel.reshape(9C, F)``)
and multiplied by the kernel. Sums run in another order than XLA's
convolution, so results agree to float rounding, not bit for bit.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def conv3x3_same_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')`` (NHWC, HWIO) as a patch matmul."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
    out = cols.reshape(b * h * w, 9 * c) @ kernel.reshape(9 * c, kernel.shape[-1])
    return out.reshape(b, h, w, kernel.shape[-1])


class Conv3x3(nn.Module):
    """``nn.Conv(features, (3, 3), padding='SAME')`` with an im2col forward when ``im2col``.

    Attributes:
        features: output channels ``F``.
        im2col: compute as a patch matmul (fast for few input channels on the
            CPU); ``False`` uses ``lax.conv_general_dilated`` as ``nn.Conv`` does.
        dtype: computation dtype (params are float32).
    """

    features: int
    im2col: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if self.im2col:
            y = conv3x3_same_im2col(x, kernel)
        else:
            y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias
