"""inception_crop, random_erasing, color_jitter, randaugment: each against an independent numpy / PIL /
colorsys computation on the same draws (the ops' public draw functions), errors, determinism, resume."""
import colorsys
import copy
import math

import grain
import numpy as np
import pytest
from PIL import Image

from tl_jax.data import augment, build_preprocess, randaugment
from tl_jax.data.cache import ArraySource
from tl_jax.data.shuffle import train_chain
from tl_jax.data.stream_rng import StreamRng


def _batch(images):
    return {"image": images, "label": np.arange(len(images), dtype=np.int32)}


def _images(b, h, w, c, *, seed=0, high=256):
    return np.random.default_rng(seed).integers(0, high, (b, h, w, c)).astype(np.float32)


# --- inception_crop -------------------------------------------------------------------------------

def test_inception_crop_matches_pil_crop_and_resize_on_the_drawn_boxes():
    images = np.random.default_rng(0).random((12, 20, 30, 3)).astype(np.float32)
    params = dict(size=(8, 10), area=(0.1, 0.8), aspect=(0.5, 2.0))
    rng = StreamRng(4, np.arange(12))
    top, left, h, w = augment.draw_inception_crop(copy.deepcopy(rng), np.array([[20, 30]] * 12), **params)
    got = build_preprocess([{"op": "inception_crop", "size": [8, 10], "area": [0.1, 0.8], "aspect": [0.5, 2.0]}]
                           ).on_batch(_batch(images), rng)["image"]
    assert got.shape == (12, 8, 10, 3)
    for b in range(12):
        assert 0.1 * 600 - 30 <= h[b] * w[b] <= 0.8 * 600 + 30 and 0.4 <= w[b] / h[b] <= 2.5  # rounding slack
        assert 0 <= top[b] <= 20 - h[b] and 0 <= left[b] <= 30 - w[b]
        crop = images[b, top[b] : top[b] + h[b], left[b] : left[b] + w[b]]  # crop, then resize (torchvision)
        want = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c])).resize(
            (10, 8), Image.Resampling.BILINEAR)) for c in range(3)], -1)
        np.testing.assert_allclose(got[b], want, atol=1e-5)
    assert len({(int(t), int(le), int(hh)) for t, le, hh in zip(top, left, h, strict=True)}) > 8


def test_inception_crop_falls_back_to_the_centre_crop_when_no_box_fits():
    sizes = np.array([[4, 40], [40, 4]])
    top, left, h, w = augment.draw_inception_crop(np.random.default_rng(0), sizes, size=(4, 4),
                                                  area=(0.9, 1.0), aspect=(1.0, 1.0))
    np.testing.assert_array_equal(np.stack([top, left, h, w], 1), [[0, 18, 4, 4], [18, 0, 4, 4]])


# --- random_erasing -------------------------------------------------------------------------------

def test_random_erasing_fills_the_drawn_box_only():
    images = _images(64, 16, 12, 2, seed=1) + 1  # no pixel is 0 before erasing
    params = dict(p=0.5, area=(0.05, 0.3), aspect=(0.3, 1 / 0.3), value=0.0)  # the op's default aspect
    rng = StreamRng(2, np.arange(64))
    top, left, h, w = augment.draw_random_erasing(copy.deepcopy(rng), np.array([[16, 12]] * 64), **params)
    got = build_preprocess([{"op": "random_erasing", "p": 0.5, "area": [0.05, 0.3]}]).on_batch(
        _batch(images), rng)["image"]
    for b in range(64):
        want = images[b].copy()
        want[top[b] : top[b] + h[b], left[b] : left[b] + w[b]] = 0.0
        np.testing.assert_array_equal(got[b], want)
        if h[b]:
            assert 0.05 * 192 - 10 <= h[b] * w[b] <= 0.3 * 192 + 10 and h[b] < 16 and w[b] < 12
    erased = (h > 0).mean()
    assert 0.3 < erased < 0.7  # p = 0.5 (a few proposals may not fit)
    unchanged = build_preprocess([{"op": "random_erasing", "p": 0.0}]).on_batch(_batch(images), StreamRng(0, np.arange(64)))
    np.testing.assert_array_equal(unchanged["image"], images)


# --- color_jitter ---------------------------------------------------------------------------------

def test_color_jitter_matches_colorsys_per_pixel():
    images = np.random.default_rng(3).random((6, 4, 5, 3)).astype(np.float32)
    params = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, in_max=1.0)
    rng = StreamRng(5, np.arange(6))
    fb, fc, fs, dh = augment.draw_color_jitter(copy.deepcopy(rng), np.array([[4, 5]] * 6), **params)
    got = build_preprocess([{"op": "color_jitter", **params}]).on_batch(_batch(images), rng)["image"]
    luma = np.array([0.299, 0.587, 0.114])
    for b in range(6):
        assert 0.6 <= min(fb[b], fc[b], fs[b]) and max(fb[b], fc[b], fs[b]) <= 1.4 and abs(dh[b]) <= 0.1
        x = np.clip(images[b].astype(np.float64) * fb[b], 0, 1)
        m = (x @ luma).mean()
        x = np.clip(m + fc[b] * (x - m), 0, 1)
        g = (x @ luma)[..., None]
        x = np.clip(g + fs[b] * (x - g), 0, 1)
        want = np.empty_like(x)
        for i, j in np.ndindex(4, 5):
            hh, s, v = colorsys.rgb_to_hsv(*x[i, j])
            want[i, j] = colorsys.hsv_to_rgb((hh + dh[b]) % 1.0, s, v)
        np.testing.assert_allclose(got[b], want, atol=2e-6)
    assert len(set(np.round(fb, 6))) == 6  # per example


def test_color_jitter_off_is_identity_and_gray_images_skip_colour():
    images = np.random.default_rng(4).random((3, 4, 4, 1)).astype(np.float32)
    got = build_preprocess([{"op": "color_jitter", "saturation": 0.5, "hue": 0.2}]).on_batch(
        _batch(images), StreamRng(0, np.arange(3)))["image"]
    np.testing.assert_allclose(got, images, atol=1e-7)


# --- randaugment: each of the 14 ops against numpy ------------------------------------------------

def _lut(x, lut):
    return np.asarray(lut, np.uint8)[x]


def _blend(a, b, f):  # PIL's Image.blend on 8 bits: truncation, clipped
    return np.clip(np.trunc(a.astype(np.float32) + np.float32(f) * (b.astype(np.float32) - a)), 0, 255)


def _luma(x):  # PIL's RGB -> L
    r, g, b = (x[..., i].astype(np.int64) for i in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _nearest_affine(x, a, b, c, d, e, f, fill):
    """out[y, x] = in[floor(d X + e Y + f), floor(a X + b Y + c)] at pixel centres X = x + .5, Y = y + .5."""
    hgt, wid = x.shape[:2]
    yy, xx = np.mgrid[0:hgt, 0:wid] + 0.5
    xi, yi = np.floor(a * xx + b * yy + c).astype(int), np.floor(d * xx + e * yy + f).astype(int)
    inside = (xi >= 0) & (xi < wid) & (yi >= 0) & (yi < hgt)
    return np.where(inside[..., None], x[np.clip(yi, 0, hgt - 1), np.clip(xi, 0, wid - 1)], fill)


def numpy_op(x, name, v, fill):
    """The RandAugment op ``name`` with value ``v`` on uint8 [H, W, 3], written from the definitions."""
    if name == "identity":
        return x
    if name == "autocontrast":
        lo, hi = x.min((0, 1)), x.max((0, 1))
        scale = 255.0 / np.maximum(hi - lo, 1)
        out = np.clip((x * scale - lo * scale).astype(np.int64), 0, 255)
        return np.where(hi > lo, out, x)
    if name == "equalize":
        out = np.empty_like(x)
        for c in range(3):
            h = np.bincount(x[..., c].ravel(), minlength=256)
            nz = h[h > 0]
            step = (nz.sum() - nz[-1]) // 255 if len(nz) > 1 else 0
            lut = (step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step if step else np.arange(256)
            out[..., c] = _lut(x[..., c], np.clip(lut, 0, 255))
        return out
    if name == "solarize":
        return np.where(x < int(v), x, 255 - x)
    if name == "posterize":
        return x & ~np.uint8(2 ** (8 - int(v)) - 1)
    if name == "brightness":
        return _blend(np.zeros_like(x), x, v)
    if name == "color":
        return _blend(np.repeat(_luma(x)[..., None], 3, -1), x, v)
    if name == "contrast":
        return _blend(np.full_like(x, int(_luma(x).mean() + 0.5)), x, v)
    if name == "sharpness":
        k = np.ones((3, 3)) / 13.0
        k[1, 1] = 5 / 13.0
        smooth = x.astype(np.float64).copy()
        inner = sum(k[i, j] * x[i : i + x.shape[0] - 2, j : j + x.shape[1] - 2] for i in range(3) for j in range(3))
        smooth[1:-1, 1:-1] = np.round(inner)
        return _blend(smooth, x, v)
    if name == "rotate":  # counter-clockwise by v degrees about the centre; the inverse map sends out -> in
        t, (cy, cx) = math.radians(v), (x.shape[0] / 2, x.shape[1] / 2)
        return _nearest_affine(x, math.cos(t), -math.sin(t), cx - math.cos(t) * cx + math.sin(t) * cy,
                               math.sin(t), math.cos(t), cy - math.sin(t) * cx - math.cos(t) * cy, fill)
    return _nearest_affine(x, *{"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
                                "translate_x": (1, 0, v, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v)}[name], fill)


@pytest.mark.parametrize("name", randaugment.OPS)
@pytest.mark.parametrize("negate", [False, True])
def test_each_randaugment_op_matches_numpy(name, negate):
    x = np.clip(np.random.default_rng(7).normal(120, 50, (17, 23, 3)), 10, 240).astype(np.uint8)
    value = randaugment.op_value(name, 13, negate, 17, 23)
    pil = np.asarray(randaugment.apply_op(Image.fromarray(x), name, value, 128)).astype(np.int64)
    want = numpy_op(x, name, value, 128).astype(np.int64)
    tol = 1 if name in ("brightness", "color", "contrast", "sharpness") else 0  # float rounding of the blend
    off = np.abs(pil - want).max(-1) > tol
    # rotate: a pixel whose source lands within float error of the image's edge may go either way
    assert off.sum() <= (2 if name == "rotate" else 0), (name, value, np.argwhere(off))
    if name not in ("identity",):
        assert (pil != x).any(), name  # the op did something at this magnitude


def test_randaugment_op_runs_each_examples_drawn_plan():
    images = _images(16, 12, 14, 3, seed=2)
    rng = StreamRng(9, np.arange(16))
    index, negate = randaugment.draw_randaugment(copy.deepcopy(rng), np.array([[12, 14]] * 16), num_ops=2,
                                                 magnitude=9, in_max=255.0, fill=128)
    got = build_preprocess([{"op": "randaugment"}]).on_batch(_batch(images), rng)["image"]
    assert index.shape == (16, 2) and len({tuple(r) for r in index}) > 8
    for b in range(16):
        x = images[b].astype(np.uint8)
        for name, value in randaugment.plan(index[b], negate[b], 9, 12, 14):
            x = numpy_op(x, name, value, 128).astype(np.uint8)
        assert np.abs(got[b] - x).max() <= 2, randaugment.plan(index[b], negate[b], 9, 12, 14)
    gray = build_preprocess([{"op": "rescale", "in_max": 255}, {"op": "randaugment", "in_max": 1.0}]).on_batch(
        _batch(images[..., :1]), StreamRng(9, np.arange(16)))["image"]
    assert gray.shape == (16, 12, 14, 1) and 0 <= gray.min() and gray.max() <= 1.0


# --- errors, determinism, resume ------------------------------------------------------------------

@pytest.mark.parametrize("op, match", [
    ({"op": "inception_crop"}, r"\(op 'inception_crop'\): missing kwargs \['size'\]"),
    ({"op": "inception_crop", "size": 8, "area": [0.5, 1.5]}, r"\(op 'inception_crop'\): area must be \[lo, hi\]"),
    ({"op": "inception_crop", "size": 8, "aspect": 2}, r"\(op 'inception_crop'\): aspect must be \[lo, hi\]"),
    ({"op": "random_erasing", "p": 2}, r"\(op 'random_erasing'\): p must be in \[0, 1\]"),
    ({"op": "random_erasing", "value": "noise"}, r"\(op 'random_erasing'\): value must be a number"),
    ({"op": "color_jitter", "hue": 0.7}, r"\(op 'color_jitter'\): hue must be in \[0.0, 0.5\]"),
    ({"op": "color_jitter", "gamma": 1}, r"\(op 'color_jitter'\): unexpected kwargs \['gamma'\]"),
    ({"op": "randaugment", "magnitude": 31}, r"\(op 'randaugment'\): magnitude must be in \[0.0, 30\]"),
    ({"op": "randaugment", "num_ops": 1.5}, r"\(op 'randaugment'\): num_ops must be an int >= 0"),
    ({"op": "randaugment", "fill": 300}, r"\(op 'randaugment'\): fill must be an int in 0..255"),
])
def test_augment_config_errors_name_the_op_and_key(op, match):
    with pytest.raises(ValueError, match=r"cfg\[0\] " + match):
        build_preprocess([op], where="cfg")


@pytest.mark.parametrize("op", [{"op": "randaugment"}, {"op": "color_jitter", "brightness": 0.2}])
def test_pixel_range_other_than_in_max_is_an_error(op):
    """0..255 images into an op told in_max=1 (or normalised ones) would be clipped flat: refused."""
    images = _images(2, 4, 4, 3) if op["op"] == "color_jitter" else _images(2, 4, 4, 3) - 128
    with pytest.raises(ValueError, match=rf"\(op '{op['op']}'\): pixel values .* leave \[0, in_max=.*set in_max"):
        build_preprocess([op]).on_batch(_batch(images), np.random.default_rng(0))


def test_randaugment_refuses_other_channel_counts():
    pp = build_preprocess([{"op": "randaugment"}])
    with pytest.raises(ValueError, match=r"config.data.pp\[0\] \(op 'randaugment'\): needs 1 or 3 channels, got 2"):
        pp.on_batch(_batch(np.zeros((1, 4, 4, 2), np.float32)), np.random.default_rng(0))


RECIPE = [{"op": "inception_crop", "size": 10, "area": [0.3, 1.0]}, {"op": "randaugment", "num_ops": 2},
          {"op": "flip_lr"}, {"op": "rescale", "in_max": 255}, {"op": "color_jitter", "brightness": 0.3},
          {"op": "random_erasing", "p": 0.5}]


def test_recipe_is_deterministic_keyed_by_position_and_resumes_exactly():
    n = 24
    source = ArraySource({"image": _images(n, 14, 16, 3, seed=5), "label": np.arange(n) % 10})
    pp = build_preprocess(RECIPE)
    ds = train_chain(source, pp, batch_size=8, seed=3)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]  # crosses the epoch boundary (24 rows)
    again = iter(train_chain(source, pp, batch_size=8, seed=3).to_iter_dataset(grain.ReadOptions(num_threads=0)))
    again.set_state(state)
    for x, y in zip(rest, [next(again) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    fresh = train_chain(source, pp, batch_size=8, seed=3)
    for k, b in enumerate(first + rest):  # same seed, same batches
        np.testing.assert_array_equal(fresh[k]["image"], b["image"])
    halves = train_chain(source, pp, batch_size=4, seed=3)  # keyed by position, not by batch size
    np.testing.assert_array_equal(np.concatenate([halves[2]["image"], halves[3]["image"]]), first[1]["image"])
    assert not np.array_equal(train_chain(source, pp, batch_size=8, seed=4)[0]["image"], first[0]["image"])
    assert first[0]["image"].shape == (8, 10, 10, 3)


def test_images_of_different_sizes_come_out_one_size():
    """Image folders: each image its own size; inception_crop draws each box from its own (H, W)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3)).astype(np.float32) for h, w in [(20, 30), (41, 17), (9, 9)]]
    pp = build_preprocess([{"op": "randaugment"}, {"op": "inception_crop", "size": 8}, {"op": "random_erasing", "p": 1}])
    got = pp.on_batch({"image": images, "label": np.zeros(3, np.int32)}, StreamRng(1, np.arange(3)))["image"]
    assert got.shape == (3, 8, 8, 3)
    draws = StreamRng(1, np.arange(3))
    randaugment.draw_randaugment(draws, np.array([[20, 30], [41, 17], [9, 9]]), num_ops=2, magnitude=9,
                                 in_max=255.0, fill=128)
    top, left, h, w = augment.draw_inception_crop(draws, np.array([[20, 30], [41, 17], [9, 9]]), size=(8, 8),
                                                  area=(0.05, 1.0), aspect=(0.75, 4 / 3))
    assert (top + h <= [20, 41, 9]).all() and (left + w <= [30, 17, 9]).all() and h[1] > 9  # its own size
