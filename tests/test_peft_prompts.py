"""Visual prompt tuning (tl_jax/peft/prompts.py, config.peft.prompt) against an independent forward pass: the ViT
run block by block with the prompt tokens inserted after the class token (shallow) or replaced at every block
(deep), dropped before the final norm, so cls and gap pool the tokens they pool without prompts; param counts T·D
and L·T·D; non-ViTs refused; the three PEFT links composed under mixed precision; and end to end on a tiny ViT
(loop.train from a base run: only the prompts and the head move, no optimizer state for the base, eval
reads the run; slow)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax import peft as peft_lib
from tl_jax.evaluation.saved_run import load
from tl_jax.models import contract, get_model
from tl_jax.models.precision import MixedPrecision, unwrap
from tl_jax.models.vit import EncoderBlock
from tl_jax.params.param_rules import ParamGroups, flatten_paths
from tl_jax.peft import AdapterModel, LoraModel, PromptModel
from tl_jax.peft.prompts import PROMPT, count_formula
from tl_jax.train.build import BEFORE_INIT, Stage, chain
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train

D, L, T, P = 8, 3, 2, 4
X = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)  # 2x2 = 4 patches


def tiny_vit(**kw):
    return get_model("vit", 3, patch_size=P, hidden_size=D, depth=L, num_heads=2, mlp_dim=16, **kw)


def init(model, x=X):
    return jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(0))


def reference_tokens(params, tokens, deep, prefix=("cls",), registers=0):
    """The prompted ViT by hand up to the final norm: patchify, [cls][dist], + positions, [registers], prompts
    after the prefix (before the registers), blocks (deep: fresh prompts before each block after the first),
    prompts dropped, final norm: ``[B, N, D]`` with the N tokens of the model without prompts."""
    p = params["backbone"]
    x = nn.Conv(D, (P, P), strides=(P, P), padding="VALID").apply({"params": p["embedding"]}, X)
    x = x.reshape(2, -1, D)
    n = len(prefix)
    x = jnp.concatenate([jnp.broadcast_to(p[name], (2, 1, D)) for name in prefix] + [x], axis=1)
    x = x + p["pos_embedding"]
    if registers:
        x = jnp.concatenate([x[:, :n], jnp.broadcast_to(p["reg"], (2, registers, D)), x[:, n:]], axis=1)
    seq = x.shape[1]
    for i in range(L):
        prompt = jnp.broadcast_to(tokens[i if deep else 0], (2, T, D))
        if i == 0:
            x = jnp.concatenate([x[:, :n], prompt, x[:, n:]], axis=1)
        elif deep:
            x = jnp.concatenate([x[:, :n], prompt, x[:, n + T:]], axis=1)
        x = EncoderBlock(num_heads=2, mlp_dim=16).apply({"params": p[f"encoderblock_{i}"]}, x)
    x = jnp.concatenate([x[:, :n], x[:, n + T:]], axis=1)
    assert x.shape[1] == seq  # the pooling sees the tokens it sees without prompts
    return nn.LayerNorm(epsilon=1e-6).apply({"params": p["encoder_norm"]}, x)


def reference_logits(params, tokens, deep, pooling):
    """:func:`reference_tokens` pooled (cls: the class token; gap: the mean of the patch tokens), then the head."""
    prefix = ("cls",) if pooling == "cls" else ()
    x = reference_tokens(params, tokens, deep, prefix)
    feats = x[:, 0] if pooling == "cls" else jnp.mean(x, axis=1)
    return nn.Dense(3).apply({"params": params["head"]}, feats)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("pooling", ["cls", "gap"])
def test_prompted_vit_matches_the_block_by_block_reference(deep, pooling):
    vit = tiny_vit(pooling=pooling)
    model = PromptModel(vit, num_tokens=T, deep=deep)
    v = init(model)
    tokens = v["params"][PROMPT]["backbone"]["tokens"]
    assert tokens.shape == ((L if deep else 1), T, D)
    assert peft_lib.count(v["params"][PROMPT]) == count_formula(T, D, L, deep) == (L * T * D if deep else T * D)
    got = np.asarray(model.apply(v, X))
    np.testing.assert_allclose(got, np.asarray(reference_logits(v["params"], tokens, deep, pooling)),
                               rtol=1e-5, atol=1e-5)
    base = {k: w for k, w in v["params"].items() if k != PROMPT}
    assert set(base) == set(init(vit)["params"])  # the base keeps its paths
    assert not np.allclose(got, np.asarray(vit.apply({"params": base}, X)), atol=1e-4)  # the prompts act


def test_prompts_go_after_the_dist_token_and_before_the_registers():
    """DeiT-style cls + dist tokens and a DINOv2-style register, VPT-deep: the cls_dist features are the
    reference's tokens 0 and 1 (the prefix, not a prompt or a register)."""
    vit = tiny_vit(pooling="cls_dist", dist_token=True, num_registers=1)
    model = PromptModel(vit, num_tokens=T, deep=True)
    v = init(model)
    got = np.asarray(model.apply(v, X, return_features=True)[1])
    x = reference_tokens(v["params"], v["params"][PROMPT]["backbone"]["tokens"], True, ("cls", "dist"), 1)
    np.testing.assert_allclose(got, np.concatenate([x[:, 0], x[:, 1]], axis=-1), rtol=1e-5, atol=1e-5)


def test_non_vits_are_refused_with_one_line_naming_the_key():
    for model, x in ((get_model("cnn", 3), np.zeros((1, 14, 14, 1), np.float32)),
                     (get_model("bert", 3, vocab_size=20, hidden_size=D, num_layers=1, num_heads=2,
                                intermediate_size=8, max_position=8), np.zeros((1, 4), np.int32))):
        with pytest.raises(ValueError, match=r"^config.peft.prompt needs a tl_jax ViT \(tl_jax/models/vit.py\); "
                                             r"model \w+ has no ViT encoder blocks$"):
            PromptModel(model, num_tokens=T).init(jax.random.PRNGKey(0), x, train=False)  # no jit: its note
    c = config_lib.base_config()
    c.peft.prompt.num_tokens = -1
    with pytest.raises(ValueError, match=r"config.peft.prompt.num_tokens must be an int >= 0 \(0: off\), got -1"):
        config_lib.validate(c)


def test_lora_adapters_prompts_and_bfloat16_compose_in_the_chain():
    """BEFORE_INIT with all three transforms: MixedPrecision(PromptModel(AdapterModel(LoraModel(vit)))); each
    subtree is there, the default rules train the three and the head, the split sees through, merge is refused."""
    c = config_lib.base_config()
    c.peft.lora.rank, c.peft.adapter.dim, c.peft.prompt.num_tokens, c.peft.prompt.deep = 2, 3, T, True
    c.precision.compute = "bfloat16"
    vit = tiny_vit()
    model = chain(vit, BEFORE_INIT, Stage(c))
    assert isinstance(model, MixedPrecision) and isinstance(model.module, PromptModel)
    assert isinstance(model.module.module, AdapterModel) and isinstance(model.module.module.module, LoraModel)
    assert unwrap(model) is vit
    v = init(model)
    assert {"lora", "adapter", PROMPT} <= set(v["params"])
    mults = ParamGroups.resolve(v["params"], peft_lib.param_rules(c, v["params"])).multipliers
    assert all(bool(m) == p.startswith(("lora/", "adapter/", "prompt/", "head/")) for p, m in mults.items())
    logits, feats = contract.apply_split(model, v, X, train=False)
    assert logits.shape == (2, 3) and feats.shape == (2, D) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"adapter and prompt params .*cannot be folded"):
        peft_lib.merge(v["params"], c)


# --- end to end on a tiny ViT (14x14 mnist5k, patch 7) ---------------------------------------------------------

def vit_config(data_dir, steps):
    c = config_lib.load_config(f"tests/configs/tiny.py:steps={steps}")
    c.model.name = "vit"
    c.model.kwargs = dict(patch_size=7, hidden_size=8, depth=2, num_heads=2, mlp_dim=16, pooling="gap")
    c.data.data_dir = data_dir
    c.train.feature_cache = False
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    c.optimizer.learning_rate = 0.01
    return c


@pytest.mark.slow
def test_vpt_deep_run_from_a_base_run_trains_only_prompts_and_head(tfds_data_dir, tmp_path):
    train(vit_config(tfds_data_dir, 2), str(tmp_path / "src"))
    c = vit_config(tfds_data_dir, 3)
    c.init_from = str(tmp_path / "src")
    c.peft.prompt.num_tokens, c.peft.prompt.deep = 3, True
    train(c, str(tmp_path / "vpt"))
    got = flatten_paths(load_variables(str(tmp_path / "vpt"))["params"])
    src = flatten_paths(load_variables(str(tmp_path / "src"))["params"])
    base = {p for p in got if not p.startswith((f"{PROMPT}/", "head/"))}
    assert base == {p for p in src if not p.startswith("head/")}
    for p in base:
        np.testing.assert_array_equal(got[p], src[p], err_msg=p)  # frozen: bit for bit the base run's
    assert got["prompt/backbone/tokens"].shape == (2, 3, 8)
    assert not np.array_equal(got["head/kernel"], src["head/kernel"])
    at_2 = flatten_paths(load_variables(f"{tmp_path / 'vpt'}:2")["params"])
    assert not np.array_equal(got["prompt/backbone/tokens"], at_2["prompt/backbone/tokens"])  # trained in step 3
    run = load(tmp_path / "vpt")  # rebuilt from the run's config (config.peft.prompt)
    n_state = sum(np.size(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x) > 0)
    assert n_state == 2 * (got["prompt/backbone/tokens"].size + got["head/kernel"].size + got["head/bias"].size)
    from tl_jax.cli import main  # deferred: the CLI's parsers are only needed here
    assert main(["eval", "--workdir", str(tmp_path / "vpt")]) == 0
