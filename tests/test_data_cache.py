"""config.data.cache: identical batches to the uncached pipeline, exact resume, memory bound, shuffle."""
import grain
import numpy as np
import pytest

from tl_jax.data import build_preprocess, load_split, sample_shots, train_dataset
from tl_jax.data import cache as data_cache
from tl_jax.data.shuffle import EpochShuffle

RANDOM_PP = [{"op": "rescale", "in_max": 255}, {"op": "resize", "size": 20},
             {"op": "random_crop", "size": 18, "pad": 2}, {"op": "flip_lr"},
             {"op": "normalize", "mean": 0.13, "std": 0.31}]
DETERMINISTIC_PP = [{"op": "rescale", "in_max": 255}, {"op": "resize", "size": 20}, {"op": "pad", "size": 28}]


def _iter(ds):
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("ops", [RANDOM_PP, DETERMINISTIC_PP], ids=["random_suffix", "deterministic"])
def test_cached_batches_equal_uncached_and_resume_across(tfds_data_dir, ops):
    split = load_split("mnist5k", "train", tfds_data_dir)
    idx = sample_shots(split.labels(), 3, seed=0, name="mnist5k:train")  # 30 examples: many epochs
    pp = build_preprocess(ops)

    def make(cache):
        return train_dataset(split, pp, batch_size=8, seed=4, indices=idx, cache=cache)

    plain_it, cached_it = _iter(make(False)), _iter(make(True))
    plain, cached = _take(plain_it, 9), _take(cached_it, 9)
    _assert_same(plain, cached)
    # A state saved by either pipeline resumes the other on the exact next batch.
    state = plain_it.get_state()
    assert cached_it.get_state() == state
    expected = _take(plain_it, 4)
    for resumed in (_iter(make(True)), iter(make(True))):  # also grain's default threaded iterator
        resumed.set_state(state)
        _assert_same(_take(resumed, 4), expected)


def test_prefix_suffix_split():
    pp = build_preprocess(RANDOM_PP)
    prefix, suffix = data_cache.split_preprocess(pp)
    assert prefix.op_names == ("rescale", "resize") and not prefix.is_random
    assert suffix.op_names == ("random_crop", "flip_lr", "normalize") and suffix.is_random
    example = {"image": np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "label": 3}
    whole = pp(example, np.random.default_rng(7))
    parts = suffix(prefix(example), np.random.default_rng(7))
    np.testing.assert_array_equal(whole["image"], parts["image"])
    only_random = data_cache.split_preprocess(build_preprocess([{"op": "flip_lr"}]))
    assert only_random[0].op_names == () and only_random[1].op_names == ("flip_lr",)


def test_memory_limit_auto_falls_back_and_true_raises(tfds_data_dir):
    split = load_split("mnist5k", "train", tfds_data_dir)
    idx = np.arange(40)
    pp = build_preprocess(DETERMINISTIC_PP)
    tiny_mb = 0.01  # 10 KiB < 40 x 28 x 28 x 4 B
    ds = train_dataset(split, pp, batch_size=8, seed=0, indices=idx, cache="auto", cache_max_mb=tiny_mb)
    _assert_same(_take(_iter(ds), 3), _take(_iter(train_dataset(split, pp, batch_size=8, seed=0, indices=idx)), 3))
    with pytest.raises(ValueError, match="cache_max_mb"):
        train_dataset(split, pp, batch_size=8, seed=0, indices=idx, cache=True, cache_max_mb=tiny_mb)
    with pytest.raises(ValueError, match="'auto', true or false"):
        train_dataset(split, pp, batch_size=8, seed=0, indices=idx, cache="yes")


def test_cache_refuses_variable_shapes():
    source = [{"image": np.zeros((4 + i % 2, 4, 1), np.uint8), "label": 0} for i in range(6)]
    pp = build_preprocess([])
    assert data_cache.materialize(source, pp, max_bytes=2**20) is None
    with pytest.raises(ValueError, match="same-shape"):
        data_cache.materialize(source, pp, max_bytes=2**20, required=True)


@pytest.mark.parametrize("n", [1, 10, 37])
def test_epoch_shuffle_permutes_every_epoch_deterministically(n):
    ds = EpochShuffle(grain.MapDataset.range(n), seed=3).repeat()
    epochs = [[ds[e * n + i] % n for i in range(n)] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    if n > 5:
        assert len({tuple(e) for e in epochs}) > 1
    again = EpochShuffle(grain.MapDataset.range(n), seed=3).repeat()
    assert [again[k] for k in range(4 * n)] == [ds[k] for k in range(4 * n)]
    other = EpochShuffle(grain.MapDataset.range(n), seed=4).repeat()
    if n > 5:
        assert [other[k] for k in range(n)] != [ds[k] for k in range(n)]
