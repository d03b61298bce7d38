"""The own-model contract (docs/models.md#the-own-model-contract): features from a backbone/head split, and a
one-line error naming the contract and the flag to use when a model gives no features."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.models import contract, get_model
from tl_jax.transferability.extract import Candidate, extract

X = np.random.default_rng(0).normal(size=(5, 6, 6, 1)).astype(np.float32)
NNX_FILE = '''
from flax import nnx


class Backbone(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class Net(nnx.Module):
    def __init__(self, num_classes, *, rngs):
        self.backbone = Backbone(rngs)
        self.head = nnx.Linear(4, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x).mean(axis=(1, 2)))
'''


class LinenSplit(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train=False):
        h = nn.relu(nn.Conv(4, (3, 3), name="backbone")(x)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(h)


class NoSplit(nn.Module):  # no backbone/head names, no return_features: no features
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class TwiceSplit(nn.Module):  # the backbone runs twice: its output is not "the" features
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train=False):
        body = nn.Dense(3, name="backbone")
        return nn.Dense(self.num_classes, name="head")(body(x) + body(x))


def _candidate(model, where=""):
    return Candidate("runs/mine", model, model.init(jax.random.PRNGKey(0), jnp.asarray(X)), 3, where=where)


def test_nnx_split_features_are_the_backbone_output(tmp_path):
    (tmp_path / "own.py").write_text(NNX_FILE)
    model = get_model(f"{tmp_path}/own.py:Net", 3)
    cand = _candidate(model)
    assert not contract.takes_return_features(model) and contract.has_split(cand.variables["params"])
    feats, logits = extract(cand, {"image": X, "label": np.zeros(5, np.int32)}, "features", batch_size=2)
    p, s = cand.variables["params"], cand.variables["batch_stats"]
    conv = jax.lax.conv_general_dilated(X, p["backbone"]["conv"]["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["backbone"]["conv"]["bias"]
    bn = s["backbone"]["bn"]
    ref = np.maximum((conv - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * p["backbone"]["bn"]["scale"]
                     + p["backbone"]["bn"]["bias"], 0)  # eval mode: running statistics
    np.testing.assert_allclose(feats, np.asarray(ref).mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)  # [B,H,W,C] averaged
    np.testing.assert_allclose(logits, model.apply(cand.variables, X), rtol=1e-5, atol=1e-6)
    # a model never initialised in this process (as `tl-jax rank` loads it): the bridge builds it on the first call
    fresh = Candidate("runs/mine", get_model(f"{tmp_path}/own.py:Net", 3), cand.variables, 3)
    again, _ = extract(fresh, {"image": X, "label": np.zeros(5, np.int32)}, "features", batch_size=2)
    np.testing.assert_allclose(again, feats, rtol=1e-6)


def test_linen_compact_split_features_and_replacement():
    model = LinenSplit(3)
    cand = _candidate(model)
    (logits, feats) = contract.logits_and_features(model, cand.variables, X, train=False)
    p = cand.variables["params"]
    conv = nn.Conv(4, (3, 3)).apply({"params": p["backbone"]}, X)
    np.testing.assert_allclose(feats, conv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, model.apply(cand.variables, X), rtol=1e-6)
    # replaced: the backbone does not run (its input may be anything), the rest of __call__ does
    replaced, given = contract.apply_split(model, cand.variables, jnp.zeros_like(X), features=feats, train=False)
    assert given is feats
    np.testing.assert_allclose(replaced, logits, rtol=1e-6)


def test_no_features_is_one_line_naming_the_contract_and_the_flag():
    cand = _candidate(NoSplit(3), where="--workdir runs/mine")
    with pytest.raises(ValueError) as e:
        extract(cand, {"image": X, "label": np.zeros(5, np.int32)}, "features", batch_size=5)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--workdir runs/mine: model NoSplit gives no features")
    assert "docs/models.md#the-own-model-contract" in msg and "--layer logits" in msg
    feats, logits = extract(cand, {"image": X, "label": np.zeros(5, np.int32)}, "logits", batch_size=5)
    np.testing.assert_array_equal(feats, logits)  # the flag it names works


def test_a_backbone_called_twice_is_refused():
    model = TwiceSplit(3)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="ran 2 times.*exactly one call"):
        contract.apply_split(model, variables, jnp.ones((2, 4)), train=False)


def test_return_features_is_detected_through_the_bridge_and_precision():
    from tl_jax.models.precision import MixedPrecision

    assert contract.takes_return_features(get_model("cnn", 3))
    assert contract.takes_return_features(get_model("cnn_nnx", 3))  # NNX twin behind the bridge
    assert contract.takes_return_features(MixedPrecision(get_model("cnn", 3), jnp.bfloat16))
    assert not contract.takes_return_features(NoSplit(3))
