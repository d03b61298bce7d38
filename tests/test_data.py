"""Tests for tl_jax.data: builders, sources, shots, preprocessing, pipelines."""

import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tl_jax.data import (
    EMBEDDED,
    DataSplit,
    build_preprocess,
    eval_batches,
    load_split,
    num_eval_batches,
    sample_shots,
    train_dataset,
)
from tl_jax.data.sources import ExampleSource

SIZES = {"mnist5k": {"train": 4000, "test": 1000}, "optdigits": {"train": 1347, "test": 450}}
MAX_VALUE = {"mnist5k": 255, "optdigits": 16}
SHAPE = {"mnist5k": (28, 28, 1), "optdigits": (8, 8, 1)}


def _read_all(split: DataSplit) -> tuple[np.ndarray, np.ndarray]:
    ex = [split.source[i] for i in range(len(split))]
    return np.stack([e["image"] for e in ex]), np.array([e["label"] for e in ex])


@pytest.fixture(scope="module")
def embedded(tfds_data_dir):
    """{name: {split: (images, labels)}} read from the session data_dir."""
    out = {}
    for name in EMBEDDED:
        out[name] = {s: _read_all(load_split(name, s, tfds_data_dir)) for s in ("train", "test")}
    return out


def _toy_split(n: int, shape=(4, 4, 1)) -> DataSplit:
    """Example i has label i and every pixel == i % 256 (identifies examples)."""
    src = [{"image": np.full(shape, i % 256, np.uint8), "label": i} for i in range(n)]
    return DataSplit("toy", "train", src, num_classes=n, image_shape=shape)


# --- builders and sources -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_builders_content(name, embedded, tfds_data_dir):
    for split, n in SIZES[name].items():
        images, labels = embedded[name][split]
        assert images.shape == (n, *SHAPE[name]) and images.dtype == np.uint8
        assert labels.shape == (n,)
        assert set(labels.tolist()) == set(range(10))
        ds = load_split(name, split, tfds_data_dir)
        assert (ds.num_classes, ds.image_shape, len(ds)) == (10, SHAPE[name], n)
        np.testing.assert_array_equal(ds.labels(), labels)
        assert ds.labels().dtype == np.int64 and ds.labels() is ds.labels()
    all_images = np.concatenate([embedded[name][s][0] for s in ("train", "test")])
    assert all_images.max() == MAX_VALUE[name] and all_images.min() == 0
    # stratified split: class proportions match in train and test
    train_counts = np.bincount(embedded[name]["train"][1], minlength=10)
    test_counts = np.bincount(embedded[name]["test"][1], minlength=10)
    ratio = SIZES[name]["train"] / SIZES[name]["test"]
    np.testing.assert_allclose(train_counts / test_counts, ratio, atol=0.1)


def test_mnist5k_balanced_and_shuffled(embedded):
    train_labels = embedded["mnist5k"]["train"][1]
    assert np.bincount(train_labels).tolist() == [400] * 10
    assert np.bincount(embedded["mnist5k"]["test"][1]).tolist() == [100] * 10
    assert not np.all(np.diff(train_labels) >= 0)  # not class-sorted any more


def test_optdigits_is_exactly_sklearn_digits(embedded):
    from sklearn.datasets import load_digits

    digits = load_digits()
    ours = np.concatenate([embedded["optdigits"][s][0] for s in ("train", "test")])
    ours_labels = np.concatenate([embedded["optdigits"][s][1] for s in ("train", "test")])
    rows = np.concatenate([ours.reshape(len(ours), -1), ours_labels[:, None]], axis=1)
    ref = np.concatenate([digits.data, digits.target[:, None]], axis=1).astype(np.int64)
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(ref, axis=0))
    assert len(rows) == 1797


@pytest.mark.slow  # end to end (training runs / processes): not in make test-fast
def test_preparation_is_deterministic_and_concurrency_safe(tmp_path, embedded):
    """Two processes prepare optdigits into one fresh data_dir at once; mnist5k is
    prepared again in-process. Both equal the session data bit for bit."""
    code = (
        "import sys; from tl_jax.data import load_split\n"
        "load_split('optdigits', 'test', sys.argv[1])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    for name in EMBEDDED:
        for split in ("train", "test"):
            images, labels = _read_all(load_split(name, split, str(tmp_path)))
            np.testing.assert_array_equal(images, embedded[name][split][0])
            np.testing.assert_array_equal(labels, embedded[name][split][1])


def test_split_slicing_and_errors(tfds_data_dir, tmp_path):
    head = load_split("optdigits", "test[:10]", tfds_data_dir)
    full = load_split("optdigits", "test", tfds_data_dir)
    assert len(head) == 10
    np.testing.assert_array_equal(head.labels(), full.labels()[:10])
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        load_split("optdigits", "validation", tfds_data_dir)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
        load_split("no_such_dataset_xyz", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"'mnist' is not prepared in .*tfds build mnist"):
        load_split("mnist", "train", str(tmp_path / "empty"))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_catalogue_path_with_mock_data(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        ds = load_split(name, "train", str(tmp_path))
        assert (len(ds), ds.num_classes, ds.image_shape) == (6, 10, shape)
        ex = ds.source[5]
        assert set(ex) == {"image", "label"} and isinstance(ex["label"], int)
        assert ex["image"].shape == shape and ex["image"].dtype == np.uint8
        labels = ds.labels()
        assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 10
        with pytest.raises(IndexError):
            ds.source[6]


def test_example_source_adds_channel_axis():
    src = ExampleSource([{"image": np.zeros((5, 7), np.uint8), "label": np.array(3), "id": "x"}])
    assert src[0]["image"].shape == (5, 7, 1) and src[0]["label"] == 3
    assert set(src[0]) == {"image", "label"} and type(src[0]["label"]) is int


# --- shots -------------------------------------------------------------------


def test_sample_shots_balanced_seeded_nested():
    labels = np.repeat(np.arange(4), [5, 9, 6, 7])
    a = sample_shots(labels, 3, seed=0)
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(a, sample_shots(labels, 3, seed=0))
    assert not np.array_equal(a, sample_shots(labels, 3, seed=1))
    assert set(a) <= set(sample_shots(labels, 4, seed=0))  # nested in shots
    assert len(sample_shots(labels, 5, seed=0)) == 20  # all of the smallest class


def test_sample_shots_errors():
    labels = np.array([0, 0, 0, 1, 1, 3, 3, 3])
    with pytest.raises(ValueError, match=r"shots=3 but class 1 has only 2 examples in d:train"):
        sample_shots(labels, 3, seed=0, name="d:train")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="shots must be an int >= 1"):
            sample_shots(labels, bad, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        sample_shots(labels.astype(float), 1, seed=0)


# --- preprocess ---------------------------------------------------------------


def _pp(ops, image, rng=None):
    out = build_preprocess(ops)({"image": image, "label": 7}, rng)
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    assert out["label"] == 7
    return out["image"]


def test_rescale_normalize_identity():
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_allclose(_pp([], img), img.astype(np.float32))
    np.testing.assert_allclose(_pp([{"op": "rescale", "in_max": 16}], img), img / 16.0)
    got = _pp([{"op": "normalize", "mean": 0.5, "std": 2.0}], img)
    np.testing.assert_allclose(got, (img - 0.5) / 2.0, rtol=1e-6)
    got = _pp([{"op": "normalize", "mean": [1, 2, 3], "std": [1, 2, 4]}], img)
    np.testing.assert_allclose(got, (img - np.array([1, 2, 3])) / np.array([1, 2, 4]), rtol=1e-6)
    assert _pp([], np.zeros((3, 5), np.uint8)).shape == (3, 5, 1)


def test_resize_bilinear():
    img = np.array([[0, 1], [0, 1]], np.float32)[..., None]
    got = _pp([{"op": "resize", "size": [2, 4]}], img)
    np.testing.assert_allclose(got[..., 0], [[0, 0.25, 0.75, 1]] * 2, atol=1e-6)  # half-pixel
    const = np.full((8, 8, 3), 5, np.uint8)
    np.testing.assert_allclose(_pp([{"op": "resize", "size": 20}], const), 5.0, atol=1e-5)
    rand = np.random.default_rng(0).random((6, 6, 2)).astype(np.float32)
    np.testing.assert_array_equal(_pp([{"op": "resize", "size": 6}], rand), rand)


def test_pad_and_center_crop():
    img = np.arange(1, 7, dtype=np.uint8).reshape(2, 3, 1)
    got = _pp([{"op": "pad", "size": 6}], img)
    expect = np.zeros((6, 6, 1), np.float32)
    expect[2:4, 1:4] = img  # top (6-2)//2 = 2, left (6-3)//2 = 1
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(_pp([{"op": "center_crop", "size": [2, 3]}], expect), img)
    with pytest.raises(ValueError, match=r"config.data.pp\[0\] \(op 'pad'\).*larger"):
        _pp([{"op": "pad", "size": 2}], np.zeros((3, 3, 1)))


def test_random_crop_and_flip():
    img = np.random.default_rng(0).integers(0, 255, (6, 6, 1)).astype(np.uint8)
    ops = [{"op": "random_crop", "size": 6, "pad": 2}]
    crops = [_pp(ops, img, np.random.default_rng(s)) for s in range(8)]
    np.testing.assert_array_equal(crops[0], _pp(ops, img, np.random.default_rng(0)))
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0))).astype(np.float32)
    rng = np.random.default_rng(3)
    top, left = rng.integers(0, 5), rng.integers(0, 5)  # same draws as the op
    np.testing.assert_array_equal(crops[3], padded[top : top + 6, left : left + 6])
    assert len({c.tobytes() for c in crops}) > 1
    np.testing.assert_array_equal(
        _pp([{"op": "flip_lr", "p": 1.0}], img, np.random.default_rng()), img[:, ::-1]
    )
    np.testing.assert_array_equal(
        _pp([{"op": "flip_lr", "p": 0.0}], img, np.random.default_rng()), img
    )
    pp = build_preprocess([{"op": "flip_lr"}])
    assert pp.is_random and not build_preprocess([{"op": "pad", "size": 9}]).is_random
    with pytest.raises(ValueError, match="pass an rng"):
        pp({"image": img, "label": 0})


def test_channel_ops_and_output_shape():
    gray = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    rgb = _pp([{"op": "to_rgb"}], gray)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(_pp([{"op": "to_gray"}], rgb * np.array([1, 2, 3])), gray * 2.0)
    np.testing.assert_array_equal(_pp([{"op": "to_gray"}], gray), gray)  # already 1 channel
    pp = build_preprocess(
        [{"op": "resize", "size": 20}, {"op": "pad", "size": 28}, {"op": "to_rgb"}]
    )
    assert pp.output_shape((8, 8, 1)) == (28, 28, 3)


@pytest.mark.parametrize(
    "ops,match",
    [
        ([{"op": "blur"}], r"cfg\[0\]: unknown op 'blur'; known ops: \[.*'center_crop'"),
        ([{"op": "pad"}], r"cfg\[0\] \(op 'pad'\): missing kwargs \['size'\]"),
        (
            [{"op": "to_rgb"}, {"op": "flip_lr", "q": 1}],
            r"cfg\[1\] \(op 'flip_lr'\): unexpected kwargs \['q'\]; accepted kwargs: \['p'\]",
        ),
        ([{"op": "rescale", "in_max": 0}], r"cfg\[0\] \(op 'rescale'\): in_max must be > 0"),
        ([{"op": "resize", "size": [1, 2, 3]}], r"cfg\[0\].*size must be an int or \[h, w\]"),
        ([{"size": 3}], r"cfg\[0\] must be a dict with an 'op' key"),
        ({"op": "pad"}, r"cfg must be a list of op dicts"),
    ],
)
def test_preprocess_config_errors(ops, match):
    with pytest.raises(ValueError, match=match):
        build_preprocess(ops, where="cfg")


# --- pipelines ------------------------------------------------------------------


def _take(it, k):
    return [next(it) for _ in range(k)]


def _iter(ds):
    """Unthreaded iterator: grain's default prefetch (16 threads, 500 batches) is
    wasted work in tests that look at a few batches."""
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def test_train_dataset_epochs_and_seeds():
    split = _toy_split(40)
    pp = build_preprocess([])
    batches = _take(_iter(train_dataset(split, pp, batch_size=8, seed=0)), 10)
    b = batches[0]
    assert b["image"].shape == (8, 4, 4, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
    epoch1 = np.concatenate([x["label"] for x in batches[:5]])
    epoch2 = np.concatenate([x["label"] for x in batches[5:]])
    assert sorted(epoch1) == list(range(40)) and sorted(epoch2) == list(range(40))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled every epoch
    assert not np.array_equal(epoch1, np.arange(40))
    again = _take(_iter(train_dataset(split, pp, batch_size=8, seed=0)), 10)
    other = _take(_iter(train_dataset(split, pp, batch_size=8, seed=1)), 5)
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(epoch1, np.concatenate([x["label"] for x in other]))


def test_train_dataset_small_shard_indices_and_processes():
    split = _toy_split(100)
    pp = build_preprocess([])
    idx = np.arange(0, 40, 2)  # 20 chosen examples, 10 per process
    seen = []
    for p in range(2):
        ds = train_dataset(
            split, pp, batch_size=32, seed=0, indices=idx, process_index=p, process_count=2
        )
        labels = next(_iter(ds))["label"]
        assert labels.shape == (32,)
        mine = idx[p::2]
        assert set(labels) == set(mine)
        for e in range(3):  # 3 full epochs of 10 then 2 of the 4th
            assert sorted(labels[10 * e : 10 * (e + 1)]) == sorted(mine)
        seen.extend(mine)
    assert sorted(seen) == sorted(idx)
    with pytest.raises(ValueError, match="out of range"):
        train_dataset(split, pp, batch_size=4, seed=0, indices=np.array([100]))
    with pytest.raises(ValueError, match="process_index"):
        train_dataset(split, pp, batch_size=4, seed=0, process_index=2, process_count=2)


def test_train_iterator_state_resumes_exactly(tfds_data_dir):
    split = load_split("mnist5k", "train", tfds_data_dir)
    idx = sample_shots(split.labels(), 5, seed=0, name="mnist5k:train")
    pp = build_preprocess(
        [
            {"op": "rescale", "in_max": 255},
            {"op": "random_crop", "size": 28, "pad": 4},
            {"op": "flip_lr"},
        ]
    )
    ds = train_dataset(split, pp, batch_size=16, seed=3, indices=idx)
    it = iter(ds)
    first = _take(it, 2)
    state = it.get_state()
    rest = _take(it, 3)
    it2 = iter(train_dataset(split, pp, batch_size=16, seed=3, indices=idx))
    it2.set_state(state)
    for x, y in zip(rest, _take(it2, 3), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(first[0]["image"], rest[0]["image"])
    assert set(np.concatenate([b["label"] for b in first + rest])) <= set(range(10))


def test_eval_batches_exact_and_padded():
    split = _toy_split(23)
    pp = build_preprocess([{"op": "rescale", "in_max": 1}])
    batches = list(eval_batches(split, pp, batch_size=5))
    assert len(batches) == num_eval_batches(23, 5) == 5
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [1, 1, 1, 0, 0])
    assert last["mask"].dtype == np.float32 and not last["image"][3:].any()
    keep = np.concatenate([b["mask"] for b in batches]) == 1
    labels = np.concatenate([b["label"] for b in batches])[keep]
    images = np.concatenate([b["image"] for b in batches])[keep]
    np.testing.assert_array_equal(labels, np.arange(23))
    np.testing.assert_array_equal(images, np.stack([split.source[i]["image"] for i in range(23)]))


@pytest.mark.parametrize("n,batch", [(23, 4), (3, 8), (1, 2)])
def test_eval_batches_two_processes(n, batch):
    split = _toy_split(n)
    pp = build_preprocess([])
    seen = []
    counts = []
    for p in range(2):
        bs = list(eval_batches(split, pp, batch_size=batch, process_index=p, process_count=2))
        counts.append(len(bs))
        for b in bs:
            assert b["image"].shape == (batch, 4, 4, 1)
            seen.extend(b["label"][b["mask"] == 1].tolist())
    assert counts[0] == counts[1] == num_eval_batches(n, batch, 2)
    assert sorted(seen) == list(range(n))


def test_eval_batches_real_split_and_random_pp_error(tfds_data_dir):
    split = load_split("optdigits", "test", tfds_data_dir)
    pp = build_preprocess([{"op": "rescale", "in_max": 16}])
    batches = list(eval_batches(split, pp, batch_size=128))
    assert len(batches) == 4 and batches[-1]["mask"].sum() == 450 - 3 * 128
    keep = np.concatenate([b["mask"] for b in batches]) == 1
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches])[keep], split.labels()
    )
    assert np.concatenate([b["image"] for b in batches])[keep].max() == 1.0
    with pytest.raises(ValueError, match=r"config.data.pp_eval is used for eval.*random ops"):
        eval_batches(
            split, build_preprocess([{"op": "flip_lr"}], where="config.data.pp_eval"), batch_size=8
        )
