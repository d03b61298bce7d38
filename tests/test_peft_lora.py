"""LoRA (tl_jax/peft/lora.py) against numpy references: the delta (alpha/r)·x·A·B for Dense, DenseGeneral
(attention q/k/v/out) and Conv, the zero-B init bit for bit, param counts r·(d_in + d_out), merge exactness,
and the config group's one-line errors and param rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax import peft as peft_lib
from tl_jax.models import contract, get_model
from tl_jax.models import precision as precision_lib
from tl_jax.models.precision import MixedPrecision, unwrap
from tl_jax.peft.lora import LORA, LoraModel, count, find_targets, low_rank, merge_lora, scale
from tl_jax.params.interpolate import interpolate
from tl_jax.params.param_rules import flatten_paths
from tl_jax.peft.merge_run import merge_run
from tl_jax.sweep.plan import plan_groups
from tl_jax.train.build import BEFORE_INIT, Stage, chain


class Net(nn.Module):
    """A conv (stride 2, VALID), attention-style DenseGenerals ([d, h, hd] and [h, hd, d]) and a Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv")(x)  # [B, 3, 3, 4]
        x = nn.relu(x).reshape(x.shape[0], -1)  # [B, 36]
        x = nn.DenseGeneral((2, 3), name="query")(x)  # kernel [36, 2, 3]
        x = nn.DenseGeneral(5, axis=(-2, -1), name="out")(x)  # kernel [2, 3, 5]
        return nn.Dense(3, name="head")(jnp.tanh(x))


X = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)


def _base(variables):
    return {**variables, "params": {k: v for k, v in variables["params"].items() if k != LORA}}


def _randomised(variables, seed=1):
    """``variables`` with every LoRA B drawn from N(0, 1) (B = 0 at init would hide the delta)."""
    rng = np.random.default_rng(seed)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, v: rng.normal(size=v.shape).astype(np.float32) if p[-1].key == "b" else v,
        variables["params"][LORA])
    return {**variables, "params": {**variables["params"], LORA: lora}}


def _conv_valid_np(x, w, stride):
    """numpy conv, VALID padding: ``out[b, i, j, o] = sum_{u,v,c} x[b, s·i+u, s·j+v, c] w[u, v, c, o]``."""
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, stride * i:stride * i + kh, stride * j:stride * j + kw, :]
            out[:, i, j] = np.einsum("buvc,uvco->bo", patch, w)
    return out


def test_zero_init_leaves_the_output_bit_identical():
    model = Net()
    lm = LoraModel(model, rank=2, alpha=4.0, targets=".*")
    v = lm.init(jax.random.PRNGKey(0), X)
    assert all(not np.any(np.asarray(b)) for _, b in peft_lib.lora.lora_pairs(v["params"][LORA]).values())
    assert np.array_equal(np.asarray(lm.apply(v, X)), np.asarray(model.apply(_base(v), X)))
    assert np.array_equal(np.asarray(_base(v)["params"]["conv"]["kernel"]),
                          np.asarray(model.init(jax.random.PRNGKey(0), X)["params"]["conv"]["kernel"]))


@pytest.mark.parametrize("rslora", [False, True])
def test_each_layer_adds_s_x_a_b_against_numpy(rslora):
    """Each adapted layer's output (captured with capture_intermediates) = the base layer's on the same input
    + s·(x⋆A)·B, with x⋆A computed in numpy (a conv by loops for the Conv, tensordot for the Dense kinds)."""
    model = Net()
    lm = LoraModel(model, rank=2, alpha=3.0, targets=".*", rslora=rslora)
    v = _randomised(lm.init(jax.random.PRNGKey(0), X))
    s = 3.0 / (np.sqrt(2) if rslora else 2)
    assert lm.scale == pytest.approx(s)
    _, inter = lm.apply(v, X, capture_intermediates=True, mutable=["intermediates"])
    _, base_inter = model.apply(_base(v), X, capture_intermediates=True, mutable=["intermediates"])
    lora, p = v["params"][LORA], v["params"]
    # the layer inputs: x for conv; relu(conv_out) flattened for query; query_out for out; tanh(out) for head
    conv_out = np.asarray(inter["intermediates"]["conv"]["__call__"][0], np.float64)
    q_out = np.asarray(inter["intermediates"]["query"]["__call__"][0], np.float64)
    o_out = np.asarray(inter["intermediates"]["out"]["__call__"][0], np.float64)
    h_out = np.asarray(inter["intermediates"]["head"]["__call__"][0], np.float64)
    a, b = (np.asarray(lora["conv"][k], np.float64) for k in "ab")
    plain = _conv_valid_np(X.astype(np.float64), np.asarray(p["conv"]["kernel"], np.float64), 2) + p["conv"]["bias"]
    np.testing.assert_allclose(conv_out, plain + s * _conv_valid_np(X.astype(np.float64), a, 2) @ b, rtol=1e-4,
                               atol=1e-4)
    h = np.maximum(conv_out, 0).reshape(2, -1)
    a, b = (np.asarray(lora["query"][k], np.float64) for k in "ab")
    ref = np.tensordot(h, p["query"]["kernel"], 1) + p["query"]["bias"] + s * np.tensordot(h @ a, b, 1)
    np.testing.assert_allclose(q_out, ref, rtol=1e-4, atol=1e-4)
    a, b = (np.asarray(lora["out"][k], np.float64) for k in "ab")  # A [2, 3, r]: contracts the two head axes
    ref = np.tensordot(q_out, p["out"]["kernel"], 2) + p["out"]["bias"] + s * np.tensordot(q_out, a, 2) @ b
    np.testing.assert_allclose(o_out, ref, rtol=1e-4, atol=1e-4)
    a, b = (np.asarray(lora["head"][k], np.float64) for k in "ab")
    t = np.tanh(o_out)
    np.testing.assert_allclose(h_out, t @ p["head"]["kernel"] + p["head"]["bias"] + s * (t @ a) @ b, rtol=1e-4,
                               atol=1e-4)
    assert not np.allclose(np.asarray(lm.apply(v, X)), np.asarray(model.apply(_base(v), X)), atol=1e-3)
    assert set(base_inter["intermediates"]) == set(inter["intermediates"])


def test_param_counts_follow_the_formula_and_targets_select_layers():
    r = 4
    lm = LoraModel(Net(), rank=r, alpha=1.0, targets="query|head")
    lora = lm.init(jax.random.PRNGKey(0), X)["params"][LORA]
    assert sorted(lora) == ["head", "query"]
    assert np.shape(lora["query"]["a"]) == (36, r) and np.shape(lora["query"]["b"]) == (r, 2, 3)
    assert count(lora) == r * (36 + 6) + r * (5 + 3)  # r·(d_in + d_out) per Dense, prod of dims for DenseGeneral
    conv = LoraModel(Net(), rank=r, alpha=1.0, targets="conv").init(jax.random.PRNGKey(0), X)["params"][LORA]
    assert count(conv) == r * (3 * 3 * 3 + 4)  # A: a 3x3 conv from 3 channels to r, B: 1x1 from r to 4
    assert find_targets(Net(), "conv", X)["conv"] == (nn.Conv, 3)


def test_merge_folds_lora_into_the_kernels_exactly():
    model = Net()
    lm = LoraModel(model, rank=3, alpha=6.0, targets=".*")
    v = _randomised(lm.init(jax.random.PRNGKey(0), X))
    merged = merge_lora(v["params"], lm.scale)
    assert LORA not in merged and set(merged) == set(_base(v)["params"])
    y_lora, y_merged = np.asarray(lm.apply(v, X)), np.asarray(model.apply({"params": merged}, X))
    assert np.max(np.abs(y_lora - y_merged)) <= 1e-5 * np.max(np.abs(y_lora))
    w, (a, b) = v["params"]["head"]["kernel"], (v["params"][LORA]["head"][k] for k in "ab")
    np.testing.assert_allclose(merged["head"]["kernel"], np.asarray(w) + 2.0 * np.asarray(a) @ np.asarray(b),
                               rtol=1e-6, atol=1e-6)


def test_errors_name_what_to_fix():
    with pytest.raises(ValueError, match=r"targets='nothing' matches none .*\['conv', 'head', 'out', 'query'\]"):
        LoraModel(Net(), rank=2, alpha=1.0, targets="nothing").init(jax.random.PRNGKey(0), X)

    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (3, 3), feature_group_count=3, name="dw")(x)

    with pytest.raises(ValueError, match="conv dw has feature_group_count=3"):
        LoraModel(Grouped(), rank=2, alpha=1.0, targets=".*").init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="needs a linen model"):
        LoraModel(object(), rank=2, alpha=1.0, targets=".*")
    with pytest.raises(ValueError, match=r"got NNXModel \(NNX models: tl_jax.peft.lora_nnx.NnxLoraModel"):
        LoraModel(get_model("cnn_nnx", 3), rank=2, alpha=1.0, targets=".*")
    with pytest.raises(ValueError, match="no 'lora' subtree"):
        merge_lora({"head": {}}, 1.0)
    assert scale(8, 4) == 2.0 and scale(8, 4, rslora=True) == 4.0


def _config(**overrides):
    c = config_lib.base_config()
    return config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])


def test_config_group_is_off_by_default_and_checked():
    c = config_lib.base_config()
    assert not peft_lib.enabled(c) and peft_lib.param_rules(c, {"head": {"w": 0}}) == [[".*", 1.0]]
    assert peft_lib.dont_load(c) == list(c.dont_load)
    with pytest.raises(ValueError, match=r"config.peft.lora.rank must be an int >= 0"):
        peft_lib.check(_config(**{"peft.lora.rank": -1}))
    with pytest.raises(ValueError, match=r"config.peft.lora.alpha must be > 0"):
        peft_lib.check(_config(**{"peft.lora.rank": 2, "peft.lora.alpha": 0.0}))
    with pytest.raises(ValueError, match=r"config.peft.freeze_base=True sets the param rules"):
        config_lib.validate(_config(**{"peft.lora.rank": 2, "param_rules": '[["head/.*", 1.0]]'}))


def test_default_rules_train_lora_and_head_and_freeze_the_base():
    c = _config(**{"peft.lora.rank": 2})
    params = {"backbone": {"k": 0}, "head": {"k": 0}, LORA: {"backbone": {"a": 0, "b": 0}}}
    assert peft_lib.param_rules(c, params) == [["lora/.*", 1.0], ["head/.*", 1.0], [".*", None]]
    assert peft_lib.param_rules(c, {"Dense_0": {"k": 0}}) == [["lora/.*", 1.0], [".*", None]]  # no head
    c.peft.freeze_base = False  # the user's table as it is
    c.param_rules = [["backbone/.*", 0.1], [".*", 1.0]]
    assert peft_lib.param_rules(c, params) == [["backbone/.*", 0.1], [".*", 1.0]]
    config_lib.validate(c)
    assert peft_lib.dont_load(c) == list(c.dont_load) + ["lora/.*"]


def test_merge_run_names_a_workdir_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--workdir .*: no config.json \(not a tl-jax run\)"):
        merge_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zoo_vit_attention_and_mlp_lora_counts_init_and_merge():
    """LoRA on a tiny zoo ViT's attention q/k/v/out (flax DenseGeneral) and MLP Denses: counts r·(D + D) per
    projection and r·(D + M), r·(M + D) per MLP layer; output unchanged at init; the merge predicts the same."""
    d, m, r, depth = 16, 32, 2, 2
    vit = get_model("vit", 3, patch_size=4, hidden_size=d, depth=depth, num_heads=2, mlp_dim=m)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    targets = r".*MultiHeadDotProductAttention_0/(query|key|value|out)|.*MlpBlock_0/Dense_[01]"
    lm = LoraModel(vit, rank=r, alpha=4.0, targets=targets)
    v = lm.init(jax.random.PRNGKey(0), x, train=False)
    lora = v["params"][LORA]
    assert len(peft_lib.lora.lora_pairs(lora)) == depth * 6
    assert count(lora) == depth * (4 * r * (d + d) + r * (d + m) + r * (m + d))
    assert np.array_equal(np.asarray(lm.apply(v, x, train=False)), np.asarray(vit.apply(_base(v), x, train=False)))
    v = _randomised(v)
    y = np.asarray(lm.apply(v, x, train=False))
    y_merged = np.asarray(vit.apply({"params": merge_lora(v["params"], lm.scale)}, x, train=False))
    assert not np.allclose(y, np.asarray(vit.apply(_base(v), x, train=False)), atol=1e-3)
    assert np.max(np.abs(y - y_merged)) <= 1e-5 * np.max(np.abs(y))


def test_chain_keeps_lora_under_mixed_precision_and_the_split_sees_through_it():
    """BEFORE_INIT with config.peft and bfloat16 compute: MixedPrecision(LoraModel(cnn)); unwrap() reaches the
    zoo model, so the backbone/head split (rank, fewshot, evaluators) runs through LoRA and precision."""
    c = _config(**{"peft.lora.rank": 2, "precision.compute": "bfloat16"})
    cnn = get_model("cnn", 3)
    model = chain(cnn, BEFORE_INIT, Stage(c))
    assert isinstance(model, MixedPrecision) and isinstance(model.module, LoraModel) and unwrap(model) is cnn
    assert contract.module_class(model) is type(cnn)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 1)).astype(np.float32)
    v = _randomised(model.init(jax.random.PRNGKey(0), x, train=False))
    logits, feats = contract.apply_split(model, v, x, train=False)
    logits2, feats2 = contract.logits_and_features(model, v, x, train=False)
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(feats2))
    _, base_feats = contract.apply_split(precision_lib.wrap(cnn, c.precision), _base(v), x, train=False)
    assert feats.dtype == np.float32 and not np.allclose(np.asarray(feats), np.asarray(base_feats), atol=1e-3)


def test_dropout_is_unbiased_and_only_in_training():
    """Dropout on the LoRA branch's input: off without train=True or without a 'dropout' rng (output = the
    undropped model's); in training the mean over 4000 masks of the delta is the undropped delta (inverted
    dropout is unbiased) while one mask changes it."""
    model = Net()
    plain = LoraModel(model, rank=2, alpha=2.0, targets="head")
    dropped = LoraModel(model, rank=2, alpha=2.0, targets="head", dropout=0.5)
    v = _randomised(plain.init(jax.random.PRNGKey(0), X))
    y = np.asarray(plain.apply(v, X, train=True))
    assert np.array_equal(np.asarray(dropped.apply(v, X, train=False, rngs={"dropout": jax.random.PRNGKey(1)})), y)
    assert np.array_equal(np.asarray(dropped.apply(v, X, train=True)), y)
    one = jax.jit(lambda r: dropped.apply(v, X, train=True, rngs={"dropout": r}))
    assert not np.allclose(np.asarray(one(jax.random.PRNGKey(1))), y, atol=1e-4)
    base = np.asarray(model.apply(_base(v), X))
    mean = np.asarray(jax.vmap(one)(jax.random.split(jax.random.PRNGKey(2), 4000)).mean(0))
    np.testing.assert_allclose(mean - base, y - base, rtol=0.05, atol=0.05 * np.abs(y - base).max())
    with pytest.raises(ValueError, match=r"config.peft.lora.dropout must be a number in \[0, 1\)"):
        peft_lib.check(_config(**{"peft.lora.rank": 2, "peft.lora.dropout": 1.0}))


def test_sweep_points_with_another_rank_never_share_a_vectorised_step():
    """config.peft is no traced key (tl_jax/sweep/plan.py): points differing in rank run in separate groups,
    points differing in learning rate only share one."""
    def tiny(*overrides):
        return config_lib.apply_overrides(config_lib.load_config("tests/configs/tiny.py"), list(overrides))

    groups, why = plan_groups([tiny("peft.lora.rank=2"), tiny("peft.lora.rank=8"),
                               tiny("peft.lora.rank=2", "optimizer.learning_rate=0.01")])
    assert groups == [[0, 2], [1]] and "config.peft.lora.rank" in why


def test_zoo_cnn_every_conv_and_dense_including_the_im2col_conv():
    """The zoo CNN's conv1 is an im2col Conv3x3 (tl_jax/models/im2col.py), adapted like nn.Conv: all four
    layers get LoRA, output unchanged at init, and the merge (which folds A·B into each 3x3 kernel) predicts
    what the adapted model does."""
    cnn = get_model("cnn", 3)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 1)).astype(np.float32)
    lm = LoraModel(cnn, rank=2, alpha=2.0, targets=".*")
    v = lm.init(jax.random.PRNGKey(0), x, train=False)
    assert sorted(peft_lib.lora.lora_pairs(v["params"][LORA])) == ["backbone/conv1", "backbone/conv2", "backbone/fc",
                                                                   "head"]
    assert np.array_equal(np.asarray(lm.apply(v, x, train=False)), np.asarray(cnn.apply(_base(v), x, train=False)))
    v = _randomised(v)
    y = np.asarray(lm.apply(v, x, train=False))
    y_merged = np.asarray(cnn.apply({"params": merge_lora(v["params"], lm.scale)}, x, train=False))
    assert np.max(np.abs(y - y_merged)) <= 1e-5 * np.max(np.abs(y))
    only1 = LoraModel(cnn, rank=2, alpha=2.0, targets="backbone/conv1")  # conv1's delta alone moves the output
    v1 = _randomised(only1.init(jax.random.PRNGKey(0), x, train=False))
    assert not np.allclose(np.asarray(only1.apply(v1, x, train=False)), np.asarray(cnn.apply(_base(v1), x)), atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wise_ft_of_a_lora_run_is_wise_ft_of_the_merged_weights(alpha):
    """interpolate(θ_0, θ_ft, α) with θ_ft a LoRA run's params (base fine-tuned too, freeze_base=False):
    merged, it is (1 − α)·W_0 + α·merge(θ_ft) for every kernel; α = 0 is the pretrained model."""
    lm = LoraModel(Net(), rank=2, alpha=2.0, targets=".*")
    v0 = Net().init(jax.random.PRNGKey(0), X)["params"]
    ft = _randomised(lm.init(jax.random.PRNGKey(1), X))["params"]  # another base: as if fine-tuned
    mixed = merge_lora(interpolate(v0, ft, alpha), lm.scale)
    want = merge_lora(ft, lm.scale)
    for path, w in flatten_paths(mixed).items():
        ref = (1 - alpha) * np.asarray(flatten_paths(v0)[path], np.float64) + alpha * np.asarray(
            flatten_paths(want)[path], np.float64)
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("x_shape,a_shape,b_shape", [((2, 5, 6), (6, 3), (3, 4)),  # Dense
                                                     ((2, 5, 6), (6, 3), (3, 2, 4)),  # attention q/k/v
                                                     ((2, 5, 2, 3), (2, 3, 3), (3, 6))])  # attention out
def test_low_rank_backward_equals_autodiff_of_the_formula(x_shape, a_shape, b_shape):
    """lora.low_rank's own backward pass (a faster dA layout on XLA:CPU) gives autodiff's gradients of
    (x ⋆ A)·B, also under vmap (vectorised sweeps) and in bfloat16 (the cotangents keep the dtypes)."""
    r = np.random.default_rng(0)
    x, a, b = (jnp.asarray(r.normal(size=s), jnp.float32) for s in (x_shape, a_shape, b_shape))
    n_in = len(a_shape) - 1
    g = jnp.asarray(r.normal(size=(*x_shape[:-n_in], *b_shape[1:])), jnp.float32)

    def reference(x, a, b):
        return jnp.sum(jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1) * g)

    ours = jax.grad(lambda x, a, b: jnp.sum(low_rank(x, a, b, n_in) * g), argnums=(0, 1, 2))(x, a, b)
    ref = jax.grad(reference, argnums=(0, 1, 2))(x, a, b)
    for o, e in zip(ours, ref):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-5)
    per_point = jax.vmap(jax.grad(lambda a, b: jnp.sum(low_rank(x, a, b, n_in) * g), argnums=(0, 1)))
    da, db = per_point(jnp.stack([a, 2 * a]), jnp.stack([b, b]))
    np.testing.assert_allclose(da[1], jax.grad(reference, argnums=1)(x, 2 * a, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db[0], ref[2], rtol=1e-5, atol=1e-5)
    bf = [t.astype(jnp.bfloat16) for t in (x, a, b)]
    assert [t.dtype for t in jax.grad(lambda *t: jnp.sum(low_rank(*t, n_in)).astype(jnp.float32),
                                      argnums=(0, 1, 2))(*bf)] == [jnp.bfloat16] * 3
