"""`tl-jax rank` and `tl-jax fewshot` read the target through the converted weights' own normalisation by default.

A tiny Hugging Face ViT (1 channel, 16 px, random init) is written with ``save_pretrained`` beside a
``preprocessor_config.json`` (mean 0.2, std 0.3), converted, and scored on mnist5k whose ``eval_pp`` has no
``normalize`` op. The features fewshot extracts must equal the model's features on input normalised by hand
(numpy ``(x - 0.2) / 0.3`` of the plain pipeline's pixels) and differ from those on unnormalised input; rank's
scores must equal those of a target that names the op itself; a ``normalize`` op of the target's own
overrides it, with a warning naming both normalisations.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tl_jax import config as config_lib  # noqa: E402
from tl_jax.data import build_preprocess, load_split  # noqa: E402
from tl_jax.evaluation import fewshot_ridge  # noqa: E402
from tl_jax.transferability.extract import candidate_eval_pp, split_arrays  # noqa: E402
from tl_jax.transferability import ranking  # noqa: E402
from tl_jax.weights import convert_weights  # noqa: E402

PLAIN = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 16}]
OP = {"op": "normalize", "mean": [0.2], "std": [0.3]}
IDENTITY = {"op": "normalize", "mean": [0.0], "std": [1.0]}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank_pp")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, num_channels=1)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # LayerNorms off their init so the features depend on the input's offset and scale
        for p in model.parameters():
            if float(p.std()) == 0.0:
                p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(tmp / "hf")
    (tmp / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.2], "image_std": [0.3], "size": {"height": 16, "width": 16}, "resample": 2}))
    convert_weights(tmp / "hf", out=tmp / "ck")
    return tmp / "ck"


def target(data_dir, eval_pp):
    c = config_lib.load_config("tests/configs/tiny.py")
    c.data.data_dir, c.data.eval_pp, c.data.shots = data_dir, eval_pp, 5
    return c


def test_eval_pp_of_a_converted_dir_and_of_a_run_from_it(ck, tmp_path, caplog):
    assert candidate_eval_pp(PLAIN, str(ck)) == [*PLAIN, OP]
    assert candidate_eval_pp(PLAIN, str(ck) + ":best") == [*PLAIN, OP]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"init_from": str(ck), "model": {"name": "vit"}}))
    assert candidate_eval_pp(PLAIN, str(run)) == [*PLAIN, OP]  # a run fine-tuned from the converted weights
    own = {"op": "normalize", "mean": 0.1, "std": [0.3]}  # ... that overrode their normalisation: its own
    (run / "config.json").write_text(json.dumps({"init_from": str(ck), "data": {"eval_pp": [*PLAIN, own]}}))
    assert candidate_eval_pp(PLAIN, str(run)) == [*PLAIN, {**own, "mean": [0.1]}]
    (run / "config.json").write_text(json.dumps({"init_from": "", "model": {"name": "cnn"}}))
    assert candidate_eval_pp(PLAIN, str(run)) == PLAIN  # a run from scratch: the target's pipeline as given
    with caplog.at_level("INFO", logger="tl_jax"):
        assert candidate_eval_pp([*PLAIN, IDENTITY], str(ck), "--workdir X") == [*PLAIN, IDENTITY]  # the override
        assert candidate_eval_pp([*PLAIN, OP], str(ck)) == [*PLAIN, OP]  # the same op: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "normalises with mean=[0.0] std=[1.0]" in warnings[0]
    assert "expect mean=[0.2] std=[0.3]" in warnings[0] and str(ck) in warnings[0]


def features_of(ck, images):
    """The converted model's features (``return_features``) on NHWC ``images``, computed here."""
    from tl_jax.transferability.extract import load_candidate

    cand = load_candidate(str(ck))
    fn = jax.jit(lambda v, x: cand.model.apply(v, x, train=False, method="embed"))
    return np.concatenate([np.asarray(fn(cand.variables, images[i:i + 500])) for i in range(0, len(images), 500)])


def test_fewshot_features_are_those_of_normalised_input_by_default(ck, tfds_data_dir, monkeypatch, caplog):
    seen = []

    def spy(cand, arrays, layer, batch_size):
        out = extract(cand, arrays, layer, batch_size)
        seen.append(out[0])
        return out

    extract = fewshot_ridge.extract
    monkeypatch.setattr(fewshot_ridge, "extract", spy)
    with caplog.at_level("INFO", logger="tl_jax"):
        fewshot_ridge.fewshot_run(str(ck), target(tfds_data_dir, PLAIN), shots=[2], seeds=1)
    assert any("the weights' normalisation" in r.getMessage() and "--workdir" in r.getMessage()
               for r in caplog.records)
    plain = split_arrays(load_split("mnist5k", "train", tfds_data_dir), None, build_preprocess(PLAIN), 1024)["image"]
    by_hand = (plain - np.float32(0.2)) / np.float32(0.3)
    want, unnormalised = features_of(ck, by_hand), features_of(ck, plain)
    assert seen[0].shape == want.shape
    np.testing.assert_allclose(seen[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert float(np.abs(seen[0] - unnormalised).max()) > 1e-3 * float(np.abs(want).max())  # 100x the tolerance
    seen.clear()  # the override: a normalize op of the target's own is used as given
    fewshot_ridge.fewshot_run(str(ck), target(tfds_data_dir, [*PLAIN, IDENTITY]), shots=[2], seeds=1)
    np.testing.assert_allclose(seen[0], unnormalised, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_rank_scores_equal_those_of_the_explicit_op_and_an_own_op_overrides(ck, tfds_data_dir, monkeypatch, caplog):
    seen = []

    def spy(cand, arrays, layer, batch_size):
        seen.append(arrays["image"])
        return extract(cand, arrays, layer, batch_size)

    extract = ranking.extract
    monkeypatch.setattr(ranking, "extract", spy)
    default = ranking.rank(target(tfds_data_dir, PLAIN), [str(ck)], scores="logme,hscore")[0]
    explicit = ranking.rank(target(tfds_data_dir, [*PLAIN, OP]), [str(ck)], scores="logme,hscore")[0]
    with caplog.at_level("WARNING", logger="tl_jax"):
        ranking.rank(target(tfds_data_dir, [*PLAIN, IDENTITY]), [str(ck)], scores="logme,hscore")
    for score in ("logme", "hscore"):
        assert default[score] == pytest.approx(explicit[score], rel=1e-6, abs=1e-9)
    np.testing.assert_array_equal(seen[0], seen[1])  # the candidate read the normalised pixels by default
    np.testing.assert_allclose(seen[0], (seen[2] - np.float32(0.2)) / np.float32(0.3), rtol=1e-6, atol=1e-6)
    assert any("normalises with mean=[0.0]" in r.getMessage() for r in caplog.records)
