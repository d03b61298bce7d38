"""Resizing a ViT's learned position table to another patch grid, as PyTorch's bicubic does it.

A ViT pretrained at ``g x g`` patches (e.g. 224 px / 16 = 14) fine-tuned at
another size sees ``h x w`` patches; its ``[g*g, D]`` table of patch positions
is resized as an image ``[g, g, D]`` -> ``[h, w, D]`` and the class/distillation
rows are kept as they are. Hugging Face transformers, timm and DINOv2 call
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``, with
``antialias=True`` in some families (DINOv2 with registers); the two kernels
differ, so both are written here:

* ``bicubic``: Keys' cubic convolution with ``a = -0.75`` on the source index
  ``s = (i + 0.5) * in/out - 0.5``, taps ``floor(s) - 1 .. floor(s) + 2``, indices
  clamped to the border (torch's ``upsample_bicubic2d``).
* ``bicubic_aa``: the separable antialiased filter (Pillow's, ``a = -0.5``),
  support ``2 * max(in/out, 1)`` around the centre ``(i + 0.5) * in/out``, taps
  outside the input dropped and the weights renormalised to sum to 1
  (torch's ``_upsample_bicubic2d_aa``).
* ``zoom_linear``: big_vision's and vision_transformer's ``resample_posemb``,
  ``scipy.ndimage.zoom(order=1)``: linear interpolation with the corners aligned,
  source index ``s = i * (in - 1) / (out - 1)``, weights ``1 - frac(s)``, ``frac(s)``
  on ``floor(s)``, ``floor(s) + 1``.

Both are linear in the table and separable, so a resize is ``W_h @ grid @ W_w^T``
with ``W`` an ``[out, in]`` matrix built in numpy from static shapes (a constant
under ``jit``; gradients flow to the table).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

INTERPOLATIONS = ("bicubic", "bicubic_aa", "zoom_linear")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel ``k(x)`` (support ``|x| < 2``)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, method: str = "bicubic") -> np.ndarray:
    """``[n_out, n_in]`` float64 weights: ``out = W @ in`` along one axis (see module doc)."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"position-embedding interpolation must be one of {INTERPOLATIONS}, got {method!r}")
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if method == "zoom_linear":
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            base = min(int(np.floor(src)), n_in - 1)
            frac = src - base
            w[i, base] += 1.0 - frac
            if frac > 0:
                w[i, base + 1] += frac
        elif method == "bicubic":
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            taps = np.arange(base - 1, base + 3)
            weights = _cubic(taps - src, -0.75)
            np.add.at(w[i], np.clip(taps, 0, n_in - 1), weights)
        else:
            support = 2.0 * scale if scale >= 1.0 else 2.0
            inv = 1.0 / scale if scale >= 1.0 else 1.0
            centre = scale * (i + 0.5)
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), n_in)
            taps = np.arange(lo, hi)
            weights = _cubic((taps - centre + 0.5) * inv, -0.5)
            w[i, lo:hi] = weights / weights.sum()
    return w


def resize_grid(grid: jnp.ndarray, size: tuple[int, int], method: str = "bicubic") -> jnp.ndarray:
    """``[h, w, D]`` -> ``[H, W, D]`` with torch's bicubic (``method``, see module doc); identity if same size."""
    h, w = grid.shape[:2]
    if (h, w) == tuple(size):
        return grid
    wh = jnp.asarray(resize_matrix(h, size[0], method), grid.dtype)
    ww = jnp.asarray(resize_matrix(w, size[1], method), grid.dtype)
    return jnp.einsum("ih,hwd,jw->ijd", wh, grid, ww, precision="highest")
