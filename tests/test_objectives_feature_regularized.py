"""Feature-space regularisers (BSS, DELTA, Co-Tuning): the shared loss, config errors, end to end, exact resume."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest
import shutil

from tl_jax import config as config_lib
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.bss import bss_loss
from tl_jax.params.param_rules import flatten_paths
from conftest import RUN_FILES, workdir_files
from objective_setup import BATCH, TGT_PP, outputs, setup


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


@pytest.mark.parametrize("name, key, value, match", [
    ("bss", "k", 0, r"config.objective.bss.k must be an int in \[1, config.data.batch_size"),
    ("delta", "weight", -1.0, r"config.objective.delta.weight must be a finite number >= 0"),
    ("delta", "temperature", 0.0, r"config.objective.delta.temperature must be a finite number > 0"),
    ("co_tuning", "source", "", r"config.objective.co_tuning.source is empty and so is config.init_from"),
])
def test_bad_config_is_named(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        setup(name, **{key: value})


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
