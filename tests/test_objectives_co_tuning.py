"""Co-Tuning: the category relationship and soft targets; end to end (with feature distillation from its source)."""
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.co_tuning import category_relationship, co_tuning_loss


RNG = np.random.default_rng(0)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_co_tuning_relationship_and_soft_targets():
    probs = softmax(RNG.normal(size=(7, 5)))
    labels = np.array([0, 1, 0, 2, 1, 0, 2])
    m = category_relationship(jnp.asarray(probs), jnp.asarray(labels), 4)
    for t in range(3):
        np.testing.assert_allclose(m[t], probs[labels == t].mean(0), rtol=1e-5)
    np.testing.assert_allclose(m[3], np.full(5, 0.2), rtol=1e-6)   # class 3 has no example: uniform
    s = RNG.normal(size=(7, 5))
    logq = np.log(softmax(s))
    want = -np.mean(np.sum(np.asarray(m)[labels] * logq, 1))
    np.testing.assert_allclose(float(co_tuning_loss(jnp.asarray(s), jnp.asarray(labels), m)), want, rtol=1e-5)


TGT_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]


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
