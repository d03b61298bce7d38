"""Mixup/cutmix per domain (tl_jax/data/mixing.py ``partners``) for the multidomain objective, against numpy.

A multi-domain batch is mixed within each domain: example ``b`` pairs with the mirror of its place among its
domain's examples; the multidomain loss is then the per-domain weighted soft cross-entropy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import mixing
from tl_jax.data.stream_rng import StreamRng
from tl_jax.models import get_model
from tl_jax.objectives import build_objective

DOMAIN = np.array([0, 1, 0, 0, 1, 2, 0, 1], np.int32)


def batch(n_classes=5):
    r = np.random.default_rng(0)
    return {"image": r.random((8, 6, 6, 1)).astype(np.float32),
            "label": r.integers(0, n_classes, 8).astype(np.int32), "domain": DOMAIN.copy()}


def test_partners_mirror_within_each_domain():
    # domain 0 at 0, 2, 3, 6 -> 6, 3, 2, 0; domain 1 at 1, 4, 7 -> 7, 4, 1; domain 2 alone at 5 -> itself
    np.testing.assert_array_equal(mixing.partners(8, DOMAIN), [6, 7, 3, 2, 4, 5, 0, 1])
    np.testing.assert_array_equal(mixing.partners(5), [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(mixing.partners(5, np.zeros(5, np.int32)), [4, 3, 2, 1, 0])


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixed_batch_stays_in_each_domain(cutmix):
    b = batch()
    mix = {"alpha": 0.0 if cutmix else 0.4, "cutmix_alpha": 1.0 if cutmix else 0.0, "switch_prob": 0.5, "prob": 1.0}
    out = mixing.Mixing(mix, batch_size=8, seed=3, num_classes=5)(2, b)
    # the same draws (batch 2 = stream positions 16..23), then numpy with the same-domain partners
    rng = StreamRng(3 ^ mixing.SALT, np.arange(16, 24))
    lam, cut = mixing.draw_mix(rng, 8, **mix)
    top, bottom, left, right = mixing.draw_boxes(rng, lam, 6, 6).T
    p, x, y = np.array([6, 7, 3, 2, 4, 5, 0, 1]), b["image"], b["label"]
    if cutmix:
        rows = cols = np.arange(6)
        inside = np.array([np.outer((rows >= top[i]) & (rows < bottom[i]), (cols >= left[i]) & (cols < right[i]))
                           for i in range(8)])[..., None]
        want = np.where(inside, x[p], x)
        lam = 1 - inside.sum((1, 2, 3)) / 36
    else:
        l4 = lam[:, None, None, None]
        want = l4 * x + (1 - l4) * x[p]
    np.testing.assert_allclose(out["image"], want, rtol=1e-6, atol=1e-6)
    eye = np.eye(5)
    np.testing.assert_allclose(out["label_soft"], lam[:, None] * eye[y] + (1 - lam[:, None]) * eye[y[p]], atol=1e-6)
    np.testing.assert_allclose(out["label_soft"].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["image"][5], x[5], rtol=1e-6)  # alone in its domain: mixed with itself
    np.testing.assert_array_equal(out["domain"], DOMAIN)


def test_classification_batches_are_mixed_as_before():
    b = {k: v for k, v in batch().items() if k != "domain"}
    lam, cut = np.linspace(0.2, 0.9, 8), np.zeros(8, bool)
    out = mixing.mix_batch(b, lam, cut, np.zeros((8, 4), np.int64), 5)
    l4 = lam[:, None, None, None].astype(np.float32)
    np.testing.assert_array_equal(out["image"], (l4 * b["image"] + (1 - l4) * b["image"][::-1]).astype(np.float32))


def test_multidomain_loss_is_the_weighted_soft_cross_entropy():
    c = config_lib.base_config()
    c.data.mixup.alpha = 0.4
    c.loss.label_smoothing = 0.1
    c.objective.name = "multidomain"
    c.objective.multidomain.domains = [{"name": "optdigits"}]
    c.objective.multidomain.weights = [0.5, 2.0]
    config_lib.validate(c)  # mixup with multidomain is accepted
    obj = build_objective(c, get_model("cnn", 5))
    domain = np.array([0, 1, 0, 0, 1, 1, 0, 1], np.int32)
    b = mixing.Mixing(dict(c.data.mixup), batch_size=8, seed=0, num_classes=5)(0, dict(batch(), domain=domain))
    params = obj.model.init(jax.random.key(0), b["image"])["params"]
    loss, (_, metrics) = obj.objective_loss(params, {}, {}, b, jax.random.key(1), jnp.int32(0))
    z = np.asarray(obj.model.apply({"params": params}, b["image"]), np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -((0.9 * b["label_soft"] + 0.1 / 5) * logp).sum(1)
    per = [w * ce[domain == d].mean() for d, w in enumerate([0.5, 2.0])]
    np.testing.assert_allclose(loss, sum(per), rtol=1e-5)
    np.testing.assert_allclose(metrics["train/loss/optdigits"], per[1], rtol=1e-5)


def test_other_objectives_are_still_refused():
    c = config_lib.base_config()
    c.data.mixup.alpha = 0.4
    c.objective.name = "dann"
    with pytest.raises(Exception, match="does not read soft labels"):
        config_lib.validate(c)


@pytest.mark.slow
def test_multidomain_trains_with_mixup(tmp_path, tfds_data_dir):
    import json

    from tl_jax.train.loop import train  # deferred: the training stack, for this end-to-end test only

    c = config_lib.load_config("tests/configs/tiny.py:steps=2")
    c.data.data_dir = tfds_data_dir
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 2
    c.data.train_pp = c.data.eval_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 8}]
    c.objective.name = "multidomain"
    c.objective.multidomain.domains = [{"name": "optdigits", "train_pp": [{"op": "rescale", "in_max": 16.0}],
                                        "eval_pp": [{"op": "rescale", "in_max": 16.0}]}]
    c.data.mixup = {"alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0}
    train(c, str(tmp_path / "md"))
    rows = [json.loads(r) for r in (tmp_path / "md" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss/optdigits"] for r in rows if "train/loss/optdigits" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
