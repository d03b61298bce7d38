"""open_clip image towers -> tl_jax's vit (tl_jax/weights/open_clip_source.py).

The reference is open_clip's own CLIP (random init, LayerNorms and LayerScale
perturbed), saved as ``push_to_hf_hub`` does (open_clip_model.safetensors +
open_clip_config.json), built by tests/reference_timm.py in a subprocess.
``encode_image`` (the projected embedding) and tl_jax's features must agree within
1e-5 relative, float32; at another input size (``size2``: open_clip's own
``resize_pos_embed`` into a tower built at that size) within 1e-4.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tl_jax.models import get_model
from tl_jax.train.checkpoint import load_variables
from tl_jax.weights import convert_weights
from tl_jax.weights.open_clip_source import is_open_clip, tower_kwargs

REFERENCE = pathlib.Path(__file__).with_name("reference_timm.py")
TEXT = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}
SPECS = [
    {"name": "plain", "library": "open_clip", "model_cfg": {
        "embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8,
                                        "patch_size": 8}, "text_cfg": TEXT}, "size2": 24},  # 4x4 -> 3x3
    {"name": "quickgelu_ls", "library": "open_clip", "model_cfg": {
        "embed_dim": 12, "quick_gelu": True, "text_cfg": TEXT,
        "vision_cfg": {"image_size": 24, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                       "ls_init_value": 0.5}}, "size2": 40},  # 3x3 positions -> 5x5 (resize_pos_embed)
]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> pathlib.Path:
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install -e .[test])")
    out = tmp_path_factory.mktemp("open_clip_refs")
    subprocess.run([sys.executable, str(REFERENCE), str(out), json.dumps(SPECS)], check=True, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "quickgelu_ls"])
def test_open_clip_parity(refs, tmp_path, name):
    folder = refs / name
    assert is_open_clip(folder)
    res = convert_weights(folder, out=tmp_path / "ck")  # recognised by open_clip_config.json
    spec = next(s for s in SPECS if s["name"] == name)["model_cfg"]
    assert res.model == "vit" and res.model_kwargs["projection_dim"] == 12
    assert res.model_kwargs["act"] == ("quick_gelu" if spec.get("quick_gelu") else "gelu")
    assert res.model_kwargs["num_heads"] == 32 // spec["vision_cfg"]["head_width"]
    assert "logit_scale" in res.dropped and any(d.startswith("transformer.resblocks.") for d in res.dropped)
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "open_clip" and meta["files"][0]["name"] == "open_clip_model.safetensors"
    assert meta["preprocessing"]["mean"][0] == pytest.approx(0.48145466) and meta["has_head"] is False
    ref = np.load(folder / "reference.npz")
    model = get_model("vit", 1, **res.model_kwargs)
    variables = load_variables(str(tmp_path / "ck"))
    feats = jax.jit(lambda v, x: model.apply(v, x, method=model.embed))(variables, ref["x"].transpose(0, 2, 3, 1))
    want = ref["features"]
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # another size: the table resized on the fly as open_clip's resize_pos_embed does it (antialiased bicubic)
    feats2 = jax.jit(lambda v, x: model.apply(v, x, method=model.embed))(variables, ref["x2"].transpose(0, 2, 3, 1))
    want = ref["features2"]
    assert feats2.shape == want.shape
    np.testing.assert_allclose(np.asarray(feats2), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_open_clip_refusals():
    t = {"conv1.weight": np.zeros((32, 3, 8, 8)), "positional_embedding": np.zeros((17, 32)),
         "transformer.resblocks.0.mlp.c_fc.weight": np.zeros((128, 32)), "ln_pre.weight": np.ones(32)}
    kw = tower_kwargs({"model_cfg": {"vision_cfg": {"head_width": 16}}}, t, "x")
    assert kw["num_heads"] == 2 and kw["pos_grid"] == [4, 4] and kw["pre_norm"] and "projection_dim" not in kw
    with pytest.raises(ValueError, match="vision_cfg.attentional_pool=True; tl_jax converts open_clip's plain"):
        tower_kwargs({"model_cfg": {"vision_cfg": {"attentional_pool": True}}}, t, "x")
    with pytest.raises(ValueError, match="vision_cfg.timm_model_name='convnext_base'"):
        tower_kwargs({"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_base"}}}, t, "x")
