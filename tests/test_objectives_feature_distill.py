"""Feature distillation: hint and attention-transfer losses; the objective on features and on an intermediate layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.feature_distill import attention_map, attention_transfer_loss, hint_loss, projection
from tl_jax.models import get_model
from tl_jax.objectives import build_objective


RNG = np.random.default_rng(0)


def test_hint_and_attention_transfer_losses():
    s, t = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 6))
    np.testing.assert_allclose(float(hint_loss(jnp.asarray(s), jnp.asarray(t))), 0.5 * np.sum((s - t) ** 2) / 3,
                               rtol=1e-5)
    a, b = RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 4, 4, 5))   # channel counts may differ
    qa = (np.abs(a) ** 2).sum(-1).reshape(2, -1)
    qb = (np.abs(b) ** 2).sum(-1).reshape(2, -1)
    qa, qb = qa / np.linalg.norm(qa, axis=1, keepdims=True), qb / np.linalg.norm(qb, axis=1, keepdims=True)
    np.testing.assert_allclose(attention_map(jnp.asarray(a)), qa, rtol=1e-5)
    np.testing.assert_allclose(float(attention_transfer_loss(jnp.asarray(a), jnp.asarray(b))),
                               np.sum((qa - qb) ** 2) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="must have the teacher features' shape"):
        hint_loss(jnp.asarray(s), jnp.asarray(t[:, :4]))


R = np.random.default_rng(0)
BATCH = {"image": jnp.asarray(R.normal(size=(8, 8, 8, 1)), jnp.float32),
         "label": jnp.arange(8, dtype=jnp.int32) % 10,
         "target_image": jnp.asarray(R.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32),
         "target_strong_image": jnp.asarray(R.normal(0.5, 2.0, size=(6, 8, 8, 1)), jnp.float32)}


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
    extra = {}  # the teacher comes from here, not a checkpoint (init_extra would load one)
    if obj.hint_weight > 0:
        d_s = obj._width(params, obj.student_layer, "student_layer")
        d_t = obj._width(teacher["params"], obj.teacher_layer, "teacher_layer")
        extra = {"projection": projection(d_t).init(jax.random.PRNGKey(2), jnp.zeros((1, d_s)))["params"]}
    return obj, {**params, **extra}, {"teacher": teacher}


def test_feature_distill_hint_on_features_plus_logit_kd():
    obj, params, aux = make_distill(hint_weight=0.5, logit_kd=True, alpha=0.5, temperature=2.0)
    assert params["projection"]["kernel"].shape == (512, 1024)
    loss, (_, m) = obj.loss(params, {}, aux, BATCH, None, 0)
    s, fs = obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, BATCH["image"],
                            return_features=True)
    t, ft = obj.teacher_model.apply(aux["teacher"], BATCH["image"], return_features=True)
    from tl_jax.objectives.distill import distillation_loss
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
