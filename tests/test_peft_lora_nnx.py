"""LoRA on Flax NNX models (tl_jax/peft/lora_nnx.py): the linen LoRA's params, applied in weight space.

Checked against numpy (one Linear: x·W + b + s·x·A·B), against the linen LoRA of the linen twin with the same
params, bit for bit at init, and end to end: an NNX LoRA run trains A/B and the head with the base frozen, and
``tl-jax weights merge`` folds it into a plain checkpoint that the NNX model without PEFT loads and predicts with.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_checks import lora_and_merged_logits
from tl_jax.cli import main
from tl_jax.models import get_model
from tl_jax.models.nnx.bridge import NNXModel
from tl_jax.params.param_rules import flatten_paths
from tl_jax.peft.lora import LORA, LoraModel
from tl_jax.peft.lora_nnx import NnxLoraModel, find_nnx_targets, lora_model
from tl_jax.train.checkpoint import load_variables


class OneLinear(nnx.Module):
    def __init__(self, num_classes: int, rngs: nnx.Rngs):
        self.head = nnx.Linear(6, num_classes, rngs=rngs)

    def __call__(self, x, return_features=False):
        y = self.head(x)
        return (y, x) if return_features else y


def test_output_is_base_plus_scaled_x_a_b_in_numpy():
    model = NnxLoraModel(NNXModel(lambda rngs: OneLinear(4, rngs), 4), rank=3, alpha=6.0, targets="head")
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    p = variables["params"]
    b = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    p = {**p, LORA: {"head": {"a": p[LORA]["head"]["a"], "b": jnp.asarray(b)}}}
    got = np.asarray(model.apply({"params": p}, x))
    w, bias, a = (np.asarray(v, np.float64) for v in (p["head"]["kernel"], p["head"]["bias"], p[LORA]["head"]["a"]))
    want = x @ w + bias + (6.0 / 3) * (x @ a) @ b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert p[LORA]["head"]["a"].shape == (6, 3) and model.scale == 2.0


def test_zero_b_leaves_the_model_unchanged_bit_for_bit_and_matches_the_linen_twin():
    x = np.random.default_rng(0).uniform(size=(3, 14, 14, 1)).astype(np.float32)
    nnx_lora = lora_model(get_model("cnn_nnx", 10), rank=2, alpha=4.0, targets=".*")
    linen_lora = lora_model(get_model("cnn", 10), rank=2, alpha=4.0, targets=".*")
    assert isinstance(nnx_lora, NnxLoraModel) and isinstance(linen_lora, LoraModel)
    v = nnx_lora.init(jax.random.PRNGKey(0), x)
    base = {k: val for k, val in v["params"].items() if k != LORA}
    y_base = np.asarray(nnx_lora.module.apply({**v, "params": base}, x))
    np.testing.assert_array_equal(np.asarray(nnx_lora.apply(v, x)), y_base)
    # the same param paths as the linen LoRA of the linen twin, and the same function of them
    lv = linen_lora.init(jax.random.PRNGKey(0), x)
    shapes = lambda t: {k: np.shape(a) for k, a in flatten_paths(t).items()}
    assert shapes(v["params"]) == shapes(lv["params"])
    rng = np.random.default_rng(2)
    moved = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), v["params"])
    y_nnx = np.asarray(nnx_lora.apply({**v, "params": moved}, x))
    y_linen = np.asarray(linen_lora.apply({**lv, "params": moved}, x))
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-4, atol=1e-4 * np.abs(y_linen).max())


def test_targets_and_dropout_are_refused_in_one_line():
    model = NNXModel(lambda rngs: OneLinear(4, rngs), 4)
    with pytest.raises(ValueError, match=r"matches none of the NNX model's .* \['head'\]"):
        find_nnx_targets(model, "backbone/.*", np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match="config.peft.lora.dropout must be 0 for NNX models"):
        lora_model(model, rank=2, alpha=1.0, targets=".*", dropout=0.1)


@pytest.mark.slow
def test_nnx_lora_run_trains_lora_keeps_the_base_and_merges(tmp_path, tfds_data_dir):
    common = ["--config", "tests/configs/tiny.py:steps=4,model=cnn_nnx", f"--config.data.data_dir={tfds_data_dir}",
              "--config.train.feature_cache=false", "--config.model.kwargs={}"]
    assert main(["train", *common, "--workdir", str(tmp_path / "src")]) == 0
    assert main(["train", *common, "--workdir", str(tmp_path / "lora"), "--config.peft.lora.rank=2",
                 f"--config.init_from={tmp_path / 'src'}", "--config.optimizer.learning_rate=0.01"]) == 0
    src = flatten_paths(load_variables(str(tmp_path / "src"))["params"])
    got = flatten_paths(load_variables(str(tmp_path / "lora"))["params"])
    for path, value in src.items():
        if not path.startswith("head/"):
            np.testing.assert_array_equal(got[path], value, err_msg=path)  # the frozen base
    assert any(p.startswith(f"{LORA}/") and p.endswith("/b") and np.any(v != 0) for p, v in got.items())
    out = tmp_path / "merged"
    assert main(["weights", "merge", "--workdir", str(tmp_path / "lora"), "--out", str(out)]) == 0
    y_lora, y_plain, _ = lora_and_merged_logits(tmp_path / "lora", out, 4)
    assert np.max(np.abs(y_plain - y_lora)) <= 1e-5 * np.max(np.abs(y_lora))
