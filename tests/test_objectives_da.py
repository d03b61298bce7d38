"""Unsupervised domain adaptation objectives: DANN (GRL + discriminator), CORAL, MMD; the two-domain stream."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.losses import coral_loss, cross_entropy, domain_adversarial_loss, mmd_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params.param_rules import flatten_paths
from conftest import RUN_FILES, workdir_files

SRC_PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]
TGT_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]


def setup(name, data_dir=None, **group):
    config = config_lib.base_config()
    config.objective.name = name
    config.data.data_dir = data_dir
    config.train.steps = 100
    config.objective[name].target = "optdigits"
    config.objective[name].target_pp = TGT_PP
    for k, v in group.items():
        config.objective[name][k] = v
    model = get_model("cnn", 10)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
             "label": jnp.arange(8, dtype=jnp.int32) % 10,
             "target_image": jnp.asarray(rng.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32)}
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
    extra, _ = obj.init_extra(jax.random.PRNGKey(1), params, {})
    return obj, {**params, **extra}, batch


def grads_of(fn, params):
    return flatten_paths(jax.jit(jax.grad(fn))(params))


def ce_only(obj, params, batch):
    zs, *_ = obj.forward(params, {}, batch, None)
    return cross_entropy(zs, batch["label"]).mean()


def test_grl_flips_the_discriminator_gradient_into_the_backbone():
    obj, params, batch = setup("dann", weight=0.7)
    step = 30
    lam = float(obj.lam(step))
    assert 0.9 < lam < 1.0

    def plain_domain_loss(p):  # the same discriminator loss WITHOUT gradient reversal
        _, fs, ft, _ = obj.forward(p, {}, batch, None)
        d = obj.discriminator.apply({"params": p["discriminator"]}, jnp.concatenate([fs, ft]))
        return domain_adversarial_loss(d[:8], d[8:])

    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, step)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    dom = grads_of(plain_domain_loss, params)
    for path in total:
        if path.startswith("discriminator/"):  # the discriminator minimises w·L_d
            want = 0.7 * dom[path]
        else:  # the backbone gets −λ·w·∂L_d (the head sees only CE)
            want = ce[path] - lam * 0.7 * dom[path]
        np.testing.assert_allclose(total[path], want, rtol=2e-4, atol=1e-6, err_msg=path)
    assert np.abs(dom["backbone/fc/kernel"]).max() > 0


def test_dann_lambda_ramp_zero_at_start_removes_the_backbone_term():
    obj, params, batch = setup("dann")
    assert float(obj.lam(0)) == 0.0 and float(obj.lam(100)) > 0.999
    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, 0)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    for path in ce:
        if not path.startswith("discriminator/"):
            np.testing.assert_allclose(total[path], ce[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.abs(total["discriminator/out/kernel"]).max() > 0  # the discriminator still learns


@pytest.mark.parametrize("name", ["dann", "coral", "mmd"])
def test_weight_zero_removes_the_adaptation_gradient(name):
    obj, params, batch = setup(name, weight=0.0)
    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, 50)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    for path in ce:
        np.testing.assert_allclose(total[path], ce[path], rtol=1e-6, atol=1e-8, err_msg=path)


@pytest.mark.parametrize("name, layer", [("coral", "features"), ("mmd", "features"), ("mmd", "logits")])
def test_coral_mmd_loss_is_ce_plus_weighted_term(name, layer):
    obj, params, batch = setup(name, weight=3.0, layer=layer)
    loss, (_, metrics) = obj.loss(params, {}, {}, batch, None, 0)
    model = obj.model
    z, f = model.apply({"params": {k: params[k] for k in ("backbone", "head")}},
                       jnp.concatenate([batch["image"], batch["target_image"]]), return_features=True)
    f = f if layer == "features" else z
    term = coral_loss(f[:8], f[8:]) if name == "coral" else mmd_loss(f[:8], f[8:])
    ce = cross_entropy(z[:8], batch["label"]).mean()
    np.testing.assert_allclose(float(loss), float(ce + 3.0 * term), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"train/da/{name}"]), float(term), rtol=1e-5)
    assert float(metrics["train/ce"]) == pytest.approx(float(ce), rel=1e-5)


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
