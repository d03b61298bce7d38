"""Bottleneck adapters (tl_jax/peft/adapters.py, config.peft.adapter) against numpy: one ViT block's output with
Houlsby adapters = x + A(MHA(LN(x))), then + A(MLP(LN(.))) with A(h) = h + act(h·Wd + bd)·Wu + bu; the zero-up
init bit for bit; param counts 2·d·m + d + m per adapter (Houlsby: 2 per block); the param rules (and the BitFit
preset of docs/peft.md); WiSE-FT scales each adapter's residual; merge refused; and end to end on a tiny ViT (loop.train): init_from a base run, only the
adapters and the head move, resume, eval, DANN (slow)."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax import peft as peft_lib
from tl_jax.evaluation.saved_run import load
from tl_jax.models import get_model
from tl_jax.models.bert import BertLayer, BertSelfAttention
from tl_jax.models.vit import EncoderBlock, MlpBlock
from tl_jax.params.interpolate import interpolate
from tl_jax.params.param_rules import ParamGroups, flatten_paths
from tl_jax.peft.adapters import ADAPTER, AdapterModel, count_formula
from tl_jax.peft.merge_run import folded, merge_run
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train

D, M, L = 8, 3, 2
X_TOK = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32)
X_IMG = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
ACT_NP = {"relu": lambda z: np.maximum(z, 0.0),
          "gelu": lambda z: 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))}


def tiny_vit(**kw):
    return get_model("vit", 3, patch_size=4, hidden_size=D, depth=L, num_heads=2, mlp_dim=16, **kw)


def tiny_bert():
    return get_model("bert", 3, vocab_size=50, hidden_size=D, num_layers=L, num_heads=2, intermediate_size=16,
                     max_position=16, hidden_dropout=0.0, attention_dropout=0.0)


def init(model, *args):
    return jax.jit(lambda r: model.init(r, *args, train=False))(jax.random.PRNGKey(0))


def base_of(variables):
    return {**variables, "params": {k: v for k, v in variables["params"].items() if k != ADAPTER}}


def randomised(variables, seed=2):
    """Every adapter leaf drawn from N(0, 0.5²) (the zero up-projection would hide the adapter)."""
    rng = np.random.default_rng(seed)
    own = jax.tree.map(lambda v: (0.5 * rng.normal(size=v.shape)).astype(np.float32), variables["params"][ADAPTER])
    return {**variables, "params": {**variables["params"], ADAPTER: own}}


def adapter_np(h, node, act):
    h = np.asarray(h, np.float64)
    z = ACT_NP[act](h @ np.asarray(node["down"]["kernel"], np.float64) + np.asarray(node["down"]["bias"]))
    return h + z @ np.asarray(node["up"]["kernel"], np.float64) + np.asarray(node["up"]["bias"])


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_one_block_against_numpy(act, placement):
    """AdapterModel around one EncoderBlock: the base sublayers by their flax modules, the adapters in numpy."""
    block = EncoderBlock(num_heads=2, mlp_dim=16)
    model = AdapterModel(block, dim=M, placement=placement, act=act)
    v = randomised(init(model, X_TOK))
    p, own = v["params"], v["params"][ADAPTER]
    assert set(own) == ({"MultiHeadDotProductAttention_0", "MlpBlock_0"} if placement == "houlsby" else {"MlpBlock_0"})
    ln = lambda name, x: nn.LayerNorm(epsilon=1e-6).apply({"params": p[name]}, x)  # noqa: E731
    y = ln("LayerNorm_0", X_TOK)
    att = nn.MultiHeadDotProductAttention(num_heads=2).apply({"params": p["MultiHeadDotProductAttention_0"]}, y, y)
    x1 = X_TOK + (adapter_np(att, own["MultiHeadDotProductAttention_0"], act) if placement == "houlsby" else att)
    mlp = MlpBlock(16).apply({"params": p["MlpBlock_0"]}, ln("LayerNorm_1", x1.astype(np.float32)))
    want = x1 + adapter_np(mlp, own["MlpBlock_0"], act)
    np.testing.assert_allclose(np.asarray(model.apply(v, X_TOK)), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, np.asarray(block.apply(base_of(v), X_TOK)), atol=1e-3)  # the adapters matter


def test_one_bert_layer_against_numpy():
    """AdapterModel around one post-LN BertLayer (Houlsby): LN(x + A(Attn(x))), then LN(h + A(FFN(h))) with the
    FFN's adapter after its output Dense, inside the residual and before the LayerNorm."""
    layer = BertLayer(2, 16, 1e-12, 0.0, 0.0, jnp.float32)
    bias = np.zeros((2, 1, 1, 5), np.float32)
    model = AdapterModel(layer, dim=M, act="gelu")
    v = randomised(jax.jit(lambda r: model.init(r, X_TOK, bias))(jax.random.PRNGKey(0)))
    p, own = v["params"], v["params"][ADAPTER]
    assert set(own) == {"attention", "output"}
    ln = lambda name, x: nn.LayerNorm(epsilon=1e-12).apply({"params": p[name]}, x)  # noqa: E731
    dense = lambda name, x: nn.Dense(p[name]["kernel"].shape[1]).apply({"params": p[name]}, x)  # noqa: E731
    attn = BertSelfAttention(2, 0.0, 0.0, jnp.float32).apply({"params": p["attention"]}, X_TOK, bias)
    h = np.asarray(ln("attention_norm", (X_TOK + adapter_np(attn, own["attention"], "gelu")).astype(np.float32)))
    ffn = dense("output", jax.nn.gelu(dense("intermediate", h), approximate=False))
    want = ln("output_norm", (h + adapter_np(ffn, own["output"], "gelu")).astype(np.float32))
    np.testing.assert_allclose(np.asarray(model.apply(v, X_TOK, bias)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wise_ft_of_an_adapter_run_scales_each_adapter_residual_by_alpha(alpha):
    """tl_jax.params.interpolate: adapter/**/up has the pretrained value 0 and down is kept, so the block computes
    x1 + MLP + α·(adapter residual); α = 0 is the base block bit for bit."""
    block = EncoderBlock(num_heads=2, mlp_dim=16)
    model = AdapterModel(block, dim=M, placement="pfeiffer")
    v = randomised(init(model, X_TOK))
    mixed = interpolate(base_of(v)["params"], v["params"], alpha)
    own, got = v["params"][ADAPTER]["MlpBlock_0"], mixed[ADAPTER]["MlpBlock_0"]
    np.testing.assert_array_equal(got["down"]["kernel"], own["down"]["kernel"])
    np.testing.assert_allclose(got["up"]["kernel"], alpha * np.asarray(own["up"]["kernel"]), rtol=1e-6)
    y = np.asarray(model.apply({"params": mixed}, X_TOK))
    base = np.asarray(block.apply(base_of(v), X_TOK))
    if alpha == 0.0:
        assert np.array_equal(y, base)
        return
    p = v["params"]
    yy = nn.LayerNorm(epsilon=1e-6).apply({"params": p["LayerNorm_0"]}, X_TOK)
    x1 = X_TOK + nn.MultiHeadDotProductAttention(num_heads=2).apply(
        {"params": p["MultiHeadDotProductAttention_0"]}, yy, yy)
    mlp = np.asarray(MlpBlock(16).apply({"params": p["MlpBlock_0"]},
                                        nn.LayerNorm(epsilon=1e-6).apply({"params": p["LayerNorm_1"]}, x1)))
    want = np.asarray(x1) + mlp + alpha * (adapter_np(mlp, own, "relu") - mlp)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_up_init_is_the_base_model_bit_for_bit_and_counts_follow_the_formula(placement):
    per_block = 2 if placement == "houlsby" else 1
    for model, x in ((tiny_vit(pooling="gap"), X_IMG), (tiny_bert(), np.arange(12).reshape(2, 6) % 50)):
        am = AdapterModel(model, dim=M, placement=placement)
        v = init(am, x)
        own = v["params"][ADAPTER]
        assert all(not np.any(leaf) for p, leaf in flatten_paths(own).items() if "/up/" in p)
        assert np.array_equal(np.asarray(am.apply(v, x)), np.asarray(model.apply(base_of(v), x)))
        assert peft_lib.count(own) == L * per_block * count_formula(D, M) == L * per_block * (2 * D * M + D + M)
        assert set(base_of(v)["params"]) == set(init(model, x)["params"])  # the base keeps its paths
    bert_sites = {p.rsplit("/", 2)[0] for p in flatten_paths(own)}
    assert bert_sites == {f"backbone/layer_{i}/{s}" for i in range(L)
                          for s in (("attention", "output") if placement == "houlsby" else ("output",))}


def test_map_pooling_head_is_not_adapted():
    v = init(AdapterModel(tiny_vit(pooling="map"), dim=M, placement="pfeiffer"), X_IMG)
    sites = {p.rsplit("/", 2)[0] for p in flatten_paths(v["params"][ADAPTER])}
    assert sites == {"backbone/encoderblock_0/MlpBlock_0", "backbone/encoderblock_1/MlpBlock_0"}  # not map_head's


def config_with(**peft):
    c = config_lib.base_config()
    for group, values in peft.items():
        for key, value in values.items():
            c.peft[group][key] = value
    return c


def test_default_rules_train_adapters_and_head_and_freeze_the_base():
    c = config_with(adapter=dict(dim=M))
    v = init(AdapterModel(tiny_vit(), dim=M), X_IMG)
    rules = peft_lib.param_rules(c, v["params"])
    assert rules == [["adapter/.*", 1.0], ["head/.*", 1.0], [".*", None]]
    mults = ParamGroups.resolve(v["params"], rules).multipliers
    assert all((m == 1.0) == p.startswith(("adapter/", "head/")) for p, m in mults.items())
    assert peft_lib.dont_load(c) == list(c.dont_load) + ["adapter/.*"]
    c.peft.lora.rank = 2  # LoRA and adapters together: both subtrees train
    assert peft_lib.param_rules(c, v["params"])[:2] == [["lora/.*", 1.0], ["adapter/.*", 1.0]]


def test_bitfit_and_norm_only_presets_of_the_docs_train_exactly_their_leaves():
    """docs/peft.md's BitFit preset (freeze_base=False + these rules) on a tiny ViT: the trained leaves are exactly
    the biases (and nothing else: no LayerNorm scale, no kernel, no position table); the norm-only preset: the
    LayerNorms' scales and shifts and the head."""
    c = config_with()
    c.peft.freeze_base = False
    c.param_rules = [[".*/bias", 1.0], [".*", None]]
    v = init(tiny_vit(), X_IMG)
    mults = ParamGroups.resolve(v["params"], peft_lib.param_rules(c, v["params"])).multipliers
    trained = {p for p, m in mults.items() if m}
    assert trained == {p for p in flatten_paths(v["params"]) if p.rsplit("/", 1)[-1] == "bias"}
    assert any("LayerNorm" in p for p in trained) and any("MultiHeadDotProductAttention" in p for p in trained)
    c.param_rules = [["backbone/.*(norm|LayerNorm|bn|BatchNorm).*", 1.0], ["head/.*", 1.0], [".*", None]]  # norm-only
    mults = ParamGroups.resolve(v["params"], peft_lib.param_rules(c, v["params"])).multipliers
    assert {p for p, m in mults.items() if m} == {p for p in flatten_paths(v["params"]) if p.startswith("head/") or
                                                  "/LayerNorm_" in p or "/encoder_norm/" in p}


def test_errors_name_the_key_and_merge_refuses_adapters(tmp_path):
    with pytest.raises(ValueError, match=r"config.peft.adapter: model CNN has no transformer blocks"):
        init(AdapterModel(get_model("cnn", 3), dim=M), np.zeros((1, 14, 14, 1), np.float32))
    for key, value, pattern in (("dim", -1, "dim must be an int >= 0"), ("placement", "x", "placement must be"),
                                ("act", "tanh", "act must be one of")):
        c = config_with(adapter={key: value})
        with pytest.raises(ValueError, match=f"config.peft.adapter.{pattern}"):
            config_lib.validate(c)
    c = config_with(adapter=dict(dim=M))
    c.param_rules = [[".*/bias", 1.0]]
    with pytest.raises(ValueError, match="config.peft.freeze_base=True sets the param rules"):
        config_lib.validate(c)
    v = init(AdapterModel(tiny_vit(), dim=M), X_IMG)
    with pytest.raises(ValueError, match=r"adapter params \(config.peft.adapter\).*cannot be folded"):
        peft_lib.merge(v["params"], config_with(adapter=dict(dim=M)))
    with pytest.raises(ValueError, match=r"--workdir: its params have a 'adapter' subtree"):
        folded(v, str(tmp_path), "--workdir")
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_dict(config_with(adapter=dict(dim=M)))))
    with pytest.raises(ValueError, match=r"config.peft.adapter params.*cannot be folded"):
        merge_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- end to end on a tiny ViT (14x14 mnist5k, patch 7: 4 tokens + cls) ----------------------------------------

def vit_config(data_dir, steps, **peft):
    c = config_lib.load_config(f"tests/configs/tiny.py:steps={steps}")
    c.model.name = "vit"
    c.model.kwargs = dict(patch_size=7, hidden_size=8, depth=2, num_heads=2, mlp_dim=16)
    c.data.data_dir = data_dir
    c.train.feature_cache = False
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    c.optimizer.learning_rate = 0.01
    for group, values in peft.items():
        for key, value in values.items():
            c.peft[group][key] = value
    return c


@pytest.fixture(scope="module")
def source_vit(tmp_path_factory, tfds_data_dir):
    wd = tmp_path_factory.mktemp("adapters") / "src"
    train(vit_config(tfds_data_dir, 2), str(wd))
    return wd


def assert_base_kept(params, src, own_key):
    got, want = flatten_paths(params), flatten_paths(load_variables(str(src))["params"])
    base = {p for p in got if not p.startswith((f"{own_key}/", "head/"))}
    assert base == {p for p in want if not p.startswith("head/")}
    for p in base:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)  # frozen: bit for bit the base run's
    return got


@pytest.mark.slow
def test_adapter_run_from_a_base_run_trains_only_adapters_and_head_and_resumes(source_vit, tfds_data_dir, tmp_path):
    peft = dict(adapter=dict(dim=4, placement="houlsby"))
    straight = tmp_path / "straight"
    train(_with_init(tfds_data_dir, 4, source_vit, peft), str(straight))
    got = assert_base_kept(load_variables(str(straight))["params"], source_vit, ADAPTER)
    assert any(np.any(v) for p, v in got.items() if p.startswith(f"{ADAPTER}/") and "/up/" in p)  # up moved from 0
    run = load(straight)
    n_state = sum(np.size(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x) > 0)
    n_trained = sum(np.size(v) for p, v in got.items() if run.objective.param_groups.multipliers[p])
    assert n_state == 2 * n_trained  # Adam's mu and nu for the adapters and the head only: none for the base
    resumed = tmp_path / "resumed"  # 2 steps, then the same run continued to 4 (checkpoint resume)
    train(_with_init(tfds_data_dir, 2, source_vit, peft), str(resumed))
    train(_with_init(tfds_data_dir, 4, source_vit, peft), str(resumed))
    again = flatten_paths(load_variables(str(resumed))["params"])
    for p, v in got.items():
        np.testing.assert_allclose(again[p], v, rtol=1e-6, atol=1e-7, err_msg=p)
    from tl_jax.cli import main  # deferred: the CLI's parsers are only needed here
    assert main(["eval", "--workdir", str(straight)]) == 0


def _with_init(data_dir, steps, source, peft):
    c = vit_config(data_dir, steps, **peft)
    c.init_from = str(source)
    return c


@pytest.mark.slow
def test_adapters_compose_with_dann(source_vit, tfds_data_dir, tmp_path):
    c = _with_init(tfds_data_dir, 2, source_vit, dict(adapter=dict(dim=4, placement="pfeiffer")))
    c.objective.name = "dann"
    c.objective.dann.target = "optdigits"
    c.objective.dann.target_pp = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]
    train(c, str(tmp_path / "dann"))
    run = load(tmp_path / "dann")
    got = flatten_paths(run.state.params)
    mults = run.objective.param_groups.multipliers
    src = flatten_paths(load_variables(str(source_vit))["params"])
    extras = [p for p in mults if p.split("/")[0] in run.objective.extra_keys]
    assert extras and all(mults[p] for p in extras)  # the discriminator trains with the base frozen
    assert all(mults[p] for p in got if p.startswith((f"{ADAPTER}/", "head/")))
    for p, m in mults.items():
        if m is None:
            np.testing.assert_array_equal(got[p], src[p], err_msg=p)
    assert any(np.any(v) for p, v in got.items() if p.startswith(f"{ADAPTER}/") and "/up/" in p)
