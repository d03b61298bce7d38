"""What a process keeps across the runs it trains (the points of a sweep task): split labels, eval batches and
the source checkpoint's variables, each keyed by its files' identity, so rewritten files are read again and
callers never share what is kept with each other; and the feature cache's programs, shared by equal models."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tl_jax.data import build_preprocess, eval_batches, load_split, pipeline, sources
from tl_jax.train import checkpoint as ckpt_lib

PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 12}]


class _NoReads:
    """A tfds source that must not be read (its array_record reader stays reachable for the key)."""

    def __init__(self, source):
        self.data_source = source.data_source

    def __len__(self):
        return len(self.data_source)

    def __getitem__(self, i):
        raise AssertionError("read again")


def _no_reads(split):
    split.source._source = _NoReads(split.source._source)
    return split


def _touch(split):
    """Give the split's files a new mtime (what `tl-jax data prepare` rewriting them does, and more)."""
    for r in split.source._source.data_source._read_instructions:
        st = os.stat(r.filename)
        os.utime(r.filename, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_split_labels_are_read_once_per_process_until_the_files_change(tfds_data_dir):
    sources._LABELS.clear()
    first = load_split("optdigits", "train", tfds_data_dir).labels()
    again = _no_reads(load_split("optdigits", "train", tfds_data_dir))
    assert again.labels() is first and not first.flags.writeable
    head = load_split("optdigits", "train[:10]", tfds_data_dir).labels()  # other records: their own entry
    assert np.array_equal(head, first[:10]) and len(sources._LABELS) == 2
    split = load_split("optdigits", "train", tfds_data_dir)
    _touch(split)
    with pytest.raises(AssertionError, match="read again"):
        _no_reads(load_split("optdigits", "train", tfds_data_dir)).labels()
    assert np.array_equal(load_split("optdigits", "train", tfds_data_dir).labels(), first)


def test_mock_data_is_never_kept(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        split = load_split("mnist", "train", str(tmp_path))
        assert split.source._files_key() is None
        split.labels()
        list(eval_batches(split, build_preprocess([]), batch_size=4))
    assert not any(k for k in pipeline._EVAL_KEPT if "mnist/" in str(k))


def test_eval_batches_are_kept_read_only_and_equal(tfds_data_dir):
    pipeline._EVAL_KEPT.clear()
    split, pp = load_split("optdigits", "test", tfds_data_dir), build_preprocess(PP)
    first = list(eval_batches(split, pp, batch_size=128))
    assert len(pipeline._EVAL_KEPT) == 1 and all(not a.flags.writeable for b in first for a in b.values())
    again = list(eval_batches(_no_reads(load_split("optdigits", "test", tfds_data_dir)), pp, batch_size=128))
    assert [sorted(b) for b in again] == [sorted(b) for b in first]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(first, again) for k in x)
    again[0]["extra"] = 1  # each caller gets its own dicts
    assert "extra" not in next(eval_batches(split, pp, batch_size=128))
    other = list(eval_batches(split, build_preprocess(PP[:1]), batch_size=128))  # other ops: made again
    assert other[0]["image"].shape[1:3] == (8, 8) and len(pipeline._EVAL_KEPT) == 2
    list(eval_batches(split, pp, batch_size=100))  # another batch size: another entry
    assert len(pipeline._EVAL_KEPT) == 3


def test_eval_batches_over_the_budget_are_not_kept(tfds_data_dir, monkeypatch):
    pipeline._EVAL_KEPT.clear()
    monkeypatch.setattr(pipeline, "EVAL_KEEP_BYTES", 1000)
    split = load_split("optdigits", "test", tfds_data_dir)
    assert len(list(eval_batches(split, build_preprocess(PP), batch_size=128))) == 4
    assert not pipeline._EVAL_KEPT


def test_source_variables_are_restored_once_and_copied_to_each_caller(tmp_path):
    from tl_jax.train.checkpoint import Checkpoints

    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints", async_save=False)
    ckpts.save(1, {"step": np.int32(1), "params": params, "batch_stats": {}}, {"iterator": {}})
    ckpts.close()
    ckpt_lib._LAST_LOADED.clear()
    a = ckpt_lib.load_variables(str(tmp_path / "run"))
    assert ckpt_lib._LAST_LOADED  # kept
    kept = ckpt_lib._LAST_LOADED["variables"]
    ckpt_lib._LAST_LOADED["variables"] = jax.tree.map(lambda x: x + 1, kept)  # a hit returns the kept arrays
    b = ckpt_lib.load_variables(str(tmp_path / "run"))
    assert np.array_equal(b["params"]["dense"]["kernel"], params["dense"]["kernel"] + 1)
    b["params"]["dense"]["kernel"][0, 0] = 99  # a caller's copy: the kept arrays stay as they were
    assert ckpt_lib._LAST_LOADED["variables"]["params"]["dense"]["kernel"][0, 0] == 1
    assert np.array_equal(a["params"]["dense"]["kernel"], params["dense"]["kernel"])
    state = tmp_path / "run" / "checkpoints" / "1" / "state"
    f = next(p for p in sorted(state.rglob("*")) if p.is_file())
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # rewritten: restored again
    c = ckpt_lib.load_variables(str(tmp_path / "run"))
    assert np.array_equal(c["params"]["dense"]["kernel"], params["dense"]["kernel"])


def test_feature_cache_programs_are_shared_by_equal_models():
    from tl_jax.models import get_model
    from tl_jax.train import feature_cache

    x, rng = np.zeros((2, 28, 28, 1), np.float32), jax.random.PRNGKey(0)
    first = get_model("cnn", 10)
    variables = first.init(rng, x)
    embed, embed_train = feature_cache._embed_fns(first)
    ref = np.asarray(embed(variables, x, rng))
    size = feature_cache._embed_static._cache_size()
    embed2, _ = feature_cache._embed_fns(get_model("cnn", 10))  # another run's equal model: no new program
    assert np.array_equal(np.asarray(embed2(variables, x, rng)), ref)
    assert feature_cache._embed_static._cache_size() == size
    feature_cache._embed_fns(get_model("cnn", 10, width=2))[0](get_model("cnn", 10, width=2).init(rng, x), x, rng)
    assert feature_cache._embed_static._cache_size() == size + 1
    assert np.array_equal(np.asarray(embed_train(variables, x, rng)), ref)  # no dropout, no BatchNorm
