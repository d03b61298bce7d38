"""config.precision: bfloat16 compute with float32 params, gradients, statistics and optimizer state.

The loss curves come from the same batches of the embedded mnist5k digits (14x14, batch 32) and the same
init, so a bf16 run differs from the float32 one only by rounding; the measured gap of the tiny CNN over
30 Adam steps (loss 2.37 -> ~0.9) is 0.015 at most and 0.004 on average (bf16 moments too: 0.021 / 0.004).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.models import precision
from tl_jax.objectives.base import apply_model
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.programs import pure_train_step

TINY = "tests/configs/tiny.py"
STEPS, B = 30, 32
MAX_GAP, MEAN_GAP = 0.05, 0.015  # |loss_bf16 - loss_f32| per step: at most, and averaged over the steps

# A user's linen module (config.model.name='file.py:net'): layers with flax's default dtype=None, a BatchNorm.
USER_NET = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def net(num_classes):
    return Net(num_classes)
'''


@pytest.fixture(scope="module")
def digits():
    """``STEPS`` batches of ``B`` mnist5k digits, 2x2-mean-pooled to 14x14 and scaled to [0, 1]."""
    from tl_jax.data.builders import _load_mnist5k

    images, labels = _load_mnist5k()
    idx = np.random.default_rng(0).permutation(len(labels))[:STEPS * B]
    x = images[idx].astype(np.float32).reshape(-1, 14, 2, 14, 2, 1).mean((2, 4)) / 255.0
    return x, labels[idx].astype(np.int32)


def make_config(compute="float32", moments="float32", **over):
    c = config_lib.load_config(TINY)
    c.data.batch_size = B
    c.precision.compute, c.precision.moments = compute, moments
    for key, value in over.items():
        config_lib.set_value(c, key, value)
    config_lib.validate(c)
    return c


def build(c, digits):
    x, y = digits
    return build_model_and_state(c, 10, {"image": x[:1], "label": y[:1]}, mesh_lib.make_mesh(1))


def losses(c, digits, steps=STEPS):
    """The train/loss of each of ``steps`` steps, and the final state."""
    x, y = digits
    objective, tx, state = build(c, digits)
    step = jax.jit(pure_train_step(c, objective, tx, state.params, grad_norm=False))
    out = []
    for s in range(steps):
        state, metrics = step(state, {"image": x[s * B:(s + 1) * B], "label": y[s * B:(s + 1) * B]})
        out.append(float(metrics["train/loss"]))
    return np.asarray(out), state


def matmul_dtypes(objective, state, digits) -> set[str]:
    """Element types of the operands of every convolution and dot of the compiled train-mode forward pass."""
    x, y = digits
    batch = {"image": x[:B], "label": y[:B]}

    def forward(params, batch_stats):
        return apply_model(objective.model, params, batch_stats, batch, train=True, rng=jax.random.PRNGKey(0))

    text = jax.jit(forward).lower(state.params, state.batch_stats).as_text()
    found = set()
    for line in text.splitlines():
        if "stablehlo.convolution" in line or "stablehlo.dot_general" in line:
            operands = line.rsplit(" : (", 1)[1].split(") -> ")[0]
            found |= set(re.findall(r"tensor<(?:[\d?]+x)*(\w+)>", operands))
    assert found, "no convolution or dot in the forward pass"
    return found


def floating_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def f32_curve(digits):
    return losses(make_config(), digits)[0]


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_bf16_loss_curve_stays_within_tolerance_of_float32(digits, f32_curve, moments):
    bf16, state = losses(make_config("bfloat16", moments), digits)
    gap = np.abs(bf16 - f32_curve)
    assert gap.max() < MAX_GAP and gap.mean() < MEAN_GAP, (gap.max(), gap.mean())
    assert not np.array_equal(bf16, f32_curve)  # it did compute in another precision
    assert f32_curve[-5:].mean() < 0.5 * f32_curve[0]  # and the curve is a real one: the loss fell
    assert floating_dtypes(state.params) == {"float32"}


def test_forward_computes_in_bf16_and_float32_stays_float32(digits):
    objective, _, state = build(make_config("bfloat16"), digits)
    assert isinstance(objective.model, precision.MixedPrecision)
    assert matmul_dtypes(objective, state, digits) == {"bf16"}
    logits, _ = apply_model(objective.model, state.params, {}, {"image": digits[0][:2]}, train=False)
    assert logits.dtype == jnp.float32
    objective, _, state = build(make_config(), digits)  # the default: the model itself, unchanged
    assert not isinstance(objective.model, precision.MixedPrecision)
    assert matmul_dtypes(objective, state, digits) == {"f32"}


def test_state_params_and_optimizer_moments_dtypes(digits):
    """Params, gradients (hence the update) and Adam's nu in float32; mu in bf16 only when asked."""
    for moments, mu in (("float32", "float32"), ("bfloat16", "bfloat16")):
        _, state = losses(make_config("bfloat16", moments), digits, steps=1)
        paths = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        mus = {str(x.dtype) for p, x in paths if ".mu" in jax.tree_util.keystr(p)}
        nus = {str(x.dtype) for p, x in paths if ".nu" in jax.tree_util.keystr(p)}
        assert mus == {mu} and nus == {"float32"}, (moments, mus, nus)
        assert floating_dtypes(state.params) == {"float32"}
    _, state = losses(make_config("bfloat16", "bfloat16", **{"optimizer.name": "sgd"}), digits, steps=1)
    assert floating_dtypes(state.opt_state) == {"bfloat16"}  # SGD's momentum trace


def test_nnx_model_computes_in_bf16_and_tracks_float32(digits):
    f32, _ = losses(make_config(**{"model.name": "cnn_nnx"}), digits, steps=5)
    c = make_config("bfloat16", **{"model.name": "cnn_nnx"})
    bf16, state = losses(c, digits, steps=5)
    assert np.abs(bf16 - f32).max() < MAX_GAP
    assert floating_dtypes(state.params) == {"float32"}
    objective, _, state = build(c, digits)
    assert matmul_dtypes(objective, state, digits) == {"bf16"}


def test_users_linen_module_with_batchnorm(tmp_path, digits):
    """No dtype argument: the boundary's casts alone make it compute in bf16; its statistics stay float32."""
    (tmp_path / "user_net.py").write_text(USER_NET)
    name = f"{tmp_path / 'user_net.py'}:net"
    f32, _ = losses(make_config(**{"model.name": name}), digits, steps=5)
    c = make_config("bfloat16", **{"model.name": name})
    bf16, state = losses(c, digits, steps=5)
    assert np.abs(bf16 - f32).max() < MAX_GAP
    assert floating_dtypes(state.params) == floating_dtypes(state.batch_stats) == {"float32"}
    assert state.batch_stats  # and they were updated in float32 by the steps
    objective, _, state = build(c, digits)
    assert matmul_dtypes(objective, state, digits) == {"bf16"}


def test_wrapper_delegates_and_clones_under_the_policy():
    from tl_jax.models import get_model

    model = precision.wrap(get_model("cnn", 10, dtype=jnp.bfloat16), {"compute": "bfloat16", "moments": "float32"})
    clone = model.clone(dropout_rate=0.5)  # build's frozen_norms and pmap's norm_axis_name clones go this way
    assert isinstance(clone, precision.MixedPrecision) and clone.dropout_rate == 0.5 and clone.num_classes == 10
    assert precision.unwrap(clone).dropout_rate == 0.5
    assert precision.wrap(model, {"compute": "float16", "moments": "float32"}).dtype == jnp.float16  # not nested
    assert precision.model_kwargs({"name": "cnn"}, {"compute": "bfloat16", "moments": "float32"}) == \
        {"dtype": jnp.bfloat16}
    assert precision.model_kwargs({"name": "cnn", "kwargs": {"dtype": "float32"}},
                                  {"compute": "bfloat16", "moments": "float32"}) == {}  # the user's choice wins


@pytest.mark.parametrize("key, value", [("compute", "bf16"), ("compute", "int8"), ("moments", "float16"),
                                        ("moments", "")])
def test_bad_values_are_one_line_errors(key, value):
    c = config_lib.load_config(TINY)
    config_lib.apply_overrides(c, [f"precision.{key}={value}"])
    with pytest.raises(config_lib.ConfigError, match=rf"config\.precision\.{key} must be one of") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"config\.precision\.{key} must be one of"):
        precision.check(c.precision)


def test_a_non_string_precision_is_refused_by_the_schema():
    with pytest.raises(config_lib.ConfigError, match=r"config\.precision\.compute: expected str") as e:
        config_lib.apply_overrides(config_lib.load_config(TINY), ["precision.compute=16"])
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_bf16_probe_run_with_feature_cache_checkpoint_and_eval(tmp_path, tfds_data_dir):
    """A whole run (tl_jax.train.loop.train): a linear probe on cached features in bf16 with bf16 moments; the
    checkpoint as written holds float32 params and nu, bf16 mu; `tl-jax eval` reproduces its test metrics."""
    import orbax.checkpoint as ocp

    from tl_jax.evaluation.saved_run import evaluate_run
    from tl_jax.train.loop import train

    c = config_lib.load_config(f"{TINY}:steps=4")
    config_lib.apply_overrides(c, [f"data.data_dir={tfds_data_dir}", "train.eval_every=0",
                                   "train.checkpoint_every=4", "train.feature_cache=true",
                                   "precision.compute=bfloat16", "precision.moments=bfloat16"])
    c.param_rules = [["backbone/.*", None], [".*", 1.0]]
    summary = train(c, str(tmp_path))
    assert np.isfinite(summary["test/loss"]) and summary["steps"] == 4
    with ocp.StandardCheckpointer() as ckptr:  # no target: the arrays as stored
        saved = ckptr.restore(tmp_path / "checkpoints" / "4" / "state")
    assert floating_dtypes(saved["params"]) == {"float32"}
    flat = {jax.tree_util.keystr(p): str(x.dtype) for p, x in
            jax.tree_util.tree_flatten_with_path(saved["opt_state"])[0] if jnp.issubdtype(x.dtype, jnp.floating)}
    assert {d for k, d in flat.items() if "'mu'" in k} == {"bfloat16"}
    assert {d for k, d in flat.items() if "'mu'" not in k} == {"float32"}
    again = evaluate_run(str(tmp_path))
    assert again["metrics"]["accuracy"] == pytest.approx(summary["test/accuracy"], abs=1e-6)
