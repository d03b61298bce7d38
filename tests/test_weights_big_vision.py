"""big_vision ViT .npz -> tl_jax's vit (tl_jax/weights/big_vision_source.py).

The reference: a random ViT written in big_vision's naming (tests/reference_timm.py's
``big_vision_params``: today's names, optionally scanned, under ``params/``) and read
by timm's own ``_load_weights`` into its VisionTransformer (posemb before the class
token, tanh GELU, as big_vision's vit.py). timm's features and logits and the
converted tl_jax model's must agree within 1e-5 relative, float32. At 56 px (4x4
positions -> 7x7) the reference is timm on a second ``.npz`` whose table big_vision's
own ``resample_posemb`` (transcribed in tests/reference_timm.py, scipy's zoom) resized:
within 1e-4.
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
from tl_jax.weights.big_vision_source import convert_big_vision, is_big_vision

from reference_timm import big_vision_params  # noqa: E402  (plain numpy: no timm needed)

REFERENCE = pathlib.Path(__file__).with_name("reference_timm.py")

SIZE = {"width": 32, "depth": 2, "heads": 4, "mlp": 64, "patch": 8, "grid": 4, "size2": 56}  # 56 px: 4x4 -> 7x7
SPECS = [
    {"name": "tok", "library": "big_vision", "pool": "tok", "prefix": "params/", **SIZE},
    {"name": "gap_scan", "library": "big_vision", "pool": "gap", "scan": True, **SIZE},
    {"name": "map", "library": "big_vision", "pool": "map", "prefix": "params/img/", **SIZE},
    # the original vision_transformer repo's .npz (augreg): LayerNorm_2, ..._1, MlpBlock_3, posembed_input with cls
    {"name": "vintage", "library": "big_vision", "pool": "tok", "vintage": "vision_transformer", **SIZE},
]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> pathlib.Path:
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install -e .[test])")
    out = tmp_path_factory.mktemp("big_vision_refs")
    subprocess.run([sys.executable, str(REFERENCE), str(out), json.dumps(SPECS)], check=True, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tok", "gap_scan", "map", "vintage"])
def test_big_vision_parity(refs, tmp_path, name):
    npz = refs / name / "model.npz"
    assert is_big_vision(npz)
    res = convert_weights(npz, out=tmp_path / "ck")  # recognised from its names
    assert res.model == "vit" and res.num_classes == 5
    assert res.model_kwargs["pooling"] == {"tok": "cls", "gap_scan": "gap", "map": "map", "vintage": "cls"}[name]
    assert res.model_kwargs["num_heads"] == 4 and res.model_kwargs["act"] == "gelu_tanh"
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "big_vision" and meta["preprocessing"]["mean"] == [0.5] * 3
    ref = np.load(refs / name / "reference.npz")
    model = get_model("vit", 5, **res.model_kwargs)
    fn = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    logits, feats = fn(load_variables(str(tmp_path / "ck")), ref["x"].transpose(0, 2, 3, 1))
    for got, want in ((feats, ref["features"]), (logits, ref["logits"])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert res.model_kwargs["pos_interp"] == "zoom_linear"  # at 56 px: against big_vision's own resample_posemb
    logits2, _ = fn(load_variables(str(tmp_path / "ck")), ref["x2"].transpose(0, 2, 3, 1))
    want = ref["logits2"]
    np.testing.assert_allclose(np.asarray(logits2), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_big_vision_names_and_errors(tmp_path):
    flat = big_vision_params({"pool": "tok", "prefix": "params/img/", **SIZE}, np.random.default_rng(0))
    flat["params/txt/Encoder_0/x"] = np.zeros(3, np.float32)  # a two-tower model's text tower
    flat["params/t"] = np.zeros(1, np.float32)
    np.savez(tmp_path / "siglip.npz", **flat)
    res = convert_big_vision(tmp_path / "siglip.npz", out=None)
    assert res.dropped == ("params/t", "params/txt/Encoder_0/x")
    pos = res.variables["params"]["backbone"]["pos_embedding"]
    assert pos.shape == (1, 17, 32) and not pos[0, 0].any()  # zero row for the class token
    np.testing.assert_array_equal(pos[0, 1:], flat["params/img/pos_embedding"][0])
    q = res.variables["params"]["backbone"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    np.testing.assert_array_equal(q, flat["params/img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/"
                                          "query/kernel"])
    old = {k.replace("params/img/", "").replace("MlpBlock_0", "MlpBlock_3"): v for k, v in flat.items()
           if k.startswith("params/img/")}
    old["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    np.savez(tmp_path / "old.npz", **old)
    with pytest.raises(ValueError, match="pre_logits .*ignore=\\['pre_logits/.\\*'\\]"):
        convert_weights(tmp_path / "old.npz", out=None)
    res = convert_big_vision(tmp_path / "old.npz", out=None, ignore=["pre_logits/.*"])
    assert res.dropped == ("pre_logits/kernel",) and res.model_kwargs["depth"] == 2
    with pytest.raises(ValueError, match="ignore rule 'nothing' matches no tensor"):
        convert_big_vision(tmp_path / "old.npz", out=None, ignore=["nothing"])
    assert not is_big_vision(tmp_path) and not is_big_vision(tmp_path / "missing.npz")


@pytest.mark.parametrize("n_in,n_out", [(4, 7), (7, 4), (14, 24), (3, 3)])
def test_zoom_linear_is_scipy_zoom_order_1(n_in, n_out):
    """``pos_interp='zoom_linear'`` = big_vision's resample_posemb: ``scipy.ndimage.zoom(grid, ..., order=1)``."""
    import scipy.ndimage

    from tl_jax.models.vit_posemb import resize_grid

    grid = np.random.default_rng(n_in).normal(size=(n_in, n_in, 5)).astype(np.float32)
    want = scipy.ndimage.zoom(grid, (n_out / n_in, n_out / n_in, 1), order=1)
    np.testing.assert_allclose(np.asarray(resize_grid(grid, (n_out, n_out), "zoom_linear")), want, atol=1e-6)
