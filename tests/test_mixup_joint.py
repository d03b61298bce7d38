"""Mixup/cutmix for the joint objective: images mixed within each domain, each task's term the soft
cross-entropy of the mixed one-hots, ``λ CE(z, y) + (1 − λ) CE(z, y_partner)``, against numpy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_objectives_joint import batch_of, config, make
from tl_jax import config as config_lib
from tl_jax.data import mixing
from tl_jax.models import get_model
from tl_jax.objectives import build_objective

MIX = {"alpha": 0.4, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0}


def test_task_labels_get_their_partners_and_lambda():
    obj = make(domains=[{"name": "jB"}], tasks=["digit", "parity"], weights=[[1.0, 1.0], [1.0, 1.0]])
    b = batch_of(obj, domains=[0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
    out = mixing.Mixing(MIX, batch_size=12, seed=5, num_classes=10)(1, b)
    partner = mixing.partners(12, b["domain"])
    for task in ("digit", "parity"):
        np.testing.assert_array_equal(out[f"partner_label/{task}"], b[f"label/{task}"][partner])
    # λ is the one label_soft uses: label_soft = λ onehot(y) + (1 − λ) onehot(y_partner)
    eye = np.eye(10, dtype=np.float32)
    want = out["mix_lam"][:, None] * eye[b["label"]] + (1 - out["mix_lam"][:, None]) * eye[b["label"][partner]]
    np.testing.assert_allclose(out["label_soft"], want, rtol=1e-6)
    assert np.all(b["domain"][partner] == b["domain"])


def test_joint_loss_is_the_soft_ce_of_the_mixed_one_hots():
    lam_matrix = [[1.0, 0.5], [2.0, 1.0]]  # [domain][task]
    c = config(domains=[{"name": "jB"}], tasks=["digit", "parity"], weights=lam_matrix)
    c.loss.label_smoothing = 0.1
    obj = build_objective(c, get_model("cnn", 10))
    dom = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0], np.int32)
    b = mixing.Mixing(MIX, batch_size=12, seed=5, num_classes=10)(0, batch_of(obj, domains=dom))
    params = obj.model.init(jax.random.PRNGKey(0), b["image"])["params"]
    loss, _ = obj.loss(params, {}, {}, b, jax.random.PRNGKey(1), jnp.int32(0))
    out = obj.model.apply({"params": params}, b["image"])
    lam, total = b["mix_lam"].astype(np.float64), 0.0
    for i, (task, n_classes) in enumerate([("digit", 10), ("parity", 2)]):
        z = np.asarray(out[task], np.float64)
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        eye = np.eye(n_classes)
        target = lam[:, None] * eye[b[f"label/{task}"]] + (1 - lam[:, None]) * eye[b[f"partner_label/{task}"]]
        ce = -(((1 - 0.1) * target + 0.1 / n_classes) * logp).sum(1)
        total += sum(lam_matrix[d][i] * ce[dom == d].mean() for d in (0, 1))
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)


def test_joint_accepts_mixup_and_unmixed_batches_are_unchanged():
    c = config_lib.base_config()
    c.data.mixup.alpha = 0.4
    c.objective.name = "joint"
    config_lib.validate(c)  # no longer refused
    obj = make(tasks=["digit", "parity"], weights=[[1.0, 1.0]])
    b = batch_of(obj)
    assert "mix_lam" not in b
    params = obj.model.init(jax.random.PRNGKey(0), b["image"])["params"]
    same = dict(b, mix_lam=np.ones(12, np.float32), **{f"partner_label/{t}": b[f"label/{t}"] for t in ("digit", "parity")})
    l0, _ = obj.loss(params, {}, {}, b, jax.random.PRNGKey(1), jnp.int32(0))
    l1, _ = obj.loss(params, {}, {}, same, jax.random.PRNGKey(1), jnp.int32(0))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)


@pytest.mark.slow
def test_joint_trains_with_mixup(tmp_path):
    from tl_jax.train.loop import train  # deferred: the training stack, for this end-to-end test only

    c = config(domains=[{"name": "jB"}], tasks=["digit", "parity"], weights=[[1.0, 1.0], [1.0, 1.0]])
    c.train.steps = 2
    c.data.mixup = dict(MIX)
    summary = train(c, str(tmp_path / "joint"))
    assert summary["steps"] == 2 and np.isfinite(summary["train/loss"])
