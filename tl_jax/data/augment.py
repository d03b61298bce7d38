"""Strong augmentation ops of :mod:`tl_jax.data.preprocess`: inception crop, random erasing, colour jitter.

Same contract as :mod:`tl_jax.data.image_ops`: ``draw(rng, sizes [B, 2], **params)
-> tuple of [B] arrays`` takes every example's values for a batch from the
stream's per-position rng (a fixed number of ``rng.random()`` calls, whatever
the draws, so the stream stays keyed by position and resume stays exact), and
``op(images float32 [B, H, W, C], *draws, **params) -> images`` applies them.
The draw functions are pure and public so a test (or a user) can recompute an
op from the values it drew. RandAugment is in :mod:`tl_jax.data.randaugment`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

ATTEMPTS = 10  # box proposals per example (torchvision / timm)


def _boxes(rng, sizes: np.ndarray, area: tuple[float, float], aspect: tuple[float, float]):
    """``ATTEMPTS`` proposals per example: ``(h, w)`` int ``[B, A]`` and whether each fits its image.

    target area ``a ~ U(area) · H W``, aspect ``r = exp(U(log aspect))``,
    ``w = round(sqrt(a r))``, ``h = round(sqrt(a / r))`` (torchvision RandomResizedCrop).
    """
    hw = sizes.astype(np.float64)
    u_area = np.stack([rng.random(len(sizes)) for _ in range(ATTEMPTS)], axis=1)
    u_aspect = np.stack([rng.random(len(sizes)) for _ in range(ATTEMPTS)], axis=1)
    target = (area[0] + (area[1] - area[0]) * u_area) * (hw[:, :1] * hw[:, 1:])
    log_lo, log_hi = np.log(aspect[0]), np.log(aspect[1])
    ratio = np.exp(log_lo + (log_hi - log_lo) * u_aspect)
    w = np.round(np.sqrt(target * ratio)).astype(np.int64)
    h = np.round(np.sqrt(target / ratio)).astype(np.int64)
    fits = (h > 0) & (w > 0) & (h <= sizes[:, :1]) & (w <= sizes[:, 1:])
    return h, w, fits


def _first(values: np.ndarray, fits: np.ndarray) -> np.ndarray:
    """Each row's value at its first fitting attempt (0 where none fits)."""
    return np.where(fits.any(1), values[np.arange(len(values)), np.argmax(fits, axis=1)], 0)


def draw_inception_crop(rng, sizes: np.ndarray, *, size, area, aspect):
    """``(top, left, h, w)`` int ``[B]``: the crop box of each example (torchvision RandomResizedCrop).

    The first of :data:`ATTEMPTS` proposals (:func:`_boxes`) that fits, at a
    uniform offset ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``; none fits: the
    centred crop of the whole image with its aspect clamped to ``aspect``.
    """
    h, w, fits = _boxes(rng, sizes, area, aspect)
    u_top, u_left = rng.random(len(sizes)), rng.random(len(sizes))
    ih, iw = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    in_ratio = iw / ih
    fb_w = np.where(in_ratio > aspect[1], np.round(ih * aspect[1]).astype(np.int64), iw)
    fb_h = np.where(in_ratio < aspect[0], np.round(iw / aspect[0]).astype(np.int64), ih)
    found = fits.any(1)
    bh, bw = np.where(found, _first(h, fits), fb_h), np.where(found, _first(w, fits), fb_w)
    top = np.where(found, np.floor(u_top * (ih - bh + 1)).astype(np.int64), (ih - bh) // 2)
    left = np.where(found, np.floor(u_left * (iw - bw + 1)).astype(np.int64), (iw - bw) // 2)
    return top, left, bh, bw


def inception_crop(x: np.ndarray, top, left, h, w, *, size, area, aspect) -> np.ndarray:
    """``out_b = resize(x_b[top_b : top_b + h_b, left_b : left_b + w_b], size)``, bilinear per channel
    (PIL mode 'F', antialiased when shrinking, as :func:`tl_jax.data.image_ops.resize`)."""
    oh, ow = size
    out = np.empty((len(x), oh, ow, x.shape[-1]), np.float32)
    for b, img in enumerate(x):
        crop = img[top[b] : top[b] + h[b], left[b] : left[b] + w[b]]
        for c in range(x.shape[-1]):
            channel = Image.fromarray(np.ascontiguousarray(crop[..., c], dtype=np.float32))
            out[b, ..., c] = np.asarray(channel.resize((ow, oh), Image.Resampling.BILINEAR))
    return out


def draw_random_erasing(rng, sizes: np.ndarray, *, p, area, aspect, value):
    """``(top, left, h, w)`` int ``[B]``: the box to fill (``h = 0``: none), timm RandomErasing's draw.

    Erase with probability ``p``; the box is the first of :data:`ATTEMPTS`
    proposals (:func:`_boxes`) strictly inside the image, at ``top ~ U{0..H-h}``,
    ``left ~ U{0..W-w}``; none fits: nothing erased.
    """
    apply = rng.random(len(sizes)) < p
    h, w, fits = _boxes(rng, sizes, area, aspect)
    fits &= (h < sizes[:, :1]) & (w < sizes[:, 1:])
    u_top, u_left = rng.random(len(sizes)), rng.random(len(sizes))
    keep = apply & fits.any(1)
    bh, bw = np.where(keep, _first(h, fits), 0), np.where(keep, _first(w, fits), 0)
    top = np.floor(u_top * (sizes[:, 0] - bh + 1)).astype(np.int64)
    left = np.floor(u_left * (sizes[:, 1] - bw + 1)).astype(np.int64)
    return top, left, bh, bw


def random_erasing(x: np.ndarray, top, left, h, w, *, p, area, aspect, value) -> np.ndarray:
    """``x_b[top_b : top_b + h_b, left_b : left_b + w_b] = value`` (every channel) on a copy."""
    ih, iw = x.shape[1:3]
    rows, cols = np.arange(ih), np.arange(iw)
    inside = (((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :])
    return np.where(inside[..., None], np.asarray(value, np.float32), x).astype(np.float32, copy=False)


def draw_color_jitter(rng, sizes: np.ndarray, *, brightness, contrast, saturation, hue, in_max):
    """Factors ``[B]`` each: brightness, contrast, saturation ``~ U(max(0, 1 - s), 1 + s)``,
    hue shift ``~ U(-hue, hue)`` (fractions of the colour circle); all four are always drawn."""
    def factor(s):
        u = rng.random(len(sizes))
        return max(0.0, 1.0 - s) + (1.0 + s - max(0.0, 1.0 - s)) * u
    return factor(brightness), factor(contrast), factor(saturation), hue * (2.0 * rng.random(len(sizes)) - 1.0)


def _gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (one channel: itself), ``[..., 1]``."""
    if x.shape[-1] == 1:
        return x
    return (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]


def _blend(x: np.ndarray, other: np.ndarray, factor: np.ndarray, in_max: float) -> np.ndarray:
    """``clip(other + f (x - other), 0, in_max)`` with one factor per example."""
    return np.clip(other + factor[:, None, None, None].astype(np.float32) * (x - other), 0.0, in_max)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> HSV in [0, 1] (colorsys's formulas, over arrays ``[..., 3]``)."""
    r, g, b = np.moveaxis(x, -1, 0)
    v, mn = x.max(-1), x.min(-1)
    d = v - mn
    s = np.where(v > 0, d / np.where(v > 0, v, 1), 0.0)
    safe = np.where(d > 0, d, 1)
    rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
    h = np.where(r == v, bc - gc, np.where(g == v, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(d > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 1] (colorsys's formulas, over arrays ``[..., 3]``)."""
    h, s, v = np.moveaxis(x, -1, 0)
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[k] for c in choices]) for k in range(3)], axis=-1)


def check_range(x: np.ndarray, in_max: float) -> None:
    """Raise if ``x`` leaves ``[0, in_max]`` (the op would clip it: wrong ``in_max``, or after ``normalize``)."""
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0 or hi > in_max * (1 + 1e-6):
        raise ValueError(f"pixel values {lo:.4g}..{hi:.4g} leave [0, in_max={in_max:g}]: set in_max to the image's "
                         "range at this place in the chain (255 before rescale, 1 after), and put it before normalize")


def color_jitter(x: np.ndarray, bright, contr, sat, hue_shift, *, brightness, contrast, saturation, hue,
                 in_max) -> np.ndarray:
    """Brightness, contrast, saturation, hue, in that fixed order, each clipped to ``[0, in_max]``.

    brightness ``f x``; contrast ``m + f (x - m)``, ``m`` the image's mean luma;
    saturation ``g + f (x - g)``, ``g`` the pixel's luma; hue: ``h + shift`` (mod
    1) in HSV (RGB only). A factor of 1 / shift of 0 leaves the image as is.
    """
    check_range(x, in_max)
    out = np.clip(x * bright[:, None, None, None].astype(np.float32), 0.0, in_max)
    if contrast:
        out = _blend(out, _gray(out).mean(axis=(1, 2, 3), keepdims=True), contr, in_max)
    if saturation and x.shape[-1] == 3:
        out = _blend(out, _gray(out), sat, in_max)
    if hue and x.shape[-1] == 3:
        hsv = rgb_to_hsv(out.astype(np.float64) / in_max)
        hsv[..., 0] = (hsv[..., 0] + hue_shift[:, None, None]) % 1.0
        out = hsv_to_rgb(hsv) * in_max
    return out.astype(np.float32, copy=False)
