"""Vision transformers imported from Hugging Face folders: parity with transformers, strict errors, provenance.

Each reference model is built by transformers with random init (tiny: D=64, 2 blocks, patch 4, 32 px),
every constant parameter (LayerNorm scale/bias, LayerScale, tokens, zero biases) perturbed so a
swapped or skipped tensor shows, written with ``save_pretrained``, converted, and run in tl_jax.
"""
from __future__ import annotations

import hashlib
import json
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tl_jax.models import get_model  # noqa: E402
from tl_jax.params.param_rules import flatten_paths  # noqa: E402
from tl_jax.train.checkpoint import load_variables  # noqa: E402
from tl_jax.weights import WeightMappingError, convert_weights  # noqa: E402

torch.set_num_threads(1)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
            max_position_embeddings=16)


def perturbed(model):
    """``model`` in eval mode with every constant-valued parameter (ones, zeros) replaced by noise."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or float(p.std()) == 0.0:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def save(model, folder):
    model.save_pretrained(folder)
    return folder


def images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tl_run(out_dir, x_nchw: torch.Tensor):
    """(logits, features) of the converted checkpoint in ``out_dir`` on NCHW images."""
    meta = json.loads((out_dir / "tl_jax_weights.json").read_text())
    model = get_model(meta["model"], meta["num_classes"], **meta["model_kwargs"])
    x = x_nchw.numpy().transpose(0, 2, 3, 1)
    variables = load_variables(str(out_dir))
    if not meta["has_head"]:  # a headless source: a fresh head (the features do not depend on it)
        fresh = model.init(jax.random.key(0), x)
        variables = {**variables, "params": {**variables["params"], "head": fresh["params"]["head"]}}
    fn = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    logits, feats = fn(variables, x)
    return np.asarray(logits), np.asarray(feats)


def assert_rel(got, want, tol: float) -> None:
    """max |got - want| <= tol * max |want| (relative to the output's scale)."""
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def test_vit_for_image_classification_parity_and_provenance(tmp_path):
    ref = perturbed(transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=5)))
    src = save(ref, tmp_path / "vit")
    res = convert_weights(src, out=tmp_path / "ck")
    assert res.model == "vit" and res.num_classes == 5 and res.model_kwargs["pooling"] == "cls"
    x = images(32)
    with torch.no_grad():
        want = ref(x, output_hidden_states=True)
    logits, feats = tl_run(tmp_path / "ck", x)
    assert_rel(logits, want.logits, 1e-5)
    assert_rel(feats, ref.vit.layernorm(want.hidden_states[-1])[:, 0], 1e-5)
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["format"] == "huggingface" and meta["architecture"] == "ViTForImageClassification"
    assert meta["files"] == [{"name": "model.safetensors",
                              "sha256": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}]
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["preprocessing"]["image_size"] == [32, 32]
    # another resolution: the table is resized like transformers' interpolate_pos_encoding
    x48 = images(48, seed=2)
    with torch.no_grad():
        want48 = ref(x48, interpolate_pos_encoding=True).logits
    assert_rel(tl_run(tmp_path / "ck", x48)[0], want48, 1e-4)


def test_deit_with_teacher_two_heads_as_one(tmp_path):
    cfg = transformers.DeiTConfig(**TINY, num_labels=4)
    ref = perturbed(transformers.DeiTForImageClassificationWithTeacher(cfg))
    res = convert_weights(save(ref, tmp_path / "deit"), out=tmp_path / "ck")
    assert res.model_kwargs["pooling"] == "cls_dist" and res.model_kwargs["dist_token"] is True
    x = images(32)
    with torch.no_grad():
        want = ref(x)
        hidden = ref.deit(x).last_hidden_state
    logits, feats = tl_run(tmp_path / "ck", x)
    assert_rel(logits, want.logits, 1e-5)
    assert_rel(feats, torch.cat([hidden[:, 0], hidden[:, 1]], -1), 1e-5)
    x40 = images(40, seed=3)
    with torch.no_grad():
        want40 = ref(x40, interpolate_pos_encoding=True).logits
    assert_rel(tl_run(tmp_path / "ck", x40)[0], want40, 1e-4)


def test_dinov2_with_registers_features_and_interpolation(tmp_path):
    cfg = transformers.Dinov2WithRegistersConfig(**{k: v for k, v in TINY.items() if k != "intermediate_size"},
                                                 mlp_ratio=2, num_register_tokens=3)
    ref = perturbed(transformers.Dinov2WithRegistersModel(cfg))
    res = convert_weights(save(ref, tmp_path / "dino"), out=tmp_path / "ck")
    kw = res.model_kwargs
    assert (kw["num_registers"], kw["layer_scale"], kw["pos_interp"], kw["mlp_dim"]) == (3, 1.0, "bicubic_aa", 128)
    assert res.dropped == ("embeddings.mask_token",)
    for size, tol in ((32, 1e-5), (48, 1e-4), (24, 1e-4)):  # native, up (antialiased bicubic), down
        x = images(size, seed=size)
        with torch.no_grad():
            want = ref(x).pooler_output
        assert_rel(tl_run(tmp_path / "ck", x)[1], want, tol)


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2_classifier_reads_cls_and_patch_mean(tmp_path, registers):
    sizes = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**sizes, mlp_ratio=2, num_labels=3, num_register_tokens=2)
        ref = perturbed(transformers.Dinov2WithRegistersForImageClassification(cfg))
    else:
        ref = perturbed(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**sizes, mlp_ratio=2,
                                                                                             num_labels=3)))
    res = convert_weights(save(ref, tmp_path / "dino"), out=tmp_path / "ck")
    assert res.model_kwargs["pooling"] == "cls_gap" and res.model_kwargs["num_registers"] == registers
    assert res.model_kwargs["pos_interp"] == ("bicubic_aa" if registers else "bicubic")
    x = images(32)
    with torch.no_grad():
        want = ref(x).logits
    logits, feats = tl_run(tmp_path / "ck", x)
    assert feats.shape == (2, 128)  # concat(class token, mean of the patch tokens; registers left out)
    assert_rel(logits, want, 1e-5)


def test_dinov2_swiglu_giant_style_mlp(tmp_path):
    cfg = transformers.Dinov2Config(**{k: v for k, v in TINY.items() if k != "intermediate_size"}, use_swiglu_ffn=True)
    ref = perturbed(transformers.Dinov2Model(cfg))
    res = convert_weights(save(ref, tmp_path / "dino"), out=tmp_path / "ck")
    assert (res.model_kwargs["act"], res.model_kwargs["mlp_dim"]) == ("swiglu", 176)  # (int(256 * 2/3) + 7) // 8 * 8
    x = images(32)
    with torch.no_grad():
        want = ref(x).pooler_output
    assert_rel(tl_run(tmp_path / "ck", x)[1], want, 1e-5)


def test_clip_vision_with_projection_and_full_clip_model(tmp_path):
    vcfg = transformers.CLIPVisionConfig(**TINY, projection_dim=16)
    ref = perturbed(transformers.CLIPVisionModelWithProjection(vcfg))
    res = convert_weights(save(ref, tmp_path / "clipv"), out=tmp_path / "ck")
    kw = res.model_kwargs
    assert (kw["act"], kw["pre_norm"], kw["patch_bias"], kw["projection_dim"]) == ("quick_gelu", True, False, 16)
    x = images(32)
    with torch.no_grad():
        want = ref(x).image_embeds
    assert_rel(tl_run(tmp_path / "ck", x)[1], want, 1e-5)
    x40 = images(40, seed=4)
    with torch.no_grad():
        want40 = ref(x40, interpolate_pos_encoding=True).image_embeds
    assert_rel(tl_run(tmp_path / "ck", x40)[1], want40, 1e-4)
    # a full CLIPModel: the vision tower and its projection; the text tower dropped on purpose
    full = perturbed(transformers.CLIPModel(transformers.CLIPConfig(vision_config=TINY, text_config=TEXT,
                                                                    projection_dim=16)))
    res = convert_weights(save(full, tmp_path / "clip"), out=tmp_path / "ck2",
                          ignore=[r"visual_projection\.weight"])
    assert "projection_dim" not in res.model_kwargs
    assert "logit_scale" in res.dropped and any(d.startswith("text_model.") for d in res.dropped)
    assert r"visual_projection\.weight" not in res.dropped and "visual_projection.weight" in res.dropped
    with torch.no_grad():
        want = full.vision_model(x).pooler_output
    assert_rel(tl_run(tmp_path / "ck2", x)[1], want, 1e-5)
    assert json.loads((tmp_path / "ck2" / "tl_jax_weights.json").read_text())["preprocessing"]["std"][0] == \
        pytest.approx(0.26862954)


def test_siglip_vision_map_head_and_full_model(tmp_path):
    ref = perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)))
    res = convert_weights(save(ref, tmp_path / "sig"), out=tmp_path / "ck")
    assert res.model_kwargs["pooling"] == "map" and res.model_kwargs["class_token"] is False
    x = images(32)
    with torch.no_grad():
        want = ref(x).pooler_output
    assert_rel(tl_run(tmp_path / "ck", x)[1], want, 1e-5)
    x48 = images(48, seed=5)
    with torch.no_grad():
        want48 = ref(x48, interpolate_pos_encoding=True).pooler_output
    assert_rel(tl_run(tmp_path / "ck", x48)[1], want48, 1e-4)
    full = perturbed(transformers.SiglipModel(transformers.SiglipConfig(vision_config=TINY, text_config=TEXT)))
    convert_weights(save(full, tmp_path / "sigfull"), out=tmp_path / "ck2")
    with torch.no_grad():
        want = full.vision_model(x).pooler_output
    assert_rel(tl_run(tmp_path / "ck2", x)[1], want, 1e-5)


def test_mismatch_is_one_line_naming_both_paths(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = save(perturbed(transformers.ViTModel(transformers.ViTConfig(**TINY))), tmp_path / "vit")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["encoder.layer.1.layernorm_after.weight"] = np.ones(7, np.float32)
    tensors["encoder.layer.0.extra.weight"] = np.ones(3, np.float32)
    del tensors["encoder.layer.0.output.dense.bias"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(WeightMappingError) as e:
        convert_weights(src, out=tmp_path / "ck")
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3
    assert any("encoder.layer.1.layernorm_after.weight (7,) -> params/backbone/encoderblock_1/LayerNorm_1/scale"
               in ln and "(64,)" in ln for ln in lines)
    assert any("unused source tensor encoder.layer.0.extra.weight" in ln for ln in lines)
    assert any("unfilled target params/backbone/encoderblock_0/MlpBlock_0/Dense_1/bias" in ln for ln in lines)
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="cannot tell what"):
        convert_weights(tmp_path, out=tmp_path / "ck")


def test_cli_convert_without_flags_and_layer_decay_over_every_vit_part(tmp_path, capsys):
    """`tl-jax weights convert --from FOLDER --out DIR` recognises the folder; layer-wise LR decay covers
    registers, LayerScale, CLIP's pre-norm and projection, SigLIP's MAP head."""
    from tl_jax.cli import main
    from tl_jax.params.layer_decay import layer_decay
    sizes = {**{k: v for k, v in TINY.items() if k != "intermediate_size"}, "patch_size": 6, "image_size": 36}
    dino = transformers.Dinov2WithRegistersConfig(**sizes, num_register_tokens=2)  # 6 px patches: 32 px no multiple
    save(perturbed(transformers.Dinov2WithRegistersModel(dino)), tmp_path / "dino")
    assert main(["weights", "convert", "--from", str(tmp_path / "dino"), "--out", str(tmp_path / "ck")]) == 0
    assert "--config.model.name=vit" in capsys.readouterr().out
    assert main(["weights", "convert", "--from", str(tmp_path / "dino"), "--out", str(tmp_path / "ck2"),
                 "--model", "resnet18"]) == 2
    assert "not --model 'resnet18'" in capsys.readouterr().err and not (tmp_path / "ck2").exists()
    save(perturbed(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY, projection_dim=8))),
         tmp_path / "clip")
    save(perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))), tmp_path / "sig")
    for name in ("dino", "clip", "sig"):
        res = convert_weights(tmp_path / name, out=None)
        rules = layer_decay("vit", 0.5, res.variables["params"])
        shapes_only = layer_decay("vit", 0.5, model_kwargs=res.model_kwargs)  # no params: the model's shapes
        assert shapes_only[:-1] == rules[:-1] and shapes_only[-1] == [rules[-1][0] + "|head/.*", 1.0]
        depth = {}
        for path in flatten_paths(res.variables["params"]):
            hits = [rate for rx, rate in rules if re.fullmatch(rx, path)]
            assert len(hits) == 1, (name, path, hits)
            depth[path] = hits[0]
        low, top = min(depth.values()), max(depth.values())
        assert low == 0.5 ** 3 and top == 1.0  # embedding side: 3 levels below the features (2 blocks)
        for path, rate in depth.items():
            if path.split("/")[1] in ("reg", "cls", "pos_embedding", "embedding", "pre_norm"):
                assert rate == low, path
            if path.split("/")[1] in ("encoder_norm", "map_head", "projection"):
                assert rate == top, path


@pytest.mark.slow
def test_converted_vit_fine_tunes_frozen_and_with_layer_decay_and_ranks(tmp_path, tfds_data_dir):
    """End to end on mnist5k (1 channel, 14 px -> 16 px): a converted ViT trains with a frozen backbone and
    with layer-wise LR decay, its recorded normalisation applied by default; `tl-jax rank` scores it and
    `tl-jax fewshot` evaluates its features."""
    from tl_jax import config as config_lib
    from tl_jax.cli import main
    from tl_jax.params.layer_decay import layer_decay
    from tl_jax.train.loop import train

    cfg_hf = transformers.ViTConfig(**{**TINY, "image_size": 16, "num_channels": 1, "hidden_size": 32,
                                       "intermediate_size": 64})
    src = save(perturbed(transformers.ViTModel(cfg_hf)), tmp_path / "hf")
    (src / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.2], "image_std": [0.3], "size": {"height": 16, "width": 16}, "resample": 2}))
    res = convert_weights(src, out=tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "tl_jax_weights.json").read_text())
    assert meta["preprocessing"]["mean"] == [0.2] and meta["preprocessing"]["source"] == "preprocessor_config.json"
    loaded = load_variables(str(tmp_path / "ck"))

    def run(name, **overrides):
        c = config_lib.load_config("tests/configs/tiny.py:steps=4")
        c.data.data_dir = tfds_data_dir
        pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 12}]  # 12 px: the 4x4 table resized to 3x3
        c.data.train_pp, c.data.eval_pp = pp, list(pp)
        c.model.name, c.model.kwargs, c.init_from = "vit", res.model_kwargs, str(tmp_path / "ck")
        for key, value in overrides.items():
            config_lib.apply_overrides(c, [f"{key}={json.dumps(value)}"])
        train(c, str(tmp_path / name))
        return json.loads((tmp_path / name / "config.json").read_text()), load_variables(str(tmp_path / name))

    recorded, frozen = run("frozen", param_rules=[["backbone/.*", None], [".*", 1.0]])
    want_op = {"op": "normalize", "mean": [0.2], "std": [0.3]}
    assert recorded["data"]["train_pp"][-1] == want_op and recorded["data"]["eval_pp"][-1] == want_op
    for path, value in flatten_paths(loaded["params"]).items():
        np.testing.assert_array_equal(flatten_paths(frozen["params"])[path], value)
    rules = layer_decay("vit", 0.5, loaded["params"] | {"head": frozen["params"]["head"]})
    recorded, tuned = run("llrd", param_rules=rules)
    moved = {p: float(np.max(np.abs(v - flatten_paths(loaded["params"])[p])))
             for p, v in flatten_paths(tuned["params"]).items() if p.startswith("backbone/")}
    assert moved["backbone/encoderblock_1/MlpBlock_0/Dense_1/kernel"] > 0
    plain = '--config.data.eval_pp=[{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 12}]'
    # no normalize op: both candidates (converted, and a run from it) read the weights' own by default
    assert main(["rank", "--target", "tests/configs/tiny.py", f"--config.data.data_dir={tfds_data_dir}",
                 plain, "--config.data.shots=5",
                 "--candidates", str(tmp_path / "ck"), str(tmp_path / "llrd"), "--score", "logme",
                 "--out", str(tmp_path / "rank")]) == 0
    assert main(["fewshot", "--workdir", str(tmp_path / "ck"), "--target", "tests/configs/tiny.py",
                 f"--config.data.data_dir={tfds_data_dir}", "--shots", "2", "--seeds", "1",
                 plain, "--out", str(tmp_path / "fewshot.json")]) == 0
    assert (tmp_path / "fewshot.json").is_file()


def test_weights_normalisation_is_the_default_and_an_own_one_overrides_with_a_warning(tmp_path, caplog):
    from tl_jax import config as config_lib
    from tl_jax.weights.run_preprocessing import apply_weights_preprocessing

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "tl_jax_weights.json").write_text(json.dumps(
        {"preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "source": "defaults of siglip"}}))
    c = config_lib.base_config()
    assert apply_weights_preprocessing(c) == []  # no init_from: nothing
    c.init_from = str(tmp_path / "ck") + ":best"
    c.data.eval_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "normalize", "mean": 0.5, "std": 0.5}]
    c.data.train_pp = [{"op": "rescale", "in_max": 255.0}, {"op": "normalize", "mean": 0.1, "std": 0.5}]
    with caplog.at_level("INFO", logger="tl_jax"):
        assert apply_weights_preprocessing(c) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "config.data.train_pp normalises with mean=0.1" in warnings[0]
    c.data.train_pp = [{"op": "rescale", "in_max": 255.0}]
    assert apply_weights_preprocessing(c) == ["config.data.train_pp"]
    assert c.data.train_pp[-1] == {"op": "normalize", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert apply_weights_preprocessing(c) == []  # idempotent: the config recorded is the config re-applied


def test_sharded_safetensors_and_pytorch_bin_folders_convert_alike(tmp_path):
    ref = perturbed(transformers.ViTModel(transformers.ViTConfig(**TINY)))
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "shards", max_shard_size="60KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / "one" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    results = {name: convert_weights(tmp_path / name, out=tmp_path / f"ck_{name}") for name in ("one", "shards", "bin")}
    files = {name: [f["name"] for f in json.loads((tmp_path / f"ck_{name}" / "tl_jax_weights.json").read_text())
                    ["files"]] for name in results}
    assert files["one"] == ["model.safetensors"] and files["bin"] == ["pytorch_model.bin"] and len(files["shards"]) > 1
    want = flatten_paths(results["one"].variables)
    for name in ("shards", "bin"):
        got = flatten_paths(results[name].variables)
        assert sorted(got) == sorted(want)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path])
    assert sorted(results["one"].dropped) == ["pooler.dense.bias", "pooler.dense.weight"]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n_in, n_out", [(4, 6), (14, 37), (6, 4), (16, 7), (5, 5)])
def test_position_resize_matches_torch_bicubic(n_in, n_out, antialias):
    """The resize matrices reproduce torch.nn.functional.interpolate(bicubic, align_corners=False), up and down."""
    from tl_jax.models.vit_posemb import resize_grid

    grid = np.random.default_rng(0).normal(size=(n_in, n_in + 1, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(grid).permute(2, 0, 1)[None], size=(n_out, n_out + 2),
                                           mode="bicubic", align_corners=False, antialias=antialias)
    got = resize_grid(grid, (n_out, n_out + 2), "bicubic_aa" if antialias else "bicubic")
    np.testing.assert_allclose(np.asarray(got), want[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_vit_option_errors_are_one_line():
    x = np.zeros((1, 8, 8, 3), np.float32)
    small = dict(patch_size=4, hidden_size=8, depth=1, num_heads=2, mlp_dim=8)
    for kwargs, match in [({"pooling": "cls_dist"}, "needs dist_token=True"),
                          ({"pooling": "cls", "class_token": False}, "reads the class token"),
                          ({"act": "relu"}, "act must be one of"),
                          ({"pos_interp": "nearest"}, "pos_interp must be one of"),
                          ({"pos_grid": [3]}, "pos_grid must be")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(get_model("vit", 2, **small, **kwargs).init, jax.random.key(0), x)
    shapes = jax.eval_shape(get_model("vit", 2, **small, pos_grid=[5, 5], num_registers=2, dist_token=True).init,
                            jax.random.key(0), x)["params"]["backbone"]
    assert shapes["pos_embedding"].shape == (1, 2 + 25, 8) and shapes["reg"].shape == (1, 2, 8)


def test_siglip_for_image_classification_mean_pools_without_the_map_head(tmp_path):
    cfg = transformers.SiglipConfig(vision_config={**TINY, "vision_use_head": False}, text_config=TEXT, num_labels=3)
    ref = perturbed(transformers.SiglipForImageClassification(cfg))
    res = convert_weights(save(ref, tmp_path / "sig"), out=tmp_path / "ck")
    assert res.model_kwargs["pooling"] == "gap" and res.num_classes == 3
    x = images(32)
    with torch.no_grad():
        want = ref(x).logits
    assert_rel(tl_run(tmp_path / "ck", x)[0], want, 1e-5)
