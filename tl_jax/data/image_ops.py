"""The image ops of :mod:`tl_jax.data.preprocess`, each over a whole batch.

Each op is ``(images float32 [B, H, W, C], *draws, **params) -> images``; a
random op also has a ``draw(rng, sizes [B, 2], **params) -> tuple of [B]
arrays`` giving every example's values for one batch in one call. Parameters
arrive validated (``size`` as ``(h, w)``, ``mean``/``std`` as float32 arrays):
:func:`tl_jax.data.preprocess.build_preprocess` parses the config first.

``rescale``, ``pad``, ``normalize``, ``center_crop``, ``flip_lr`` and ``to_rgb``
take numpy or jax arrays alike (:func:`_xp`: the array's own module), so
:mod:`tl_jax.data.device_batches` runs these very functions inside the
compiled step.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

_BILINEAR = Image.Resampling.BILINEAR


def _xp(x):
    """The array module of ``x`` (array API ``__array_namespace__``): numpy, or jax.numpy for jax arrays."""
    return x.__array_namespace__() if hasattr(x, "__array_namespace__") else np


def rescale(x: np.ndarray, *, in_max: float) -> np.ndarray:
    """``x · (1 / in_max)``, the reciprocal rounded to float32 once.

    A product rather than a quotient: float32 products round the same in numpy
    and in XLA, but XLA:CPU divides approximately (1 ulp off numpy in ~15 % of
    values, jaxlib 0.10), and :mod:`tl_jax.data.device_batches` runs these ops
    in XLA with the same results.
    """
    return x * np.float32(1.0 / in_max)


def resize(x: np.ndarray, *, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``size = (h, w)``, per channel through PIL mode 'F' (antialiased when shrinking)."""
    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    return np.stack([
        np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c])).resize((w, h), _BILINEAR))
                  for c in range(x.shape[-1])], axis=-1)
        for img in x
    ]).astype(np.float32, copy=False)


def _pad_to(x: np.ndarray, h: int, w: int, what: str) -> np.ndarray:
    ih, iw = x.shape[1:3]
    if ih > h or iw > w:
        raise ValueError(f"{what}: image {ih}x{iw} is larger than pad size {h}x{w}")
    top, left = (h - ih) // 2, (w - iw) // 2
    return _xp(x).pad(x, ((0, 0), (top, h - ih - top), (left, w - iw - left), (0, 0)))


def pad(x: np.ndarray, *, size: tuple[int, int]) -> np.ndarray:
    """Zero-pad to ``size``, the image centred (the odd row/column at the bottom/right)."""
    return _pad_to(x, *size, what="pad")


def normalize(x: np.ndarray, *, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) · (1 / std)`` per channel, the reciprocal in float32 (a product: see :func:`rescale`).

    One new array: the product is taken in place of the difference (numpy; jax rebinds), same values.
    """
    out = x - mean
    out *= np.float32(1.0) / std
    return out.astype(np.float32, copy=False)


def center_crop(x: np.ndarray, *, size: tuple[int, int]) -> np.ndarray:
    """``x[:, (H - h) // 2 :, (W - w) // 2 :][:, :h, :w]``."""
    h, w = size
    ih, iw = x.shape[1:3]
    if h > ih or w > iw:
        raise ValueError(f"crop {h}x{w} is larger than image {ih}x{iw}")
    top, left = (ih - h) // 2, (iw - w) // 2
    return x[:, top : top + h, left : left + w]


def draw_crop(rng: np.random.Generator, sizes: np.ndarray, *, size: tuple[int, int], pad: int):
    """Offsets ``top_b ~ U{0..H_b + 2 pad - h}``, ``left_b ~ U{0..W_b + 2 pad - w}`` of the padded images."""
    room = sizes + 2 * pad - np.asarray(size) + 1
    if (room < 1).any():
        ih, iw = (sizes[np.argmin(room.min(axis=1))] + 2 * pad).tolist()
        raise ValueError(f"crop {size[0]}x{size[1]} is larger than image {ih}x{iw}")
    return rng.integers(0, room[:, 0]), rng.integers(0, room[:, 1])


def random_crop(x: np.ndarray, top: np.ndarray, left: np.ndarray, *, size: tuple[int, int],
                 pad: int) -> np.ndarray:
    """``out_b = zero_pad(x_b, pad)[top_b : top_b + h, left_b : left_b + w]`` (one gather for the batch)."""
    h, w = size
    if pad:
        b, ih, iw, c = x.shape
        padded = np.zeros((b, ih + 2 * pad, iw + 2 * pad, c), x.dtype)
        padded[:, pad : pad + ih, pad : pad + iw] = x
        x = padded
    windows = sliding_window_view(x, (h, w), axis=(1, 2))  # [B, H' - h + 1, W' - w + 1, C, h, w], a view
    return np.moveaxis(windows[np.arange(len(x)), top, left], 1, -1)


def draw_flip(rng: np.random.Generator, sizes: np.ndarray, *, p: float):
    """``flip_b ~ Bernoulli(p)``."""
    return (rng.random(len(sizes)) < p,)


def flip_lr(x: np.ndarray, flip: np.ndarray, *, p: float) -> np.ndarray:
    """``x_b[:, ::-1]`` where ``flip_b`` (drawn with probability ``p`` by :func:`draw_flip`)."""
    return _xp(x).where(flip[:, None, None, None], x[:, :, ::-1], x)


def to_rgb(x: np.ndarray) -> np.ndarray:
    """1 channel -> 3 by repetition; 3 channels unchanged."""
    return _xp(x).repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def to_gray(x: np.ndarray) -> np.ndarray:
    """3 channels -> 1 by their mean; 1 channel unchanged."""
    return x.mean(axis=-1, keepdims=True, dtype=np.float32) if x.shape[-1] == 3 else x
