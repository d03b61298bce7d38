"""Mixup / cutmix (tl_jax/data/mixing.py): soft labels, boxes, the soft cross-entropy against numpy, the config
check, exact resume; a tiny run trains with it, and without it the loss path is the plain one."""
import copy
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, mixing
from tl_jax.data.cache import ArraySource
from tl_jax.data.shuffle import train_chain
from tl_jax.data.stream_rng import StreamRng
from tl_jax.objectives.classification import cross_entropy, soft_cross_entropy

MIX = dict(alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.7)


def _batch(b=32, h=8, w=10, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((b, h, w, 3)).astype(np.float32), "label": rng.integers(0, classes, b).astype(np.int32)}


def test_mixed_images_and_soft_labels_follow_the_drawn_lam_and_boxes():
    batch = _batch()
    rng = StreamRng(3 ^ mixing.SALT, np.arange(64, 96))
    lam, cut = mixing.draw_mix(copy.deepcopy(rng), 32, **MIX)
    draws = copy.deepcopy(rng)
    mixing.draw_mix(draws, 32, **MIX)
    boxes = mixing.draw_boxes(draws, lam, 8, 10)
    out = mixing.Mixing(MIX, batch_size=32, seed=3, num_classes=5)(2, batch)  # batch 2: positions 64..95
    x, y, soft = batch["image"], batch["label"], out["label_soft"]
    assert soft.shape == (32, 5) and soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    assert cut.any() and (~cut & (lam < 1)).any() and (lam == 1).any()  # cutmix, mixup and unmixed all occur
    for b in range(32):
        p = 31 - b
        t, bo, le, ri = boxes[b]
        if cut[b]:
            area = (bo - t) * (ri - le)
            lam_b = 1 - area / 80  # the box area matches lam
            want = x[b].copy()
            want[t:bo, le:ri] = x[p, t:bo, le:ri]
            np.testing.assert_array_equal(out["image"][b], want)
        else:
            lam_b = lam[b]
            np.testing.assert_allclose(out["image"][b], lam_b * x[b] + (1 - lam_b) * x[p], rtol=1e-6)
        want_soft = np.zeros(5)
        want_soft[y[b]] += lam_b
        want_soft[y[p]] += 1 - lam_b
        np.testing.assert_allclose(soft[b], want_soft, atol=1e-6)
    np.testing.assert_array_equal(out["label"], y)


def test_lam_is_beta_distributed_and_boxes_match_their_side():
    n = 40_000
    for a in (0.2, 1.0, 2.0):
        lam, cut = mixing.draw_mix(StreamRng(0, np.arange(n)), n, alpha=a, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0)
        assert not cut.any()
        assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 1 / (4 * (2 * a + 1))) < 0.01, a
    lam = np.array([0.0, 0.75, 0.19, 1.0])
    boxes = mixing.draw_boxes(np.random.default_rng(0), lam, 100, 100)
    sides = np.minimum(boxes[:, [1, 3]] - boxes[:, [0, 2]], 100)
    assert (sides <= np.floor(100 * np.sqrt(1 - lam))[:, None]).all() and sides[3].tolist() == [0, 0]
    only_cut = mixing.draw_mix(StreamRng(0, np.arange(8)), 8, alpha=0.0, cutmix_alpha=1.0, switch_prob=0.0, prob=1.0)
    assert only_cut[1].all()


def np_soft_ce(z, t, eps):
    z = z.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    q = (1 - eps) * t + eps / z.shape[1]
    return -(q * logp).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_cross_entropy_matches_numpy_and_one_hot_is_plain_ce(eps):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 5)).astype(np.float32)
    t = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    np.testing.assert_allclose(soft_cross_entropy(jnp.asarray(z), jnp.asarray(t), label_smoothing=eps),
                               np_soft_ce(z, t, eps), rtol=1e-5)
    y = rng.integers(0, 5, 6)
    np.testing.assert_allclose(soft_cross_entropy(z, np.eye(5, dtype=np.float32)[y], label_smoothing=eps),
                               cross_entropy(z, y, label_smoothing=eps), rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(z, t[:, :4])


def test_objective_loss_uses_the_soft_labels_and_the_plain_path_without_them():
    from tl_jax.models import get_model
    from tl_jax.objectives import build_objective

    c = config_lib.base_config()
    c.loss.label_smoothing = 0.1
    model = get_model("cnn", num_classes=5)
    batch = _batch(b=8, h=12, w=12)
    batch["image"] = batch["image"][..., :1]
    variables = model.init(jax.random.key(0), batch["image"], train=False)
    objective = build_objective(c, model)
    mixed = mixing.Mixing(MIX, batch_size=8, seed=0, num_classes=5)(0, batch)
    args = (variables["params"], variables.get("batch_stats", {}), {}, mixed, jax.random.key(1), 0)
    loss, (_, metrics) = objective.objective_loss(*args)
    logits = model.apply(variables, mixed["image"], train=False)
    np.testing.assert_allclose(loss, np_soft_ce(np.asarray(logits), mixed["label_soft"], 0.1).mean(), rtol=1e-5)
    plain = {k: v for k, v in mixed.items() if k != "label_soft"}
    loss_plain, _ = objective.objective_loss(*args[:3], plain, *args[4:])
    assert float(loss_plain) == float(cross_entropy(logits, plain["label"], label_smoothing=0.1).mean())
    assert float(metrics["train/accuracy"]) == float(np.mean(np.argmax(logits, -1) == batch["label"]))


def test_mixing_resumes_exactly_over_the_training_chain():
    n = 20
    source = ArraySource({"image": np.random.default_rng(1).random((n, 6, 6, 3)).astype(np.float32),
                          "label": np.arange(n) % 4})
    pp = build_preprocess([{"op": "flip_lr"}])

    def iterator():
        ds = mixing.wrap(train_chain(source, pp, batch_size=8, seed=2), MIX, batch_size=8, seed=2, num_classes=4)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))

    it = iterator()
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    again = iterator()
    again.set_state(state)
    for x, y in zip(rest, [next(again) for _ in range(3)], strict=True):
        for key in ("image", "label", "label_soft"):
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(first[0]["label_soft"], rest[0]["label_soft"])
    with pytest.raises(ValueError, match=r"config.data.mixup mixes image batches .*\['input_ids', 'label'\]"):
        mixing.Mixing(MIX, batch_size=2, seed=0, num_classes=4)(0, {"input_ids": np.zeros((2, 5)), "label": [0, 1]})
    off = train_chain(source, pp, batch_size=8, seed=2)
    assert mixing.wrap(off, dict(MIX, alpha=0.0, cutmix_alpha=0.0), batch_size=8, seed=2, num_classes=4) is off


@pytest.mark.parametrize("overrides, match", [
    ({"data.mixup.alpha": -1.0}, r"config.data.mixup.alpha must be a number >= 0"),
    ({"data.mixup.switch_prob": 1.5}, r"config.data.mixup.switch_prob must be in \[0, 1\]"),
    ({"data.mixup.alpha": 0.2, "objective.name": "dann"}, r"config.data.mixup is on but config.objective.name='dann'"),
    ({"data.mixup.cutmix_alpha": 1.0, "train.feature_cache": True}, r"set config.train.feature_cache to false"),
])
def test_config_errors_name_the_key(overrides, match):
    c = config_lib.base_config()
    for key, value in overrides.items():
        config_lib.set_value(c, key, value)
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


def test_default_is_off_and_validates():
    c = config_lib.base_config()
    assert not mixing.is_on(c.data.mixup) and dict(c.data.mixup) == {"alpha": 0.0, "cutmix_alpha": 0.0,
                                                                      "switch_prob": 0.5, "prob": 1.0}
    config_lib.validate(c)


@pytest.mark.slow
@pytest.mark.parametrize("shots", [None, 2], ids=["all", "2_shots"])
def test_a_tiny_run_trains_on_mixed_batches(tmp_path, tfds_data_dir, monkeypatch, shots):
    from tl_jax.train import loop as loop_lib

    seen = []
    original = mixing.mix_batch
    monkeypatch.setattr(mixing, "mix_batch", lambda *a: seen.append(original(*a)) or seen[-1])
    c = config_lib.load_config("tests/configs/tiny.py")
    c.data.data_dir = tfds_data_dir
    config_lib.set_value(c, "data.mixup.alpha", 0.4)
    config_lib.set_value(c, "data.mixup.cutmix_alpha", 1.0)
    c.train.steps = 3
    c.data.shots = shots  # 2 per class: 20 examples, mixed like the full split
    loop_lib.train(c, str(tmp_path / "run"))
    assert len(seen) >= 3 and all(b["label_soft"].shape == (16, 10) for b in seen)
    assert all(np.allclose(b["label_soft"].sum(1), 1.0) for b in seen)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and np.isfinite(losses).all()
    assert json.load(open(tmp_path / "run" / "config.json"))["data"]["mixup"]["cutmix_alpha"] == 1.0


@pytest.mark.slow
def test_vectorized_sweep_with_mixup_equals_sequential(tmp_path, tfds_data_dir):
    """The vmapped points stack their mixed batches (label_soft included): same losses as one run at a time."""
    from tl_jax.sweep.runner import run_sweep

    ov = [f"data.data_dir={tfds_data_dir}", "data.mixup.alpha=0.4", "data.mixup.cutmix_alpha=1.0"]
    records = {m: run_sweep("tests/configs/tiny_sweep.py", str(tmp_path / m), vectorize=m, overrides=ov)
               for m in ("on", "off")}
    assert [g["mode"] for g in records["on"]["groups"]] == ["vectorized"]
    for name in ("p0", "p1"):
        vec, seq = ([json.loads(line)["train/loss"] for line in open(tmp_path / m / name / "metrics.jsonl")
                     if "train/loss" in line] for m in ("on", "off"))
        assert len(vec) == 2
        np.testing.assert_allclose(vec, seq, rtol=1e-5)
