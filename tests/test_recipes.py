"""Fine-tuning recipes as config switches: gradient accumulation, EMA of weights, layer-wise lr decay, WiSE-FT."""
from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.programs import pure_train_step

TINY = pathlib.Path(__file__).parent / "configs" / "tiny.py"


def tiny_config(**over):
    spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(None)
    for dotted, v in over.items():
        node = c
        *parts, last = dotted.split(".")
        for p in parts:
            node = node[p]
        node[last] = v
    return c


def _batch(n=16, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, 14, 14, 1)).astype(np.float32),
            "label": r.integers(0, 10, n).astype(np.int32)}


def _step(c, batch):
    objective, tx, state = build_model_and_state(c, 10, {k: v[:1] for k, v in batch.items()}, mesh_lib.make_mesh(1))
    fn = jax.jit(pure_train_step(c, objective, tx, state.params, grad_norm=True))
    return fn(state, batch)


# -- 1. gradient accumulation -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_big_batch_step(k):
    """k micro-batches of B/k, one update == one step on the B examples (CNN: no BatchNorm, no dropout)."""
    batch = _batch()
    big, m_big = _step(tiny_config(**{"optimizer.name": "sgd", "optimizer.learning_rate": 0.5}), batch)
    acc, m_acc = _step(tiny_config(**{"optimizer.name": "sgd", "optimizer.learning_rate": 0.5,
                                      "optimizer.accum_steps": k}), batch)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the update is not trivially zero: the params moved
    _, _, s0 = build_model_and_state(tiny_config(), 10, {k_: v[:1] for k_, v in batch.items()}, mesh_lib.make_mesh(1))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(s0.params)))
    assert moved > 1e-3
    np.testing.assert_allclose(float(m_acc["train/loss"]), float(m_big["train/loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_acc["train/grad_norm"]), float(m_big["train/grad_norm"]), rtol=1e-4)
    assert int(acc.step) == 1


def test_accumulation_batchnorm_runs_and_updates_stats_per_micro_batch():
    """ResNet (BatchNorm): documented as not exact; the stats get k sequential updates and stay finite."""
    batch = _batch()
    c = tiny_config(**{"model.name": "resnet18", "model.kwargs": {"base_width": 4, "stem": "cifar"},
                       "optimizer.accum_steps": 2})
    state, metrics = _step(c, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.batch_stats))


@pytest.mark.parametrize("k, msg", [(3, "must divide config.data.batch_size=16"), (0, "int >= 1"),
                                    (True, "int >= 1")])
def test_accum_steps_bad_input_is_one_line(k, msg):
    c = tiny_config(**{"optimizer.accum_steps": k})
    with pytest.raises(config_lib.ConfigError, match="config.optimizer.accum_steps") as e:
        config_lib.validate(c)
    assert msg in str(e.value) and "\n" not in str(e.value)


# -- 2. EMA of the weights ------------------------------------------------------------------------------------

def test_ema_update_matches_numpy_over_two_steps():
    from tl_jax.train import ema as ema_lib

    c = tiny_config(**{"optimizer.name": "sgd", "optimizer.learning_rate": 0.5, "train.ema_decay": 0.9})
    batch = _batch()
    objective, tx, state = build_model_and_state(c, 10, {k: v[:1] for k, v in batch.items()}, mesh_lib.make_mesh(1))
    state = ema_lib.attach(state, c.train.ema_decay)
    assert isinstance(state, ema_lib.EmaTrainState)
    fn = jax.jit(pure_train_step(c, objective, tx, state.params, grad_norm=True))
    thetas = [jax.tree.map(np.asarray, state.params)]
    for seed in (0, 1):
        state, _ = fn(state, _batch(seed=seed))
        thetas.append(jax.tree.map(np.asarray, state.params))
    ref = jax.tree.map(lambda t0, t1, t2: 0.9 * (0.9 * t0 + 0.1 * t1) + 0.1 * t2, *thetas)
    for e, r, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(ref), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(e), r, rtol=1e-6, atol=1e-7)
        assert not np.allclose(np.asarray(e), p)  # the average lags the params


def test_ema_off_keeps_the_plain_state():
    from tl_jax.train import ema as ema_lib
    from tl_jax.train.state import TrainState

    batch = _batch()
    _, _, state = build_model_and_state(tiny_config(), 10, {k: v[:1] for k, v in batch.items()},
                                        mesh_lib.make_mesh(1))
    assert type(ema_lib.attach(state, 0.0)) is TrainState


@pytest.mark.parametrize("d", [1.0, -0.1, 1.5])
def test_ema_decay_bad_input_is_one_line(d):
    c = tiny_config(**{"train.ema_decay": d})
    with pytest.raises(config_lib.ConfigError, match=r"config.train.ema_decay must be a number in \[0, 1\)") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def _restored_ema(wd, c):
    from tl_jax.train import ema as ema_lib
    from tl_jax.train.checkpoint import Checkpoints

    batch = _batch()
    _, _, target = build_model_and_state(c, 10, {k: v[:1] for k, v in batch.items()}, mesh_lib.make_mesh(1))
    target = ema_lib.attach(target, c.train.ema_decay)
    ck = Checkpoints(pathlib.Path(wd) / "checkpoints", async_save=False)
    try:
        step, state, _ = ck.restore_latest(target)
    finally:
        ck.close()
    return step, state


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_resumed_exactly(tmp_path, tfds_data_dir):
    """8 steps in one go == 4 steps then the same run continued to 8 (a larger train.steps): same EMA, bit for
    bit, and test/ema/* logged at every eval."""
    import json

    from tl_jax.train.loop import train

    def cfg(steps):
        c = tiny_config(**{"train.ema_decay": 0.8, "train.steps": steps})
        c.data.data_dir = tfds_data_dir
        return c

    one = train(cfg(8), str(tmp_path / "one"))
    train(cfg(4), str(tmp_path / "two"))
    two = train(cfg(8), str(tmp_path / "two"))
    assert 0.0 <= one["test/ema/accuracy"] <= 1.0 and one["test/ema/accuracy"] == two["test/ema/accuracy"]
    assert one["test/accuracy"] == two["test/accuracy"]
    evals = [r for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
             if "test/accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8] and all("test/ema/loss" in r for r in evals)
    s1, a = _restored_ema(tmp_path / "one", cfg(8))
    s2, b = _restored_ema(tmp_path / "two", cfg(8))
    assert s1 == s2 == 8
    for x, y, p in zip(jax.tree.leaves(a.ema), jax.tree.leaves(b.ema), jax.tree.leaves(a.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.allclose(np.asarray(x), np.asarray(p)) for x, p in zip(jax.tree.leaves(a.ema),
                                                                              jax.tree.leaves(a.params)))


# -- 3. layer-wise learning-rate decay ------------------------------------------------------------------------

# (model, model_kwargs, the expected depth order of a few param paths, lowest first)
DECAY_CASES = [
    ("cnn", None, ["backbone/conv1/kernel", "backbone/conv2/kernel", "backbone/fc/kernel", "head/kernel"]),
    ("cnn_nnx", None, ["backbone/conv1/kernel", "backbone/conv2/kernel", "backbone/fc/kernel", "head/kernel"]),
    ("resnet18", None, ["backbone/conv1/kernel", "backbone/layer1_0/conv1/kernel", "backbone/layer2_1/bn2/scale",
                        "backbone/layer3_0/downsample_conv/kernel", "backbone/layer4_1/conv2/kernel", "head/kernel"]),
    ("resnet50", None, ["backbone/bn1/scale", "backbone/layer1_2/conv3/kernel", "backbone/layer2_3/conv1/kernel",
                        "backbone/layer3_5/bn3/bias", "backbone/layer4_2/conv1/kernel", "head/kernel"]),
    ("vit", {"depth": 3}, ["backbone/pos_embedding", "backbone/encoderblock_0/LayerNorm_0/scale",
                           "backbone/encoderblock_1/MlpBlock_0/Dense_0/kernel",
                           "backbone/encoderblock_2/MultiHeadDotProductAttention_0/query/kernel", "head/kernel"]),
    ("bert", {"num_layers": 2}, ["backbone/embeddings/word_embeddings/embedding",
                                 "backbone/layer_0/attention/query/kernel", "backbone/layer_1/output_norm/scale",
                                 "head/kernel"]),
]


@pytest.mark.parametrize("name, kwargs, order", DECAY_CASES, ids=[c[0] for c in DECAY_CASES])
def test_layer_decay_multipliers_increase_with_depth_and_cover_every_param(name, kwargs, order):
    from tl_jax.params.layer_decay import default_params, layer_decay
    from tl_jax.params.param_rules import match_rules
    from tl_jax.util.tree_paths import flatten_paths

    params = default_params(name, kwargs)
    rules = layer_decay(name, 0.5, params)
    mults = [m for _, m in rules]
    assert all(a < b for a, b in zip(mults, mults[1:])) and mults[-1] == 1.0
    assert mults == [0.5 ** (len(rules) - 1 - d) for d in range(len(rules))]  # rate ** (d_max - d)
    per_param = match_rules(params, rules)  # raises on an unmatched param or a dead rule
    assert set(per_param) == set(flatten_paths(params))
    got = [per_param[p] for p in order]
    assert all(a < b for a, b in zip(got, got[1:])), got
    assert len(rules) == len(order) or name.startswith(("vit", "bert"))  # cnn: 4 depths, resnet: stem, 4 stages, head


def test_layer_decay_without_params_uses_the_default_model_and_runs_as_config_rules():
    from tl_jax.params.layer_decay import layer_decay
    from tl_jax.params.param_rules import ParamGroups

    rules = layer_decay("cnn", 0.7)
    assert [r for r, _ in rules] == ["backbone/conv1/.*", "backbone/conv2/.*", "backbone/fc/.*", "head/.*"]
    np.testing.assert_allclose([m for _, m in rules], [0.7 ** 3, 0.7 ** 2, 0.7, 1.0])
    c = tiny_config(**{"param_rules": rules})
    batch = _batch()
    objective, tx, state = build_model_and_state(c, 10, {k: v[:1] for k, v in batch.items()}, mesh_lib.make_mesh(1))
    assert isinstance(objective.param_groups, ParamGroups)
    fn = jax.jit(pure_train_step(c, objective, tx, state.params, grad_norm=True))
    new, _ = fn(state, batch)
    # Adam's first update is lr * g / (|g| + eps) ~ lr * multiplier * sign(g): the step sizes show the decay
    step = {m: float(np.abs(np.asarray(new.params[g][m]["kernel"]) - np.asarray(state.params[g][m]["kernel"])).max())
            for g, m in [("backbone", "conv1"), ("backbone", "conv2"), ("backbone", "fc")]}
    step["head"] = float(np.abs(np.asarray(new.params["head"]["kernel"]) - np.asarray(state.params["head"]["kernel"])).max())
    lr = c.optimizer.learning_rate
    np.testing.assert_allclose([step["conv1"], step["conv2"], step["fc"], step["head"]],
                               [lr * 0.7 ** 3, lr * 0.7 ** 2, lr * 0.7, lr], rtol=1e-3)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, True])
def test_layer_decay_bad_rate_is_one_line(rate):
    from tl_jax.params.layer_decay import layer_decay

    with pytest.raises(ValueError, match=r"layer_decay: rate must be in \(0, 1\]") as e:
        layer_decay("cnn", rate)
    assert "\n" not in str(e.value)


def test_layer_decay_unknown_model_is_one_line():
    from tl_jax.params.layer_decay import layer_decay

    with pytest.raises(ValueError, match="no layer depths for model 'mlp'"):
        layer_decay("mlp", 0.7)


# -- 4. WiSE-FT weight interpolation --------------------------------------------------------------------------

def _trees(seed=0):
    r = np.random.default_rng(seed)
    t0 = {"backbone": {"w": r.normal(size=(3, 4)).astype(np.float32), "b": r.normal(size=4).astype(np.float32)},
          "head": {"kernel": r.normal(size=(4, 5)).astype(np.float32)}}
    ft = {"backbone": {"w": r.normal(size=(3, 4)).astype(np.float32), "b": r.normal(size=4).astype(np.float32)},
          "head": {"kernel": r.normal(size=(4, 10)).astype(np.float32)},  # another number of classes
          "extra": {"v": r.normal(size=2).astype(np.float32)}}  # only the fine-tuned model has it
    return t0, ft


def test_interpolate_endpoints_are_exact_and_half_is_the_mean():
    from tl_jax.params.interpolate import interpolate

    t0, ft = _trees()
    a0, a1, half = interpolate(t0, ft, 0.0), interpolate(t0, ft, 1.0), interpolate(t0, ft, 0.5)
    for k in ("w", "b"):
        np.testing.assert_array_equal(a0["backbone"][k], t0["backbone"][k])
        np.testing.assert_array_equal(a1["backbone"][k], ft["backbone"][k])
        np.testing.assert_allclose(half["backbone"][k], np.mean([t0["backbone"][k], ft["backbone"][k]], axis=0),
                                   rtol=1e-7)
        assert half["backbone"][k].dtype == np.float32
    for a in (a0, half, a1):  # no pretrained value of the same shape: the fine-tuned one
        np.testing.assert_array_equal(a["head"]["kernel"], ft["head"]["kernel"])
        np.testing.assert_array_equal(a["extra"]["v"], ft["extra"]["v"])
    q = interpolate(t0, ft, 0.25)
    np.testing.assert_allclose(q["backbone"]["w"], 0.75 * t0["backbone"]["w"] + 0.25 * ft["backbone"]["w"], rtol=1e-6)


def test_interpolate_keeps_params_matched_by_keep():
    from tl_jax.params.interpolate import interpolate

    t0, ft = _trees()
    out = interpolate(t0, ft, 0.0, keep=["backbone/b"])
    np.testing.assert_array_equal(out["backbone"]["b"], ft["backbone"]["b"])
    np.testing.assert_array_equal(out["backbone"]["w"], t0["backbone"]["w"])


@pytest.mark.parametrize("text", ["a,b", "", "0,nan"])
def test_bad_alphas_are_one_line(text):
    from tl_jax.params.interpolate import parse_alphas

    with pytest.raises(ValueError, match="--alphas") as e:
        parse_alphas(text)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_tl_jax_interpolate_end_to_end(tmp_path, tfds_data_dir, capsys):
    """Pretrain 4 steps, fine-tune 4 steps from it, then `tl-jax interpolate`: α=1 reproduces the fine-tuned
    run's test accuracy, and the CSV and the plot are written."""
    import csv

    from tl_jax import cli
    from tl_jax.train.loop import train

    pre = tiny_config(**{"train.steps": 4})
    pre.data.data_dir = tfds_data_dir
    train(pre, str(tmp_path / "pre"))
    ft = tiny_config(**{"train.steps": 4, "optimizer.learning_rate": 3e-3, "seed": 1})
    ft.data.data_dir = tfds_data_dir
    ft.init_from = str(tmp_path / "pre")
    summary = train(ft, str(tmp_path / "ft"))
    out = tmp_path / "wise"
    assert cli.main(["interpolate", "--finetuned", str(tmp_path / "ft"), "--alphas", "0,0.5,1",
                     "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "wise_ft.csv")))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0]
    assert float(rows[-1]["accuracy"]) == pytest.approx(summary["test/accuracy"], abs=1e-6)
    assert (out / "wise_ft.png").stat().st_size > 1000
    assert "alpha=0.5" in capsys.readouterr().out
    # --split val: α chosen on the run's validation set (the examples training validated on)
    ft_val = tiny_config(**{"train.steps": 4, "optimizer.learning_rate": 3e-3, "seed": 1,
                            "data.val_fraction": 0.2, "data.shots": 20})
    ft_val.data.data_dir = tfds_data_dir
    ft_val.init_from = str(tmp_path / "pre")
    summary_val = train(ft_val, str(tmp_path / "ft_val"))
    assert cli.main(["interpolate", "--finetuned", str(tmp_path / "ft_val"), "--alphas", "0,1", "--split", "val",
                     "--out", str(tmp_path / "wise_val")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "wise_val" / "wise_ft.csv")))
    assert float(rows[-1]["accuracy"]) == pytest.approx(summary_val["val/accuracy"], abs=1e-6)
    assert int(rows[-1]["count"]) == 800  # 20 % of mnist5k's 4,000 train digits, stratified
    assert cli.main(["eval", "--workdir", str(tmp_path / "ft_val"), "--split", "val"]) == 0
    assert f"accuracy={summary_val['val/accuracy']:.4f}" in capsys.readouterr().out
    # bad input: one line, nothing written
    assert cli.main(["interpolate", "--finetuned", str(tmp_path / "ft"), "--alphas", "x",
                     "--out", str(tmp_path / "none")]) != 0
    assert not (tmp_path / "none").exists()
