"""Objectives cdan, mcc, mdd, self_training, bss, delta, co_tuning, feature_distill: wiring, data, end to end."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.losses import cross_entropy
from tl_jax.losses.da_methods import cdan_loss, fixmatch_loss, mcc_loss, mdd_loss, multilinear_map
from tl_jax.losses.finetune_methods import attention_transfer_loss, bss_loss, hint_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params.param_rules import flatten_paths
from conftest import RUN_FILES, workdir_files

SRC_PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]
TGT_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]
R = np.random.default_rng(0)
BATCH = {"image": jnp.asarray(R.normal(size=(8, 8, 8, 1)), jnp.float32),
         "label": jnp.arange(8, dtype=jnp.int32) % 10,
         "target_image": jnp.asarray(R.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32),
         "target_strong_image": jnp.asarray(R.normal(0.5, 2.0, size=(6, 8, 8, 1)), jnp.float32)}


def setup(name, data_dir=None, **group):
    config = config_lib.base_config()
    config.objective.name = name
    config.data.data_dir = data_dir
    config.train.steps = 100
    if "target" in config.objective[name]:
        config.objective[name].target = "optdigits"
        config.objective[name].target_pp = TGT_PP
    for k, v in group.items():
        config.objective[name][k] = v
    model = get_model("cnn", 10)
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), BATCH["image"])["params"]
    extra, aux = obj.init_extra(jax.random.PRNGKey(1), params, {})
    return obj, {**params, **extra}, aux


def outputs(obj, params, images):
    return obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, images, return_features=True)


def test_cdan_e_loss_is_ce_plus_weighted_conditional_adversarial_term():
    obj, params, aux = setup("cdan", weight=0.5, entropy=True)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 30)
    z, f = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
    g = jax.nn.softmax(z)
    d = obj.discriminator.apply({"params": params["discriminator"]}, multilinear_map(f, g))
    term = cdan_loss(d[:8], d[8:], g[:8], g[8:], entropy_conditioning=True)
    ce = cross_entropy(z[:8], BATCH["label"]).mean()
    np.testing.assert_allclose(float(loss), float(ce + 0.5 * term), rtol=1e-5)
    assert params["discriminator"]["fc0"]["kernel"].shape == (10 * 512, 256)   # reads the C·D map


def test_cdan_randomized_map_keeps_its_matrices_in_aux():
    obj, params, aux = setup("cdan", randomized_dim=64)
    assert aux["cdan_random"]["r_f"].shape == (512, 64) and aux["cdan_random"]["r_g"].shape == (10, 64)
    assert params["discriminator"]["fc0"]["kernel"].shape == (64, 256)
    assert np.isfinite(float(obj.loss(params, {}, aux, BATCH, None, 3)[0]))


def test_mcc_loss_is_ce_plus_weighted_confusion_of_the_target():
    obj, params, aux = setup("mcc", weight=2.0, temperature=3.0)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    z, _ = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
    want = cross_entropy(z[:8], BATCH["label"]).mean() + 2.0 * mcc_loss(z[8:], 3.0)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_mdd_adversary_minimises_and_the_backbone_gets_the_reversed_gradient():
    obj, params, aux = setup("mdd", weight=0.7, margin=2.0)
    step = 60
    lam = float(obj.grl_max * (2 / (1 + np.exp(-10 * 0.6)) - 1))

    def plain(p):  # the same MDD term without gradient reversal
        z, f = outputs(obj, p, jnp.concatenate([BATCH["image"], BATCH["target_image"]]))
        adv = obj.adversary.apply({"params": p["adversary"]}, f)
        return mdd_loss(z[:8], adv[:8], z[8:], adv[8:], margin=2.0)

    def ce(p):
        z, _ = outputs(obj, p, BATCH["image"])
        return cross_entropy(z, BATCH["label"]).mean()

    total = flatten_paths(jax.grad(lambda p: obj.loss(p, {}, aux, BATCH, None, step)[0])(params))
    g_mdd, g_ce = flatten_paths(jax.grad(plain)(params)), flatten_paths(jax.grad(ce)(params))
    for path in total:
        want = 0.7 * g_mdd[path] if path.startswith("adversary/") else g_ce[path] - lam * 0.7 * g_mdd[path]
        np.testing.assert_allclose(total[path], want, rtol=2e-4, atol=1e-6, err_msg=path)
    assert np.abs(g_mdd["backbone/fc/kernel"]).max() > 0


def test_self_training_loss_uses_weak_pseudo_labels_on_the_strong_view():
    obj, params, aux = setup("self_training", weight=1.5, threshold=0.0)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    z, _ = outputs(obj, params, jnp.concatenate([BATCH["image"], BATCH["target_image"],
                                                 BATCH["target_strong_image"]]))
    term, parts = fixmatch_loss(z[8:14], z[14:], threshold=0.0)
    np.testing.assert_allclose(float(loss), float(cross_entropy(z[:8], BATCH["label"]).mean() + 1.5 * term),
                               rtol=1e-5)
    assert float(m["train/da/mask_rate"]) == 1.0 and float(term) > 0


def test_self_training_batches_hold_two_views_and_resume_exactly(tfds_data_dir):
    obj, _, _ = setup("self_training", tfds_data_dir, target_batch_size=6,
                      weak_pp=[{"op": "random_crop", "size": 14, "pad": 1}],
                      strong_pp=[{"op": "random_crop", "size": 14, "pad": 3}, {"op": "flip_lr"}])
    standard = train_dataset(load_split("mnist5k", "train", tfds_data_dir), build_preprocess(SRC_PP), batch_size=4,
                             seed=3)
    ds = obj.train_dataset(standard, batch_size=4, seed=3, process_index=0, process_count=1)
    plain = train_dataset(load_split("optdigits", "train", tfds_data_dir), build_preprocess(TGT_PP), batch_size=6,
                          seed=4)
    it = iter(ds)
    first = [next(it) for _ in range(2)]
    b = first[0]
    assert set(b) == {"image", "label", "target_image", "target_strong_image"}
    assert b["target_image"].shape == b["target_strong_image"].shape == (6, 14, 14, 1)
    assert not np.array_equal(b["target_image"], b["target_strong_image"])
    # both views are crops of the same target digits: equal pixel sums up to the cropped-off border
    base = plain[0]["image"]
    assert np.all(np.abs(b["target_image"].sum((1, 2, 3)) - base.sum((1, 2, 3))) <= base.sum((1, 2, 3)) + 1e-6)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    with pytest.raises(ValueError, match=r"config.objective.self_training.target_pp \+ strong_pp give target images"):
        bad, _, _ = setup("self_training", tfds_data_dir, strong_pp=[{"op": "resize", "size": 10}])
        bad.train_dataset(standard, batch_size=4, seed=3, process_index=0, process_count=1)


def test_bss_and_delta_terms():
    obj, params, aux = setup("bss", weight=0.1, k=2)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    z, f = outputs(obj, params, BATCH["image"])
    np.testing.assert_allclose(float(loss), float(cross_entropy(z, BATCH["label"]).mean() + 0.1 * bss_loss(f, 2)),
                               rtol=1e-5)
    obj, params, aux = setup("delta", weight=0.3, attention=False)   # the unweighted "L2-FE" form
    assert set(aux) == {"delta_pretrained"}
    assert float(obj.loss(params, {}, aux, BATCH, None, 0)[1][1]["train/delta"]) == 0.0   # at the start: f = f*
    moved = jax.tree.map(lambda x: x * 1.1, params)
    loss, (_, m) = obj.loss(moved, {}, aux, BATCH, None, 0)
    z, f = outputs(obj, moved, BATCH["image"])
    _, f0 = outputs(obj, params, BATCH["image"])
    np.testing.assert_allclose(float(m["train/delta"]), float(np.sum((f - f0) ** 2) / 8), rtol=1e-4)
    g = flatten_paths(jax.grad(lambda p: obj.loss(p, {}, aux, BATCH, None, 0)[0])(moved))
    assert np.abs(g["backbone/fc/kernel"]).max() > 0


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_mean_ce(z, y):
    return np.mean(np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(len(y)), y])


def test_delta_channel_attention_from_the_training_examples(tfds_data_dir):
    from tl_jax.objectives.finetune_methods import fit_probe
    from tl_jax.transferability.extract import target_arrays

    config = config_lib.base_config()
    config.objective.name = "delta"
    config.objective.delta.update(weight=0.3, temperature=2.0)
    config.data.update(name="optdigits", data_dir=tfds_data_dir, shots=4, shots_seed=1, val_fraction=0.2,
                       eval_pp=[{"op": "rescale", "in_max": 16.0}])
    model = get_model("cnn", 10)
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), BATCH["image"])["params"]
    _, aux = obj.init_extra(jax.random.PRNGKey(1), params, {})
    # the run's training examples: 4 per class, drawn after the validation carve-out
    examples = target_arrays(config)
    y = examples["label"]
    assert sorted(np.bincount(y, minlength=10)) == [4] * 10
    _, f = model.apply({"params": params}, examples["image"], return_features=True)
    f = np.asarray(f, np.float64)
    w, b = (np.asarray(a, np.float64) for a in fit_probe(f, y, 10))
    p, onehot = np_softmax(f @ w + b), np.eye(10)[y]
    assert np.abs(f.T @ (p - onehot) / len(y) + 1e-3 * w).max() < 1e-4   # the L2 logistic probe's optimum
    assert np.abs((p - onehot).mean(0)).max() < 1e-4
    increase = np.empty(f.shape[1])
    for c in range(f.shape[1]):   # DELTA's definition, one channel at a time (float64)
        g = f.copy()
        g[:, c] = 0.0
        increase[c] = np_mean_ce(g @ w + b, y) - np_mean_ce(f @ w + b, y)
    z = (increase - increase.mean()) / increase.std()
    want = f.shape[1] * np_softmax(z / 2.0)
    got = np.asarray(aux["delta_attention"])
    assert got.shape == (512,) and abs(got.sum() - 512) < 1e-2 and got.max() > 2.0   # far from uniform
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    # the loss: CE + w·(1/B) Σ_b Σ_c a_c (f_bc − f*_bc)²
    moved = jax.tree.map(lambda x: x * 1.1, params)
    loss, (_, m) = obj.loss(moved, {}, aux, BATCH, None, 0)
    zm, fm = outputs(obj, moved, BATCH["image"])
    _, f0 = outputs(obj, params, BATCH["image"])
    term = np.sum(got * (np.asarray(fm, np.float64) - np.asarray(f0, np.float64)) ** 2) / 8
    np.testing.assert_allclose(float(m["train/delta"]), term, rtol=1e-4)
    np.testing.assert_allclose(float(loss), np_mean_ce(np.asarray(zm, np.float64), np.asarray(BATCH["label"]))
                               + 0.3 * term, rtol=1e-4)


def test_delta_attention_flag_must_be_a_bool():
    config = config_lib.base_config()
    config.objective.name = "delta"
    with config.objective.delta.ignore_type():
        config.objective.delta.attention = "yes"
    with pytest.raises(ValueError, match=r"^config.objective.delta.attention must be true or false, got 'yes'$"):
        build_objective(config, get_model("cnn", 10))


@pytest.mark.parametrize("name, key, value, match", [
    ("bss", "k", 0, r"config.objective.bss.k must be an int in \[1, config.data.batch_size"),
    ("delta", "weight", -1.0, r"config.objective.delta.weight must be a finite number >= 0"),
    ("delta", "temperature", 0.0, r"config.objective.delta.temperature must be a finite number > 0"),
    ("mcc", "temperature", 0.0, r"config.objective.mcc.temperature must be > 0"),
    ("mdd", "margin", 0.0, r"config.objective.mdd.margin must be > 0"),
    ("cdan", "randomized_dim", -1, r"config.objective.cdan.randomized_dim must be an int >= 0"),
    ("self_training", "threshold", 2.0, r"config.objective.self_training.threshold must be in \[0, 1\]"),
    ("co_tuning", "source", "", r"config.objective.co_tuning.source is empty and so is config.init_from"),
])
def test_bad_config_is_named(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        setup(name, **{key: value})


def make_distill(**group):
    c = config_lib.base_config()
    c.objective.name = "feature_distill"
    g = c.objective.feature_distill
    g.teacher, g.teacher_model, g.teacher_kwargs = "unused", "cnn", {"width": 2}
    for k, v in group.items():
        g[k] = v
    obj = build_objective(c, get_model("cnn", 10))
    params = obj.model.init(jax.random.PRNGKey(0), BATCH["image"])["params"]
    teacher = obj.teacher_model.init(jax.random.PRNGKey(1), BATCH["image"])
    obj.init_extra = obj.init_extra  # keep the bound method; the teacher comes from here, not a checkpoint
    extra = {}
    if obj.hint_weight > 0:
        import flax.linen as nn
        d_s = obj._width(params, obj.student_layer, "student_layer")
        d_t = obj._width(teacher["params"], obj.teacher_layer, "teacher_layer")
        obj.projection = nn.Dense(d_t, use_bias=False)
        extra = {"projection": obj.projection.init(jax.random.PRNGKey(2), jnp.zeros((1, d_s)))["params"]}
    return obj, {**params, **extra}, {"teacher": teacher}


def test_feature_distill_hint_on_features_plus_logit_kd():
    obj, params, aux = make_distill(hint_weight=0.5, logit_kd=True, alpha=0.5, temperature=2.0)
    assert params["projection"]["kernel"].shape == (512, 1024)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    s, fs = obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, BATCH["image"],
                            return_features=True)
    t, ft = obj.teacher_model.apply(aux["teacher"], BATCH["image"], return_features=True)
    from tl_jax.losses.distill import distillation_loss
    kd, _ = distillation_loss(s, t, BATCH["label"], alpha=0.5, temperature=2.0)
    hint = hint_loss(fs @ params["projection"]["kernel"], ft)
    np.testing.assert_allclose(float(loss), float(kd.mean() + 0.5 * hint), rtol=1e-5)


def test_feature_distill_intermediate_layer_attention_transfer_alone():
    obj, params, aux = make_distill(hint_weight=0.25, at_weight=3.0, logit_kd=False, student_layer="backbone/conv2",
                                    teacher_layer="backbone/conv2")
    assert params["projection"]["kernel"].shape == (64, 128)   # conv2 widths: student 64, teacher 128
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    _, inter_s = obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, BATCH["image"],
                                 capture_intermediates=True, mutable=["intermediates"])
    _, inter_t = obj.teacher_model.apply(aux["teacher"], BATCH["image"], capture_intermediates=True,
                                         mutable=["intermediates"])
    fs = inter_s["intermediates"]["backbone"]["conv2"]["__call__"][0]
    ft = inter_t["intermediates"]["backbone"]["conv2"]["__call__"][0]
    s = obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, BATCH["image"])
    want = (cross_entropy(s, BATCH["label"]).mean() + 0.25 * hint_loss(fs @ params["projection"]["kernel"], ft)
            + 3.0 * attention_transfer_loss(fs, ft))
    assert fs.ndim == 4
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    with pytest.raises(ValueError, match=r"student_layer='backbone/nope' is not a module path"):
        obj._width(params, "backbone/nope", "student_layer")


# ----------------------------------------------------------------------------- end to end


def tiny(data_dir, name, **ov):
    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = data_dir
    if "target" in c.objective.get(name, {}):
        ov = {f"objective.{name}.target": "optdigits", f"objective.{name}.target_pp": TGT_PP, **ov}
    ov = {"objective.name": name, **ov}
    return config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in ov.items()])


def metrics(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


def saved_aux(wd):
    """``state.aux`` of the latest checkpoint of run ``wd``."""
    from orbax import checkpoint as ocp
    from tl_jax.train.checkpoint import resolve_init_dir

    with ocp.StandardCheckpointer() as ck:
        return ck.restore(resolve_init_dir(wd, "x") / "state")["aux"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("cdan", {}), ("mcc", {}), ("mdd", {}),
    ("self_training", {"objective.self_training.weak_pp": [{"op": "random_crop", "size": 14, "pad": 1}],
                       "objective.self_training.strong_pp": [{"op": "random_crop", "size": 14, "pad": 3}],
                       "objective.self_training.threshold": 0.5}),
    ("bss", {}), ("delta", {}),
])
def test_train_end_to_end_and_resume_exactly(tmp_path, tfds_data_dir, name, extra):
    from tl_jax.train.loop import train

    wd = str(tmp_path / name)
    config = tiny(tfds_data_dir, name, **{"train.checkpoint_every": 2, **extra})
    summary = train(config, wd)
    assert workdir_files(wd) == RUN_FILES
    assert summary["steps"] == 4 and 0.0 <= summary["test/accuracy"] <= 1.0
    key = f"train/da/{name}" if "target" in config.objective[name] else f"train/{name}"
    assert all(key in m for m in metrics(wd) if "train/loss" in m)
    if name == "delta":   # DELTA's channel attention (a = D·softmax(ẑ/T)) is a constant of the checkpoint
        attention = np.asarray(saved_aux(wd)["delta_attention"])
        assert attention.shape == (512,) and abs(attention.sum() - 512) < 0.1
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    os.remove(os.path.join(wd, "summary.json"))
    full = metrics(wd)
    resumed = train(config, wd)
    assert metrics(wd) == full
    assert resumed["test/accuracy"] == summary["test/accuracy"]
    if name == "delta":
        np.testing.assert_array_equal(np.asarray(saved_aux(wd)["delta_attention"]), attention)


@pytest.mark.slow
def test_co_tuning_and_feature_distill_end_to_end(tmp_path, tfds_data_dir):
    from tl_jax.train.checkpoint import load_variables
    from tl_jax.train.loop import train

    src = str(tmp_path / "source")
    train(tiny(tfds_data_dir, "classification"), src)
    config = tiny(tfds_data_dir, "co_tuning", **{"init_from": src, "data.shots": 3, "dont_load": ["head/.*"]})
    wd = str(tmp_path / "co")
    summary = train(config, wd)
    assert 0.0 <= summary["test/accuracy"] <= 1.0
    state = load_variables(wd)
    assert "source_head" in state["params"]
    rel = np.asarray(saved_aux(wd)["co_tuning_relationship"])
    assert rel.shape == (10, 10)
    np.testing.assert_allclose(rel.sum(1), 1.0, rtol=1e-5)
    fd = tiny(tfds_data_dir, "feature_distill", **{"objective.feature_distill.teacher": src,
                                                    "objective.feature_distill.at_weight": 1.0})
    s = train(fd, str(tmp_path / "fd"))
    assert 0.0 <= s["test/accuracy"] <= 1.0 and "train/hint" in metrics(str(tmp_path / "fd"))[0]
