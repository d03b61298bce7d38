"""Random ops over whole batches: a numpy reference, single examples, mixed sizes, the training chain."""
import copy

import grain
import numpy as np
import pytest

from tl_jax.data import build_preprocess, train_dataset
from tl_jax.data.shuffle import train_chain
from tl_jax.data.cache import ArraySource

OPS = [{"op": "random_crop", "size": [5, 6], "pad": 2}, {"op": "flip_lr", "p": 0.5},
       {"op": "normalize", "mean": [0.5, 1.0], "std": [2.0, 4.0]}]


def reference(images, rng):
    """The ops of OPS written out per example, with the draws taken per batch in list order."""
    b, h, w, _ = images.shape
    top, left = rng.integers(0, np.full(b, h + 4 - 5 + 1)), rng.integers(0, np.full(b, w + 4 - 6 + 1))
    flip = rng.random(b) < 0.5
    out = []
    for i in range(b):
        x = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))[top[i] : top[i] + 5, left[i] : left[i] + 6]
        x = x[:, ::-1] if flip[i] else x
        out.append((x - np.array([0.5, 1.0])) / np.array([2.0, 4.0]))
    return np.stack(out).astype(np.float32)


def test_on_batch_matches_per_example_numpy_reference():
    images = np.random.default_rng(0).normal(size=(16, 7, 8, 2)).astype(np.float32)
    rng = np.random.default_rng(5)
    want = reference(images, copy.deepcopy(rng))
    got = build_preprocess(OPS).on_batch({"image": images, "label": np.arange(16, dtype=np.int32)}, rng)
    np.testing.assert_allclose(got["image"], want, rtol=1e-6)
    np.testing.assert_array_equal(got["label"], np.arange(16))
    assert got["image"].dtype == np.float32 and got["image"].flags.c_contiguous


def test_one_example_is_a_batch_of_one():
    pp = build_preprocess(OPS)
    image = np.random.default_rng(1).normal(size=(7, 8, 2)).astype(np.float32)
    one = pp({"image": image, "label": 3}, np.random.default_rng(9))
    batch = pp.on_batch({"image": image[None], "label": np.array([3], np.int32)}, np.random.default_rng(9))
    np.testing.assert_array_equal(one["image"], batch["image"][0])
    assert one["label"] == 3 and one["label"].dtype == np.int32


def test_images_of_different_sizes_until_they_match():
    pp = build_preprocess([{"op": "random_crop", "size": 4}, {"op": "flip_lr"}])
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(h, w, 1)).astype(np.float32) for h, w in [(4, 6), (9, 5), (4, 4)]]
    got = pp.on_batch({"image": images, "label": np.zeros(3, np.int32)}, np.random.default_rng(2))["image"]
    draw = np.random.default_rng(2)
    top, left = draw.integers(0, [1, 6, 1]), draw.integers(0, [3, 2, 1])
    flip = draw.random(3) < 0.5
    for i, x in enumerate(images):
        crop = x[top[i] : top[i] + 4, left[i] : left[i] + 4]
        np.testing.assert_array_equal(got[i], crop[:, ::-1] if flip[i] else crop)
    with pytest.raises(ValueError, match=r"differ in shape after ops \['flip_lr'\].*end the chain with a fixed-size"):
        build_preprocess([{"op": "flip_lr"}]).on_batch({"image": images}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"config.data.pp\[0\] \(op 'random_crop'\): crop 4x4 is larger than image 3x9"):
        pp.on_batch({"image": [np.zeros((3, 9, 1), np.float32)]}, np.random.default_rng(0))



def test_training_chain_draws_per_example_by_stream_position_and_seed():
    n = 40
    source = ArraySource({"image": np.ones((n, 6, 6, 1), np.float32), "label": np.arange(n) % 10})
    pp = build_preprocess([{"op": "random_crop", "size": 6, "pad": 2}, {"op": "flip_lr"}])
    ds = train_chain(source, pp, batch_size=16, seed=3)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    batches = [next(it) for _ in range(4)]
    for k, b in enumerate(batches):  # random access (exact resume) agrees with iteration
        np.testing.assert_array_equal(ds[k]["image"], b["image"])
        # Each example draws its own offset: the box of ones of the all-ones image moves.
        boxes = {tuple(np.nonzero(x[..., 0].any(1))[0][[0, -1]]) + tuple(np.nonzero(x[..., 0].any(0))[0][[0, -1]])
                 for x in b["image"]}
        assert len(boxes) > 3, boxes
    # Keyed by stream position: half the batch size gives the same examples with the same crops
    # (what makes data_sharding='batch' the same run for any process count).
    halves = train_chain(source, pp, batch_size=8, seed=3)
    for k in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([halves[2 * k][key], halves[2 * k + 1][key]]),
                                          batches[k][key])
    other = train_chain(source, pp, batch_size=16, seed=4)
    assert not np.array_equal(other[0]["image"], batches[0]["image"])


def test_stream_rng_is_uniform_and_keyed_by_position():
    from tl_jax.data.stream_rng import StreamRng

    positions = np.arange(100_000)
    u = StreamRng(7, positions).random()
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    counts = np.bincount(StreamRng(7, positions).integers(0, 5), minlength=5)
    assert counts.min() > 19_000 and counts.max() < 21_000  # 20,000 expected each, sd ~126
    again = StreamRng(7, positions[5000:5010])
    np.testing.assert_array_equal(again.random(), u[5000:5010])  # a position's value, whatever else is drawn
    second = StreamRng(7, positions[:10])
    second.random()
    assert not np.array_equal(second.random(), u[:10])  # the next call is a new draw
    assert not np.array_equal(StreamRng(8, positions[:10]).random(), u[:10])


def test_uncached_chain_equals_stacked_rows(tfds_data_dir):
    from tl_jax.data import load_split

    split = load_split("mnist5k", "train", tfds_data_dir)
    idx = np.arange(50)
    pp = build_preprocess([{"op": "rescale", "in_max": 255}, *OPS[:2]])
    a = train_dataset(split, pp, batch_size=8, seed=1, indices=idx, cache=False)
    b = train_dataset(split, pp, batch_size=8, seed=1, indices=idx, cache=True)
    for k in (0, 6, 7):  # 7 crosses an epoch boundary (50 rows)
        for key in ("image", "label"):
            np.testing.assert_array_equal(a[k][key], b[k][key])


def test_batches_made_in_chunks_equal_batch_by_batch():
    from tl_jax.data.shuffle import GatherBatches

    rng = np.random.default_rng(0)
    arrays = {"image": rng.normal(size=(37, 6, 6, 1)).astype(np.float32), "label": np.arange(37) % 10}
    suffix = build_preprocess([{"op": "random_crop", "size": 5, "pad": 1}, {"op": "flip_lr"}])
    one = GatherBatches(arrays, batch_size=8, seed=2, suffix=suffix, chunk=1)
    three = GatherBatches(arrays, batch_size=8, seed=2, suffix=suffix, chunk=3)
    assert "chunk=16" in str(GatherBatches(arrays, batch_size=8, seed=2))  # 8 x 144 B rows: capped at 16
    for k in [0, 1, 2, 3, 4, 9, 5, 13, 12]:  # across chunk and epoch (37 rows) boundaries, out of order
        a, b = one[k], three[k]
        for key in ("image", "label"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {k} {key}")
    np.testing.assert_array_equal(one[4]["label"], one.rows(np.arange(32, 40))["label"])


def test_strided_batches_equal_every_step_th_batch():
    """``GatherBatches.strided(p, P)`` (one process of data_sharding='batch') makes only its own blocks, the
    same as every P-th batch of the whole stream, across chunk and epoch boundaries."""
    from tl_jax.data.shuffle import GatherBatches

    rng = np.random.default_rng(1)
    arrays = {"image": rng.normal(size=(29, 6, 6, 1)).astype(np.float32), "label": np.arange(29) % 10}
    suffix = build_preprocess([{"op": "random_crop", "size": 5, "pad": 1}, {"op": "flip_lr"}])
    whole = GatherBatches(arrays, batch_size=4, seed=3, suffix=suffix, chunk=1)
    for p, n in [(0, 2), (1, 2), (2, 3)]:
        part = GatherBatches(arrays, batch_size=4, seed=3, suffix=suffix, chunk=3).strided(p, n)
        assert f"start={p}, step={n}" in str(part)
        for k in [0, 1, 2, 3, 7, 4, 11]:  # across chunks of 3 and epochs of 29 rows, out of order
            for key in ("image", "label"):
                np.testing.assert_array_equal(part[k][key], whole[p + k * n][key], err_msg=f"{p}/{n} {k} {key}")
    seen: list[np.ndarray] = []
    rows = part.rows
    part.rows = lambda positions: (seen.append(positions), rows(positions))[1]
    part[5]  # chunk 1 of process 2/3: its batches 3, 4, 5 = stream batches 11, 14, 17 (rows of 4)
    np.testing.assert_array_equal(seen[0], np.concatenate([np.arange(4 * b, 4 * b + 4) for b in (11, 14, 17)]))
    with pytest.raises(ValueError, match="already strided"):
        part.strided(0, 2)
    with pytest.raises(ValueError, match="0 <= start < step"):
        whole.strided(2, 2)
