"""RandAugment (Cubuk et al. 2020) as an op of :mod:`tl_jax.data.preprocess`: ``num_ops`` ops per
example, each chosen uniformly from the standard 14, at one global ``magnitude``.

Magnitudes follow torchvision's ``RandAugment`` (``magnitude`` M in 0..30, i.e.
``num_magnitude_bins=31``; ImageNet's recipe uses M = 9), with ``m = M / 30``:

=============  ====================================  ======
op             value at M                            signed
=============  ====================================  ======
identity       -                                     -
autocontrast   -                                     -
equalize       -                                     -
rotate         30 m degrees (about the centre)        yes
solarize       threshold 255 (1 - m)                 no
color          enhance factor 1 + 0.9 m              yes
posterize      keep 8 - round(4 m) bits              no
contrast       enhance factor 1 + 0.9 m              yes
brightness     enhance factor 1 + 0.9 m              yes
sharpness      enhance factor 1 + 0.9 m              yes
shear_x/y      shear 0.3 m                           yes
translate_x/y  (150/331) m · width (height) pixels   yes
=============  ====================================  ======

Each example goes through PIL as 8 bits: the float32 image in ``[0, in_max]``
is scaled to 0..255 and rounded, the ops run (geometric ones with nearest
sampling and ``fill`` for the uncovered pixels), and it comes back as float32
in ``[0, in_max]``. So put it where the chain holds the image's pixel range
(``in_max=255`` before ``rescale``, or ``in_max=1`` after it).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from tl_jax.data.augment import check_range

OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
       "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
SIGNED = frozenset({"rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                    "translate_x", "translate_y"})
MAX_MAGNITUDE = 30


def op_value(name: str, magnitude: float, negate: bool, height: int, width: int) -> float:
    """The value op ``name`` uses at ``magnitude`` (table above), negated when signed and ``negate``."""
    m = magnitude / MAX_MAGNITUDE
    value = {"rotate": 30.0 * m, "solarize": 255.0 * (1.0 - m), "posterize": float(8 - round(4 * m)),
             "shear_x": 0.3 * m, "shear_y": 0.3 * m, "translate_x": 150.0 / 331.0 * m * width,
             "translate_y": 150.0 / 331.0 * m * height}.get(name, 0.9 * m)
    if name in ("color", "contrast", "brightness", "sharpness"):
        value = 1.0 + (-value if negate else value)
    elif name in SIGNED and negate:
        value = -value
    return value


def draw_randaugment(rng, sizes: np.ndarray, *, num_ops, magnitude, in_max, fill):
    """``(op_index, negate)``, each int ``[B, num_ops]``: op ``k`` of example ``b`` is
    ``OPS[op_index[b, k]]``, its value negated where ``negate[b, k]`` (signed ops only)."""
    n = len(sizes)
    index = np.asarray([rng.integers(0, np.full(n, len(OPS))) for _ in range(num_ops)], np.int64).reshape(num_ops, n)
    negate = np.asarray([rng.random(n) < 0.5 for _ in range(num_ops)]).reshape(num_ops, n)
    return index.T, negate.T


def plan(op_index: np.ndarray, negate: np.ndarray, magnitude: float, height: int, width: int):
    """One example's ops as ``[(name, value), ...]`` from its draws (:func:`draw_randaugment`)."""
    return [(OPS[int(i)], op_value(OPS[int(i)], magnitude, bool(n), height, width))
            for i, n in zip(op_index, negate, strict=True)]


def apply_op(img: Image.Image, name: str, value: float, fill: int) -> Image.Image:
    """One RandAugment op on an 8-bit PIL image ('L' or 'RGB'); geometric ones sample nearest, ``fill`` outside."""
    if name == "identity":
        return img
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    fillcolor = (fill,) * len(img.getbands()) if len(img.getbands()) > 1 else fill
    if name == "rotate":
        return img.rotate(value, Image.Resampling.NEAREST, fillcolor=fillcolor)
    if name == "solarize":
        return ImageOps.solarize(img, int(value))
    if name == "posterize":
        return ImageOps.posterize(img, int(value))
    if name in ("color", "contrast", "brightness", "sharpness"):
        enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                    "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[name]
        return enhancer(img).enhance(value)
    matrix = {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
              "translate_x": (1, 0, value, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, value)}[name]
    # PIL's inverse affine map (output pixel centre -> input)
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.NEAREST, fillcolor=fillcolor)


def to_uint8(image: np.ndarray, in_max: float) -> np.ndarray:
    """float ``[H, W, C]`` in ``[0, in_max]`` -> uint8 ``round(x · 255 / in_max)`` clipped to 0..255."""
    return np.clip(np.rint(image * (255.0 / in_max)), 0, 255).astype(np.uint8)


def randaugment(x: np.ndarray, op_index: np.ndarray, negate: np.ndarray, *, num_ops, magnitude, in_max,
                fill) -> np.ndarray:
    """Each example through its :func:`plan` in PIL (8 bits; see the module docstring) -> float32 ``[0, in_max]``."""
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"needs 1 or 3 channels, got {x.shape[-1]}")
    check_range(x, in_max)
    out = np.empty_like(x, dtype=np.float32)
    height, width = x.shape[1:3]
    for b, image in enumerate(x):
        u8 = to_uint8(image, in_max)
        img = Image.fromarray(u8[..., 0] if x.shape[-1] == 1 else u8, "L" if x.shape[-1] == 1 else "RGB")
        for name, value in plan(op_index[b], negate[b], magnitude, height, width):
            img = apply_op(img, name, value, fill)
        arr = np.asarray(img, np.float32).reshape(height, width, x.shape[-1])
        out[b] = arr * np.float32(in_max / 255.0)
    return out

