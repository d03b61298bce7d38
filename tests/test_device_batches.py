"""config.data.device_cache: batches made in the step from rows on the devices equal the host's, value for value."""
import json
import logging

import grain
import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, device_batches, image_ops, load_split, sample_shots, train_dataset
from tl_jax.data.shuffle import GatherBatches
from tl_jax.data.stream_rng import StreamRng
from tl_jax.parallel import make_strategy
from tl_jax.train import loop
from tl_jax.train.checkpoint import load_variables

# Every device op after the first random op; resize (PIL) runs before it, in the cached prefix.
SUFFIX_PP = [{"op": "rescale", "in_max": 255}, {"op": "resize", "size": 16},
             {"op": "random_crop", "size": 14, "pad": 2}, {"op": "flip_lr", "p": 0.5}, {"op": "pad", "size": 16},
             {"op": "center_crop", "size": 15}, {"op": "rescale", "in_max": 3.0}, {"op": "to_rgb"},
             {"op": "normalize", "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.7, 0.11]}]


def _strategy(**overrides):
    c = config_lib.base_config()
    for k, v in overrides.items():
        config_lib.set_value(c, k, v)
    return make_strategy(c)


@pytest.mark.parametrize("name", sorted(device_batches.DEVICE_OPS))
def test_each_device_op_equals_its_numpy_op_bit_for_bit(name):
    x = np.random.default_rng(0).normal(size=(6, 9, 11, 3)).astype(np.float32) * 40
    params = {"rescale": {"in_max": 255.0}, "pad": {"size": (12, 14)},
              "normalize": {"mean": np.float32([0.13, 0.5, -1.0]), "std": np.float32([0.31, 0.7, 3.0])},
              "center_crop": {"size": (5, 8)}, "random_crop": {"size": (7, 7), "pad": 3},
              "flip_lr": {"p": 0.5}, "to_rgb": {}}[name]
    if name == "to_rgb":
        x = x[..., :1]
    draws = ()
    if name == "random_crop":
        draws = image_ops.draw_crop(StreamRng(1, np.arange(6)), np.full((6, 2), [9, 11]), **params)
    elif name == "flip_lr":
        draws = image_ops.draw_flip(StreamRng(1, np.arange(6)), np.full((6, 2), [9, 11]), **params)
        assert 0 < draws[0].sum() < 6  # both branches taken
    host = getattr(image_ops, name)(x, *draws, **params)
    dev = jax.jit(lambda x, *d: device_batches.DEVICE_OPS[name](x, *d, **params))(
        x, *[np.asarray(d).astype(np.int32) if d.dtype != bool else d for d in draws])
    assert dev.shape == host.shape and dev.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(dev), host)


def _datasets(data_dir, pp, **kw):
    split = load_split("mnist5k", "train", data_dir)
    idx = sample_shots(split.labels(), 5, seed=0, name="mnist5k:train")  # 50 examples: an epoch in 5 batches
    ds = train_dataset(split, build_preprocess(pp), batch_size=10, seed=3, indices=idx, cache=True, **kw)
    return ds, device_batches.maybe_enable("auto", ds, _strategy(), max_mb=256)


def test_recipes_make_the_host_batches_and_share_its_iterator_state(tfds_data_dir):
    ds, dev = _datasets(tfds_data_dir, SUFFIX_PP)
    assert type(ds) is GatherBatches and dev is not None
    assert set(dev.table) == {"image", "label"} and dev.table["label"].dtype == np.int32
    make = jax.jit(lambda t, r: device_batches.make_batch(t, r, dev.recipes.ops))
    for k in [0, 1, 4, 5, 6, 37, 38, 200]:  # chunk and epoch boundaries
        host, recipe = ds[k], dev.recipes[k]
        assert recipe["rows"].dtype == np.int32 and recipe["rows"].shape == (10,)
        made = jax.device_get(make(dev.table, recipe))
        assert made.keys() == host.keys()
        for key in host:
            assert made[key].dtype == host[key].dtype, key
            np.testing.assert_array_equal(made[key], host[key], err_msg=f"batch {k} {key}")
    # The same iterator state: a state saved on either path resumes the other on the exact next batch.
    it_host = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    it_dev = iter(dev.recipes.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    for _ in range(7):
        next(it_host), next(it_dev)
    assert it_host.get_state() == it_dev.get_state()
    resumed = iter(dev.recipes.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    resumed.set_state(it_host.get_state())
    np.testing.assert_array_equal(jax.device_get(make(dev.table, next(resumed)))["image"], next(it_host)["image"])


def test_eligibility_auto_falls_back_with_the_reason_and_true_raises(tfds_data_dir, caplog):
    random_then_resize = [{"op": "rescale", "in_max": 255}, {"op": "flip_lr"}, {"op": "resize", "size": 14}]
    ds, dev = _datasets(tfds_data_dir, random_then_resize)
    assert dev is None
    with pytest.raises(ValueError, match=r"config.data.device_cache=true .*\['resize'\] after the first random op"):
        device_batches.maybe_enable(True, ds, _strategy(), max_mb=256)
    ds, _ = _datasets(tfds_data_dir, SUFFIX_PP)
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        assert device_batches.maybe_enable("auto", ds, _strategy(), max_mb=0.001) is None
    assert "exceeds config.data.device_cache_max_mb" in caplog.text
    assert device_batches.maybe_enable(False, ds, _strategy(), max_mb=256) is None
    with pytest.raises(ValueError, match="config.parallel.mode='pmap'"):
        device_batches.maybe_enable(True, ds, _strategy(**{"parallel.mode": "pmap"}), max_mb=256)
    split = load_split("mnist5k", "train", tfds_data_dir)
    uncached = train_dataset(split, build_preprocess(SUFFIX_PP), batch_size=10, seed=3, cache=False)
    with pytest.raises(ValueError, match="not a cached row table"):
        device_batches.maybe_enable(True, uncached, _strategy(), max_mb=256)


def test_bad_setting_names_the_config_key():
    c = config_lib.base_config()
    c.data.device_cache = "yes"
    with pytest.raises(config_lib.ConfigError, match="config.data.device_cache must be 'auto', true or false"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.data.device_cache_max_mb = 0.0
    with pytest.raises(config_lib.ConfigError, match="config.data.device_cache_max_mb must be > 0"):
        config_lib.validate(c)


@pytest.mark.slow  # end to end (training runs / processes): not in make test-fast
def test_a_run_trains_identically_with_batches_made_on_the_devices(tmp_path, tfds_data_dir):
    """The whole loop, crops and flips made in the step vs on the host: the same params and logs, bit for bit."""
    out = {}
    for mode, prefetch in ((True, 0), (True, 2), (False, 0)):  # prefetch 2: recipes placed by a thread
        c = config_lib.load_config("tests/configs/tiny.py:steps=6")
        c.data.data_dir = tfds_data_dir
        c.data.train_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14},
                           {"op": "random_crop", "size": 14, "pad": 2}, {"op": "flip_lr"},
                           {"op": "normalize", "mean": 0.13, "std": 0.31}]
        c.data.eval_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14},
                          {"op": "normalize", "mean": 0.13, "std": 0.31}]
        c.data.device_cache, c.data.prefetch = mode, prefetch
        run = loop.prepare_run(c, str(tmp_path / f"{mode}{prefetch}"))
        assert (run.device_data is not None) == mode
        run.loop()
        lines = [json.loads(x) for x in (tmp_path / f"{mode}{prefetch}" / "metrics.jsonl").read_text().splitlines()]
        out[mode, prefetch] = (load_variables(str(tmp_path / f"{mode}{prefetch}"))["params"], lines)
    for key in ((True, 0), (True, 2)):
        jax.tree.map(np.testing.assert_array_equal, out[key][0], out[False, 0][0])
        assert out[key][1] == out[False, 0][1] and len(out[key][1]) >= 3


@pytest.mark.slow  # end to end (training runs / processes): not in make test-fast
def test_cached_features_of_a_linear_probe_go_to_the_device_too(tmp_path, tfds_data_dir):
    """train.feature_cache's row table (backbone features) is what the device holds: same head as on the host."""
    src = tmp_path / "src"
    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = tfds_data_dir
    loop.train(c, str(src))
    heads = {}
    for mode in (True, False):
        c = config_lib.load_config("tests/configs/tiny.py:steps=6")
        c.data.data_dir, c.init_from = tfds_data_dir, str(src)
        c.param_rules = [["backbone/.*", None], [".*", 1.0]]
        c.train.feature_cache, c.data.device_cache = True, mode
        run = loop.prepare_run(c, str(tmp_path / str(mode)))
        assert (run.device_data is not None and sorted(run.device_data.table) == ["features", "label"]) == mode
        run.loop()
        heads[mode] = load_variables(str(tmp_path / str(mode)))["params"]["head"]
    jax.tree.map(np.testing.assert_array_equal, heads[True], heads[False])
