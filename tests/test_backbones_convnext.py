"""ConvNeXt (tl_jax/models/convnext.py) and its import from Hugging Face ConvNextModel folders.

Parity: a random-init transformers ConvNeXt (tiny sizes; LayerNorm and LayerScale
drawn away from their init so a swapped or skipped tensor shows), saved with
``save_pretrained``, converted with no flags, run in tl_jax: features and logits
within 1e-5 relative (float32).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.models import get_model
from tl_jax.models.convnext import drop_path
from tl_jax.params.layer_decay import layer_decay
from tl_jax.params.param_rules import flatten_paths, match_rules
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.weights import WeightMappingError, convert_weights
from tl_jax.weights.convnext import convert_hf_convnext

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

TINY = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32]}


def close(got, want, rtol=1e-5):
    """Within ``rtol`` of the largest reference magnitude (elementwise relative error explodes near 0)."""
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_zoo_sizes_and_shapes():
    params = jax.eval_shape(lambda: get_model("convnext_tiny", 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n == 27_827_818  # timm convnext_tiny with a 10-class head: 28,589,128 - 769 * 990
    p = params["params"]["backbone"]
    assert p["stage2_block8"]["dwconv"]["kernel"].shape == (7, 7, 1, 384)
    assert "stage3_block2" in p and "stage3_block3" not in p and "stage0_downsample_conv" not in p
    base = jax.eval_shape(lambda: get_model("convnext_base", 2).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert base["params"]["head"]["kernel"].shape == (1024, 2)
    with pytest.raises(ValueError, match="unknown variant 'XL'"):
        get_model("convnext", 2, variant="XL").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_block_maths_against_numpy():
    """One block by hand: dwconv (as a sum of shifted images) -> LN -> MLP(erf GELU) -> gamma, residual."""
    model = get_model("convnext", 3, depths=[1], dims=[4], kernel_size=3)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 2)).astype(np.float32)
    v = model.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.3 * np.random.default_rng(a.size).normal(size=a.shape).astype(np.float32), v)
    feats = np.asarray(model.apply(v, x, method=model.embed))[0]
    p = jax.tree.map(np.asarray, v["params"]["backbone"])

    def ln(a, q, eps=1e-6):
        return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + eps) * q["scale"] + q["bias"]

    s = x[0].reshape(2, 4, 2, 4, 2).transpose(0, 2, 1, 3, 4).reshape(2, 2, 32) @ \
        p["stem_conv"]["kernel"].reshape(32, 4) + p["stem_conv"]["bias"]  # 4x4/4 patches
    s = ln(s, p["stem_norm"])
    b = p["stage0_block0"]
    pad = np.pad(s, ((1, 1), (1, 1), (0, 0)))
    dw = sum(pad[i:i + 2, j:j + 2] * b["dwconv"]["kernel"][i, j, 0] for i in range(3) for j in range(3))
    h = ln(dw + b["dwconv"]["bias"], b["norm"]) @ b["fc1"]["kernel"] + b["fc1"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    y = s + (h @ b["fc2"]["kernel"] + b["fc2"]["bias"]) * b["gamma"]
    close(feats, ln(y.mean((0, 1)), p["norm"]), rtol=1e-5)


def test_drop_path_keeps_the_expectation():
    x = jnp.ones((4000, 3))
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    kept = y[:, 0] > 0
    assert 0.70 < kept.mean() < 0.80 and np.allclose(y[kept], 1 / 0.75) and np.all(y[~kept] == 0)
    model = get_model("convnext", 2, depths=[1, 1], dims=[4, 8], drop_path_rate=0.5, layer_scale=None)
    x = np.ones((8, 16, 16, 3), np.float32)
    v = model.init(jax.random.key(0), x)
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b) and np.allclose(model.apply(v, x), model.apply(v, x))


def hf_reference(tmp_path, head: bool, seed: int = 0, **config):
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextModel

    torch.manual_seed(seed)
    cfg = ConvNextConfig(hidden_sizes=TINY["dims"], depths=TINY["depths"], num_labels=3, layer_norm_eps=1e-5,
                         **config)
    ref = (ConvNextForImageClassification if head else ConvNextModel)(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layernorm" in name or "downsampling_layer.0" in name or "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if name.endswith(("weight", "parameter"))
                        else torch.randn(p.shape, generator=gen) * 0.1)
    ref.save_pretrained(tmp_path / "hf")
    return ref


@pytest.mark.parametrize("head", [True, False])
def test_hf_convnext_parity(tmp_path, head):
    ref = hf_reference(tmp_path, head)
    res = convert_weights(tmp_path / "hf", out=tmp_path / "ck")  # recognised from config.json: no mapping, no model
    assert res.model == "convnext" and res.model_kwargs["depths"] == TINY["depths"]
    assert res.model_kwargs["head_norm_eps"] == 1e-5 and res.num_classes == (3 if head else 1)
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "huggingface" and meta["architecture"].startswith("ConvNext")
    assert len(meta["files"][0]["sha256"]) == 64 and meta["has_head"] == head
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and meta["preprocessing"]["resize"] == 256
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(x)
        want_feats = (ref.convnext(x) if head else out).pooler_output.numpy()
    model = get_model(res.model, res.num_classes, **res.model_kwargs)
    variables = load_variables(str(tmp_path / "ck"))
    x_nhwc = x.numpy().transpose(0, 2, 3, 1)
    close(jax.jit(lambda v, a: model.apply(v, a, method=model.embed))(variables, x_nhwc), want_feats)
    if head:  # else: no head tensors, no head in the checkpoint (init_from keeps the fresh one)
        close(jax.jit(model.apply)(variables, x_nhwc), out.logits.numpy())
    else:
        assert "head" not in variables["params"]


def test_hf_convnext_mismatch_is_one_line_each(tmp_path):
    hf_reference(tmp_path, head=False)
    from safetensors.numpy import load_file, save_file

    t = load_file(tmp_path / "hf" / "model.safetensors")
    t["encoder.stages.1.layers.0.pwconv1.weight"] = t["encoder.stages.1.layers.0.pwconv1.weight"][:5]
    del t["encoder.stages.2.layers.1.layer_scale_parameter"]
    save_file(t, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(WeightMappingError) as e:
        convert_weights(tmp_path / "hf", out=tmp_path / "ck")
    msg = str(e.value)
    assert "shape mismatch: encoder.stages.1.layers.0.pwconv1.weight (5, 16) -> " \
           "params/backbone/stage1_block0/fc1/kernel (16, 5), model expects (16, 64)" in msg
    assert "unfilled target params/backbone/stage2_block1/gamma (24,)" in msg
    assert not (tmp_path / "ck").exists()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act='relu'; tl_jax's convnext implements 'gelu'"):
        convert_hf_convnext(tmp_path / "hf", out=None)


def test_layer_decay_table():
    """Stem 0 < stage s (its downsampling and blocks) s+1 < head and the pooled-feature norm 5."""
    kwargs = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32]}
    rules = layer_decay("convnext", 0.5, model_kwargs=kwargs)
    assert [r[1] for r in rules] == [0.5 ** 5, 0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5, 1.0]
    assert rules[0][0] == "backbone/stem_conv/.*|backbone/stem_norm/.*"
    assert "backbone/stage2_downsample_conv/.*" in rules[3][0].split("|")
    assert set(rules[5][0].split("|")) == {"backbone/norm/.*", "head/.*"}
    assert layer_decay("convnext_tiny", 0.5)[1][1] == 0.5 ** 4
    params = jax.eval_shape(lambda: get_model("convnext", 3, **kwargs).init(jax.random.key(0),
                                                                              jnp.zeros((1, 32, 32, 3))))["params"]
    table = match_rules(params, rules)  # every param matched, every rule used
    assert table["backbone/stage3_block0/gamma"] == 0.5 and table["backbone/stem_norm/scale"] == 0.5 ** 5


@pytest.mark.slow
def test_converted_convnext_fine_tunes_frozen_and_with_layer_decay_and_ranks(tmp_path, tfds_data_dir):
    """End to end on mnist5k (1 channel, 32 px): a converted Hugging Face ConvNeXt trains with a frozen backbone
    and with layer-wise LR decay, its recorded normalisation applied by default; `tl-jax rank` scores it."""
    hf_reference(tmp_path, head=False, num_channels=1)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.2], "image_std": [0.3], "size": {"shortest_edge": 32}, "crop_pct": 0.875, "resample": 3}))
    res = convert_weights(tmp_path / "hf", out=tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["preprocessing"]["image_size"] == [32, 32] and meta["preprocessing"]["resize"] == 36
    loaded = load_variables(str(tmp_path / "ck"))
    pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 32}]

    def run(name, **overrides):
        c = config_lib.load_config("tests/configs/tiny.py:steps=4")
        c.data.data_dir = tfds_data_dir
        c.data.train_pp, c.data.eval_pp = list(pp), list(pp)
        c.model.name, c.model.kwargs, c.init_from = res.model, res.model_kwargs, str(tmp_path / "ck")
        for key, value in overrides.items():
            config_lib.apply_overrides(c, [f"{key}={json.dumps(value)}"])
        train(c, str(tmp_path / name))
        return json.loads((tmp_path / name / "config.json").read_text()), load_variables(str(tmp_path / name))

    recorded, frozen = run("frozen", param_rules=[["backbone/.*", None], [".*", 1.0]])
    assert recorded["data"]["train_pp"][-1] == {"op": "normalize", "mean": [0.2], "std": [0.3]}
    for path, value in flatten_paths(loaded["params"]).items():
        np.testing.assert_array_equal(flatten_paths(frozen["params"])[path], value)
    rules = layer_decay("convnext", 0.5, loaded["params"] | {"head": frozen["params"]["head"]})
    _, tuned = run("llrd", param_rules=rules)
    before, after = flatten_paths(loaded["params"]), flatten_paths(tuned["params"])
    assert np.abs(after["backbone/stage3_block0/fc2/kernel"] - before["backbone/stage3_block0/fc2/kernel"]).max() > 0
    assert main(["rank", "--target", "tests/configs/tiny.py", f"--config.data.data_dir={tfds_data_dir}",
                 f"--config.data.eval_pp={json.dumps(pp + [{'op': 'normalize', 'mean': [0.2], 'std': [0.3]}])}",
                 "--config.data.shots=5", "--candidates", str(tmp_path / "ck"), str(tmp_path / "llrd"),
                 "--score", "logme", "--out", str(tmp_path / "rank")]) == 0
