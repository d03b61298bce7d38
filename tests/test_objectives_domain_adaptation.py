"""Unsupervised DA, the shared part: gradient reversal, the λ ramp, config errors, the two-domain stream, end to end."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest
import shutil

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.objectives.domain_adaptation import dann_lambda, gradient_reversal
from conftest import RUN_FILES, workdir_files
from objective_setup import TGT_PP, ce_only, grads_of
from objective_setup import setup_with_batch as setup


def test_gradient_reversal_flips_and_scales():
    x = jnp.array([1.0, -2.0, 3.0])
    c = jnp.array([0.5, 1.0, -2.0])
    np.testing.assert_array_equal(gradient_reversal(x, 0.7), x)
    gx, glam = jax.grad(lambda x, lam: jnp.sum(gradient_reversal(x, lam) * c), argnums=(0, 1))(x, 0.7)
    np.testing.assert_allclose(gx, -0.7 * np.asarray(c), rtol=1e-6)
    assert float(glam) == 0.0
    g = jax.jit(jax.grad(lambda x, lam: jnp.sum(gradient_reversal(x, lam) * c)))(x, jnp.float32(2.0))
    np.testing.assert_allclose(g, -2.0 * np.asarray(c))


def test_dann_lambda():
    assert float(dann_lambda(0.0)) == 0.0
    np.testing.assert_allclose(dann_lambda(1.0), 2 / (1 + np.exp(-10)) - 1, rtol=1e-6)
    assert float(dann_lambda(1.0)) > 0.9999
    np.testing.assert_allclose(dann_lambda(0.3, gamma=5.0), 2 / (1 + np.exp(-1.5)) - 1, rtol=1e-6)
    np.testing.assert_allclose(dann_lambda(2.0), dann_lambda(1.0))       # clipped
    with pytest.raises(ValueError, match="gamma"):
        dann_lambda(0.5, gamma=-1.0)


SRC_PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]


@pytest.mark.parametrize("name", ["dann", "coral", "mmd"])
def test_weight_zero_removes_the_adaptation_gradient(name):
    obj, params, batch = setup(name, weight=0.0)
    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, 50)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    for path in ce:
        np.testing.assert_allclose(total[path], ce[path], rtol=1e-6, atol=1e-8, err_msg=path)


@pytest.mark.parametrize("key, value, msg", [
    ("target", "", r"config.objective.mmd.target must name the unlabelled target dataset"),
    ("weight", -1.0, r"config.objective.mmd.weight must be a finite number >= 0"),
    ("layer", "conv1", r"config.objective.mmd.layer must be one of"),
    ("kernel_mul", 0.0, r"config.objective.mmd.kernel_mul must be > 0"),
    ("target_batch_size", -2, r"config.objective.mmd.target_batch_size must be an int >= 0"),
])
def test_bad_config_is_named(key, value, msg):
    with pytest.raises(ValueError, match=msg):
        setup("mmd", **{key: value})


def test_batches_hold_both_domains_and_resume_exactly(tfds_data_dir):
    obj, _, _ = setup("coral", tfds_data_dir, target_batch_size=6)
    source = load_split("mnist5k", "train", tfds_data_dir)
    standard = train_dataset(source, build_preprocess(SRC_PP), batch_size=4, seed=3)
    ds = obj.train_dataset(standard, batch_size=4, seed=3, process_index=0, process_count=1)
    target_alone = train_dataset(load_split("optdigits", "train", tfds_data_dir), build_preprocess(TGT_PP),
                                 batch_size=6, seed=4)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    assert set(first[0]) == {"image", "label", "target_image"}  # no target labels
    assert first[0]["image"].shape == (4, 14, 14, 1) and first[0]["target_image"].shape == (6, 14, 14, 1)
    for i, b in enumerate(first):
        np.testing.assert_array_equal(b["image"], standard[i]["image"])
        np.testing.assert_array_equal(b["target_image"], target_alone[i]["image"])
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    split, pp = obj.eval_data(None, None)
    assert (split.name, split.split, len(split)) == ("optdigits", "test", len(load_split("optdigits", "test",
                                                                                         tfds_data_dir)))
    assert pp.op_names == ("rescale", "resize")


def test_target_shape_mismatch_is_named(tfds_data_dir):
    obj, _, _ = setup("dann", tfds_data_dir, target_pp=[{"op": "rescale", "in_max": 16.0}])
    standard = train_dataset(load_split("mnist5k", "train", tfds_data_dir), build_preprocess(SRC_PP),
                             batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"config.objective.dann.target_pp gives target images of shape \(8, 8, 1\)"):
        obj.train_dataset(standard, batch_size=4, seed=0, process_index=0, process_count=1)


def tiny(data_dir, name, **ov):
    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = data_dir
    ov = {"objective.name": name, f"objective.{name}.target": "optdigits", f"objective.{name}.target_pp": TGT_PP,
          **ov}
    return config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in ov.items()])


def metrics(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dann", "coral", "mmd"])
def test_train_writes_contract_and_evaluates_the_target(tmp_path, tfds_data_dir, name):
    from tl_jax.train.loop import train

    wd = str(tmp_path / name)
    config = tiny(tfds_data_dir, name, **{"train.checkpoint_every": 2})
    summary = train(config, wd)
    assert workdir_files(wd) == RUN_FILES
    assert summary["steps"] == 4 and 0.0 <= summary["test/accuracy"] <= 1.0
    assert all(f"train/da/{name}" in m for m in metrics(wd) if "train/loss" in m)
    if name == "dann":  # resume after a crash at step 2 repeats the uninterrupted run exactly
        shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
        os.remove(os.path.join(wd, "summary.json"))
        full = metrics(wd)
        resumed = train(config, wd)
        assert metrics(wd) == full
        assert resumed["test/accuracy"] == summary["test/accuracy"]


@pytest.mark.parametrize("name, key, value, match", [
    ("mcc", "temperature", 0.0, r"config.objective.mcc.temperature must be > 0"),
    ("mdd", "margin", 0.0, r"config.objective.mdd.margin must be > 0"),
    ("cdan", "randomized_dim", -1, r"config.objective.cdan.randomized_dim must be an int >= 0"),
    ("self_training", "threshold", 2.0, r"config.objective.self_training.threshold must be in \[0, 1\]"),
])
def test_method_bad_config_is_named(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        setup(name, **{key: value})


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("cdan", {}), ("mcc", {}), ("mdd", {}),
    ("self_training", {"objective.self_training.weak_pp": [{"op": "random_crop", "size": 14, "pad": 1}],
                       "objective.self_training.strong_pp": [{"op": "random_crop", "size": 14, "pad": 3}],
                       "objective.self_training.threshold": 0.5}),
])
def test_methods_train_end_to_end_and_resume_exactly(tmp_path, tfds_data_dir, name, extra):
    from tl_jax.train.loop import train

    wd = str(tmp_path / name)
    config = tiny(tfds_data_dir, name, **{"train.checkpoint_every": 2, **extra})
    summary = train(config, wd)
    assert workdir_files(wd) == RUN_FILES
    assert summary["steps"] == 4 and 0.0 <= summary["test/accuracy"] <= 1.0
    assert all(f"train/da/{name}" in m for m in metrics(wd) if "train/loss" in m)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    os.remove(os.path.join(wd, "summary.json"))
    full = metrics(wd)
    resumed = train(config, wd)
    assert metrics(wd) == full
    assert resumed["test/accuracy"] == summary["test/accuracy"]
