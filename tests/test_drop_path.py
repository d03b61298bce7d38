"""Stochastic depth (tl_jax/models/layers.py drop_path / DropPath) in the zoo ResNet and ViT, against numpy.

The reference recomputes each call's mask from the call's own key: ``keep_b = U_b < 1 - p`` with
``U = jax.random.uniform(key, (B,))`` (what a Bernoulli draw is), then ``out_b = keep_b * x_b / (1 - p)`` in numpy;
the block outputs are rebuilt in numpy from the captured branch and shortcut values.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.models import get_model
from tl_jax.models import layers
from tl_jax.models.layers import drop_path, drop_path_rates

VIT = dict(patch_size=4, hidden_size=16, depth=3, num_heads=2, mlp_dim=32)
RESNET = dict(base_width=4, stem="cifar")


def reference(x: np.ndarray, rate: float, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """numpy drop path: ``(out, keep)`` with keep from the key's uniforms."""
    keep = np.asarray(jax.random.uniform(key, (x.shape[0],))) < 1.0 - rate
    return np.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x / (1.0 - rate), 0.0), keep


@pytest.fixture
def calls(monkeypatch):
    """Records every drop_path call made by DropPath: ``(x, rate, key, out)``, in call order."""
    seen = []

    def recording(x, rate, rng):
        out = drop_path(x, rate, rng)
        seen.append((np.asarray(x), rate, rng, np.asarray(out)))
        return out

    monkeypatch.setattr(layers, "drop_path", recording)
    return seen


def test_drop_path_per_example_against_numpy():
    x = np.random.default_rng(0).normal(size=(64, 3, 5)).astype(np.float32)
    key = jax.random.key(7)
    out = np.asarray(drop_path(jnp.asarray(x), 0.3, key))
    want, keep = reference(x, 0.3, key)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert 0 < keep.sum() < 64  # both outcomes occur


def test_schedule_is_linear_in_the_block_index():
    np.testing.assert_allclose(drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.3, 1) == [0.0] and drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop_path_rate must be in"):
            drop_path_rates(bad, 3)


def _apply(model, v, x, key=1, **kw):
    return model.apply(v, x, train=True, rngs={"dropout": jax.random.key(key)}, mutable=["batch_stats", "intermediates"],
                       **kw)


def test_resnet_drops_each_residual_branch_per_example(calls):
    model = get_model("resnet18", 3, drop_path_rate=0.5, **RESNET)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8, 8, 3)), jnp.float32)
    v = model.init(jax.random.key(0), x)
    _, st = _apply(model, v, x, capture_intermediates=True)
    # 8 blocks: rate 0.5 * i / 7 for i = 1..7 (block 0 has rate 0: no draw)
    np.testing.assert_allclose([c[1] for c in calls], [0.5 * i / 7 for i in range(1, 8)])
    for xs, rate, key, out in calls:
        np.testing.assert_allclose(out, reference(xs, rate, key)[0], rtol=1e-6)
    assert 0 < np.mean([reference(*c[:3])[1].mean() for c in calls]) < 1
    inter = st["intermediates"]["backbone"]
    block_in = np.asarray(inter["layer1_0"]["__call__"][0])  # layer1_1: identity shortcut, the first drawn block
    np.testing.assert_allclose(calls[0][0], np.asarray(inter["layer1_1"]["bn2"]["__call__"][0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(inter["layer1_1"]["__call__"][0]),
                               np.maximum(block_in + calls[0][3], 0.0), rtol=1e-5, atol=1e-6)


def test_vit_drops_attention_and_mlp_branches_per_example(calls):
    model = get_model("vit", 3, drop_path_rate=0.4, **VIT)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8, 8, 3)), jnp.float32)
    v = model.init(jax.random.key(0), x)
    _apply(model, v, x)
    calls.clear()
    _, st = _apply(model, v, x, capture_intermediates=True)
    np.testing.assert_allclose([c[1] for c in calls], [0.2, 0.2, 0.4, 0.4])  # blocks 1, 2: attention then MLP
    for xs, rate, key, out in calls:
        np.testing.assert_allclose(out, reference(xs, rate, key)[0], rtol=1e-6)
    inter = st["intermediates"]["backbone"]
    b1, b2 = (np.asarray(inter[f"encoderblock_{i}"]["__call__"][0]) for i in (1, 2))
    np.testing.assert_allclose(calls[2][0], inter["encoderblock_2"]["MultiHeadDotProductAttention_0"]["__call__"][0],
                               rtol=1e-6)
    np.testing.assert_allclose(calls[3][0], inter["encoderblock_2"]["MlpBlock_0"]["__call__"][0], rtol=1e-6)
    np.testing.assert_allclose(b2, b1 + calls[2][3] + calls[3][3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("resnet18", RESNET), ("vit", VIT)])
def test_rate_zero_is_bit_identical_and_eval_is_deterministic(name, kw, calls):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
    plain, off, on = get_model(name, 3, **kw), get_model(name, 3, drop_path_rate=0.0, **kw), \
        get_model(name, 3, drop_path_rate=0.3, **kw)
    v = plain.init(jax.random.key(0), x)
    assert jax.tree.all(jax.tree.map(np.array_equal, v, on.init(jax.random.key(0), x)))
    np.testing.assert_array_equal(_apply(plain, v, x)[0], _apply(off, v, x)[0])
    np.testing.assert_array_equal(plain.apply(v, x), on.apply(v, x))  # eval: no draw
    np.testing.assert_array_equal(on.apply(v, x, rngs={"dropout": jax.random.key(5)}), plain.apply(v, x))
    assert not calls  # neither rate 0 nor eval ever drew
    assert not np.array_equal(_apply(on, v, x)[0], _apply(plain, v, x)[0])


@pytest.mark.slow
@pytest.mark.parametrize("model,kwargs", [
    ("resnet18", RESNET), ("vit", dict(patch_size=7, hidden_size=16, depth=2, num_heads=2, mlp_dim=32))])
def test_few_step_training_with_drop_path(tmp_path, tfds_data_dir, model, kwargs):
    from tl_jax.train.loop import train  # deferred: the training stack, for this end-to-end test only

    def run(name, rate):
        c = config_lib.load_config(f"tests/configs/tiny.py:steps=2,model={model}")
        c.data.data_dir = tfds_data_dir
        c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 2
        c.model.kwargs = dict(kwargs, drop_path_rate=rate)
        train(c, str(tmp_path / name))
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    with_dp, without = run("dp", 0.3), run("plain", 0.0)
    assert with_dp and np.all(np.isfinite(with_dp)) and with_dp != without
