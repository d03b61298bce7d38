"""timm checkpoints -> tl_jax (tl_jax/weights/timm_source.py): ConvNeXt and ResNet-50 parity, detection, errors.

The references are timm's own models (random init, norms/LayerScale/BN statistics
perturbed), saved by ``timm.models.save_for_hf`` as the Hub has them, built in a
subprocess by tests/reference_timm.py (see its doc for why a subprocess). Features
(timm's pre-logits) and logits must agree within 1e-5 relative, float32.
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

from tl_jax.cli import main
from tl_jax.models import get_model
from tl_jax.train.checkpoint import load_variables
from tl_jax.weights import WeightMappingError, convert_weights
from tl_jax.weights.timm_source import convert_timm, family, is_timm, timm_vit_tensors

torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402
from test_weights import Basic, TorchResNet  # noqa: E402  (torchvision's ResNet layout, written out)

torch.set_num_threads(1)

REFERENCE = pathlib.Path(__file__).with_name("reference_timm.py")
TINY = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 5}
VIT = {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 32, "patch_size": 8, "num_classes": 5}
SPECS = [
    {"name": "convnext_convmlp", "timm": "convnext_atto", "kwargs": TINY},  # MLP as 1x1 convs, safetensors
    {"name": "convnext_linear", "timm": "convnext_tiny", "kwargs": TINY, "safe": False, "size": 64},  # .bin
    # timm's plain stem is 64 wide whatever `channels` says: the real resnet50 (25M params), 32 px inputs
    {"name": "resnet50", "timm": "resnet50", "kwargs": {"num_classes": 4}},
    {"name": "vit", "timm": "vit_base_patch16_224", "kwargs": {**VIT, "dynamic_img_size": True}, "size2": 56},
    {"name": "deit_distilled", "timm": "deit_base_distilled_patch16_224", "kwargs": VIT, "features": "cls_dist"},
    {"name": "deit3", "timm": "deit3_small_patch16_224", "kwargs": VIT},  # LayerScale, patch-only positions
    # pre-norm, no patch bias, LayerNorm eps 1e-5, QuickGELU: read from the architecture name
    {"name": "vit_clip", "timm": "vit_base_patch16_clip_quickgelu_224", "kwargs": VIT},
    # 4 registers, no class token, mean of the patches then fc_norm (timm's reg4_gap models)
    {"name": "vit_reg_avg", "timm": "vit_base_patch16_reg4_gap_256", "kwargs": VIT},
    {"name": "vit_avg_cls", "timm": "vit_base_patch16_224", "kwargs": {**VIT, "global_pool": "avg", "fc_norm": False}},
    {"name": "vit_map", "timm": "vit_base_patch16_224", "kwargs": {**VIT, "global_pool": "map", "class_token": False}},
]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> pathlib.Path:
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install -e .[test])")
    out = tmp_path_factory.mktemp("timm_refs")
    subprocess.run([sys.executable, str(REFERENCE), str(out), json.dumps(SPECS)], check=True, timeout=600)
    return out


def close(got, want, rtol=1e-5):
    """Within ``rtol`` of the largest reference magnitude."""
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def run_converted(ck: pathlib.Path, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    meta = json.loads((ck / "tl_jax_weights.json").read_text())
    model = get_model(meta["model"], meta["num_classes"], **meta["model_kwargs"])
    fn = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    logits, feats = fn(load_variables(str(ck)), x_nchw.transpose(0, 2, 3, 1))
    return np.asarray(logits), np.asarray(feats)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_convmlp", "convnext_linear", "resnet50"])
def test_timm_parity(refs, tmp_path, name):
    folder = refs / name
    assert is_timm(folder)
    res = convert_weights(folder, out=tmp_path / "ck")  # detected from timm's config.json: no flags
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "timm" and meta["architecture"] == json.loads((folder / "config.json").read_text())[
        "architecture"]
    assert meta["files"][0]["name"] in ("model.safetensors", "pytorch_model.bin")
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing"]["image_size"] == [224, 224]
    if name.startswith("convnext"):
        assert res.model == "convnext" and res.model_kwargs["dims"] == TINY["dims"]
        assert meta["mapping"] == "timm_convnext" and res.dropped == ()
    else:
        assert res.model == "resnet50" and res.model_kwargs == {"base_width": 64, "stem": "imagenet"}
        assert all(d.endswith("num_batches_tracked") for d in res.dropped) and len(res.dropped) == 53
    ref = np.load(folder / "reference.npz")
    logits, feats = run_converted(tmp_path / "ck", ref["x"])
    close(feats, ref["features"])
    close(logits, ref["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "deit_distilled", "deit3", "vit_clip", "vit_reg_avg", "vit_avg_cls",
                                  "vit_map"])
def test_timm_vit_parity(refs, tmp_path, name):
    res = convert_weights(refs / name, out=tmp_path / "ck")
    assert res.model == "vit" and res.model_kwargs["num_heads"] == 4 and res.model_kwargs["pos_grid"] == [4, 4]
    pooling = {"deit_distilled": "cls_dist", "vit_reg_avg": "gap", "vit_avg_cls": "gap", "vit_map": "map"}
    assert res.model_kwargs["pooling"] == pooling.get(name, "cls")
    assert (res.model_kwargs["num_registers"], res.model_kwargs["pool_norm"]) == \
        ((4, True) if name == "vit_reg_avg" else (0, False))
    assert (res.model_kwargs["layer_scale"] is not None) == (name == "deit3")
    assert (res.model_kwargs["act"], res.model_kwargs["pre_norm"], res.model_kwargs["norm_eps"]) == \
        (("quick_gelu", True, 1e-5) if name == "vit_clip" else ("gelu", False, 1e-6))
    ref = np.load(refs / name / "reference.npz")
    logits, feats = run_converted(tmp_path / "ck", ref["x"])
    close(feats, ref["features"])
    close(logits, ref["logits"])
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["mapping"] == "timm_vit" and meta["format"] == "timm" and meta["dropped"] == []
    if "x2" in ref:  # 56 px: the 4x4 table resized to 7x7 (antialiased bicubic), against timm's own resize
        close(run_converted(tmp_path / "ck", ref["x2"])[0], ref["logits2"], rtol=1e-4)


@pytest.mark.slow
def test_timm_bare_file_with_timm_name_and_errors(refs, tmp_path):
    src = refs / "convnext_convmlp" / "model.safetensors"
    bare = tmp_path / "bare" / "convnext_atto_d2.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match="no timm config.json beside it; pass timm_name="):
        convert_timm(bare, out=None)
    res = convert_timm(bare, timm_name="convnext_atto.d2_in1k", out=tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["preprocessing"]["source"] == "defaults of timm convnext_atto.d2_in1k"
    ref = np.load(refs / "convnext_convmlp" / "reference.npz")
    close(run_converted(tmp_path / "ck", ref["x"])[0], ref["logits"])
    assert res.num_classes == 5
    with pytest.raises(ValueError, match="--timm-name resnet50 but .* config.json says convnext_atto"):
        convert_timm(refs / "convnext_convmlp", timm_name="resnet50", out=None)
    t = load_file(src)
    t["stages.1.blocks.0.conv_dw.weight"] = t["stages.1.blocks.0.conv_dw.weight"][:, :, :5, :5]
    t["stages.9.extra.weight"] = np.zeros(2, np.float32)
    save_file(t, tmp_path / "bad.safetensors")
    with pytest.raises(WeightMappingError) as e:
        convert_timm(tmp_path / "bad.safetensors", timm_name="convnext_atto", out=None)
    msg = str(e.value)
    assert "shape mismatch: stages.1.blocks.0.conv_dw.weight (16, 1, 5, 5) -> params/backbone/stage1_block0/" \
           "dwconv/kernel (5, 5, 1, 16), model expects (7, 7, 1, 16)" in msg
    assert "unused source tensor stages.9.extra.weight (2,): no rule of mapping 'timm_convnext'" in msg


def test_timm_resnet_torchvision_layout_without_timm(tmp_path):
    """A timm resnet18 folder (timm's names are torchvision's; config.json as save_for_hf writes it)."""
    ref = TorchResNet(Basic, (2, 2, 2, 2), base_width=4, num_classes=3).eval()
    (tmp_path / "r18").mkdir()
    save_torch({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "r18" / "model.safetensors")
    cfg = {"architecture": "resnet18", "num_classes": 3, "pretrained_cfg": {
        "input_size": [3, 160, 160], "crop_pct": 0.95, "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "r18" / "config.json").write_text(json.dumps(cfg))
    res = convert_weights(tmp_path / "r18", out=tmp_path / "ck")
    assert res.model == "resnet18" and res.num_classes == 3
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["preprocessing"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": [160, 160], "resize": 168,
                                     "interpolation": "bilinear", "source": "config.json pretrained_cfg"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x).numpy()
    close(run_converted(tmp_path / "ck", x.numpy())[0], want, rtol=1e-4)
    save_torch({k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("layer4.1.")},
               tmp_path / "r18" / "model.safetensors")
    with pytest.raises(ValueError, match=r"BasicBlock stages \(2, 2, 2, 1\); tl_jax's zoo builds resnet18"):
        convert_weights(tmp_path / "r18", out=None)


def test_family_names():
    assert family("convnext_tiny.fb_in22k_ft_in1k") == "convnext"
    assert family("resnet50.a1_in1k") == family("resnet18") == "resnet"
    with pytest.raises(ValueError, match="'resnet50d' is not one tl_jax converts"):
        family("resnet50d")
    with pytest.raises(ValueError, match="'convnextv2_atto' is not one tl_jax converts"):
        family("convnextv2_atto")


def test_timm_vit_refusals_are_one_line():
    base = {"patch_embed.proj.weight": np.zeros((8, 3, 4, 4)), "pos_embed": np.zeros((1, 5, 8)),
            "blocks.0.mlp.fc1.weight": np.zeros((16, 8)), "cls_token": np.zeros((1, 1, 8))}
    with pytest.raises(ValueError, match=r"global_pool='avgmax'; tl_jax's vit converts 'token', 'avg' and 'map'"):
        timm_vit_tensors({**base, "fc_norm.weight": np.ones(8)}, {"global_pool": "avgmax"}, "vit_base_patch16_224")
    with pytest.raises(ValueError, match=r"positions on the 4 register tokens \(no_embed_class=False\)"):
        timm_vit_tensors({**base, "reg_token": np.zeros((1, 4, 8)), "pos_embed": np.zeros((1, 21, 8))}, {},
                         "vit_base_patch16_reg4_256")
    with pytest.raises(ValueError, match="without the prefix tokens"):
        timm_vit_tensors({**base, "attn_pool.latent": np.zeros((1, 1, 8))}, {"global_pool": "map"}, "vit_x")
    t, kw = timm_vit_tensors(dict(base, **{"pos_embed": np.ones((1, 4, 8))}), {}, "deit3_small_patch16_224")
    assert t["pos_embed"].shape == (1, 5, 8) and not t["pos_embed"][0, 0].any() and t["pos_embed"][0, 1:].all()
    assert kw["num_heads"] == 6 and kw["pos_grid"] == [2, 2] and kw["act"] == "gelu" and kw["norm_eps"] == 1e-6


def test_cli_timm_name_for_a_bare_file(tmp_path, capsys):
    """`tl-jax weights convert --from FILE --timm-name ARCH`: a timm cache file has no config.json beside it."""
    ref = TorchResNet(Basic, (2, 2, 2, 2), base_width=4, num_classes=3).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18_a1_0-d63eafa0.pth")
    args = ["weights", "convert", "--from", str(tmp_path / "resnet18_a1_0-d63eafa0.pth"), "--out", str(tmp_path / "ck")]
    assert main([*args, "--timm-name", "resnet18.a1_in1k"]) == 0
    assert "--config.model.name=resnet18" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "timm" and meta["architecture"] == "resnet18.a1_in1k"
    assert meta["preprocessing"]["source"] == "defaults of timm resnet18.a1_in1k"
    assert main([*args, "--timm-name", "resnet18", "--model", "resnet18", "--overwrite"]) == 2
    assert "leave --mapping and --model out" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2  # a bare file: nothing to recognise it by
    assert "or --timm-name ARCH for a timm file without its config.json" in capsys.readouterr().err
