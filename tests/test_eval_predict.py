"""`tl-jax eval` / `tl-jax predict` on a saved tiny run, checkpoint selection and `init_from=PATH:STEP|best`.

One 8-step mnist5k run (checkpoints at steps 4 and 8, test evals at both) is trained
once per module; every test reads it and checks it is left untouched.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.data import build_preprocess, eval_batches, load_split

TINY = "tests/configs/tiny.py"
pytestmark = pytest.mark.slow  # one tiny training run (~15 s on 2 cores) shared by the module


def snapshot(root: pathlib.Path) -> dict:
    """``{relative path: (bytes, mtime_ns)}`` of every file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def run_files(wd: pathlib.Path) -> dict:
    """Snapshot of the run's own files (everything but the eval/ outputs)."""
    return {k: v for k, v in snapshot(wd).items() if not k.startswith("eval/")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tfds_data_dir):
    """A finished tiny run: ``(workdir, summary, files snapshot)``."""
    from tl_jax.train.loop import train

    wd = tmp_path_factory.mktemp("eval") / "run"
    c = config_lib.load_config(TINY)
    c.data.data_dir = tfds_data_dir
    c.train.best_metric = "test/accuracy"  # no validation set here; tracked for the `best` tests
    summary = train(c, str(wd))
    return wd, summary, run_files(wd)


def reference_logits(wd: pathlib.Path, spec: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N, C], labels [N])`` of the mnist5k test split: a fresh model's ``apply`` on the params
    ``load_variables(spec)`` reads (orbax's StandardCheckpointer, not the eval code's restore)."""
    from tl_jax.models import get_model
    from tl_jax.train.checkpoint import load_variables

    cfg = json.loads((wd / "config.json").read_text())
    variables = load_variables(spec)
    model = get_model(cfg["model"]["name"], cfg["model"]["num_classes"])
    split = load_split("mnist5k", "test", data_dir)
    pp = build_preprocess(cfg["data"]["eval_pp"])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    zs = [np.asarray(apply(variables, b["image"]))[b["mask"] > 0] for b in eval_batches(split, pp, batch_size=250)]
    return np.concatenate(zs).astype(np.float64), split.labels()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_eval_reproduces_summary_and_leaves_the_run_untouched(run, capsys):
    wd, summary, files = run
    assert main(["eval", "--workdir", str(wd)]) == 0
    out = wd / "eval" / "mnist5k_test_latest.json"
    res = json.loads(out.read_text())
    assert (res["step"], res["count"], res["dataset"], res["split"]) == (8, 1000, "mnist5k", "test")
    assert abs(res["metrics"]["accuracy"] - summary["test/accuracy"]) <= 1e-6
    assert abs(res["metrics"]["loss"] - summary["test/loss"]) <= 1e-6
    assert "accuracy=" in capsys.readouterr().out
    assert run_files(wd) == files  # bytes and mtimes of config.json, metrics.jsonl, summary.json, checkpoints/


def test_eval_of_a_step_equals_an_independent_numpy_evaluation(run, tfds_data_dir, tmp_path):
    wd, _, files = run
    out = tmp_path / "m.json"
    assert main(["eval", "--workdir", str(wd), "--checkpoint", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    z, y = reference_logits(wd, f"{wd}/checkpoints/4", tfds_data_dir)
    ce = -np.log(softmax(z)[np.arange(len(y)), y])
    assert res["step"] == 4
    assert res["metrics"]["accuracy"] == pytest.approx(float((z.argmax(-1) == y).mean()), abs=1e-9)
    assert res["metrics"]["loss"] == pytest.approx(float(ce.mean()), abs=1e-5)
    # step 4 and step 8 differ, so the step really was chosen
    z8, _ = reference_logits(wd, str(wd), tfds_data_dir)
    assert not np.allclose(z, z8)
    assert run_files(wd) == files


def test_predict_probs_pred_label_and_csv(run, tfds_data_dir, tmp_path):
    wd, _, files = run
    prefix = tmp_path / "preds"
    assert main(["predict", "--workdir", str(wd), "--checkpoint", "4", "--split", "test", "--out", str(prefix)]) == 0
    npz = np.load(f"{prefix}.npz")
    assert sorted(npz.files) == ["index", "label", "pred", "probs"]
    z, y = reference_logits(wd, f"{wd}:4", tfds_data_dir)
    np.testing.assert_allclose(npz["probs"], softmax(z), atol=1e-6)
    np.testing.assert_array_equal(npz["pred"], z.argmax(-1))
    np.testing.assert_array_equal(npz["label"], y)
    np.testing.assert_array_equal(npz["index"], np.arange(1000))
    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", "pred", "pred_class", "prob"] and len(rows) == 1000
    assert [int(r["index"]) for r in rows] == npz["index"].tolist()
    assert [int(r["label"]) for r in rows] == npz["label"].tolist()
    assert [int(r["pred"]) for r in rows] == npz["pred"].tolist()
    assert [r["pred_class"] for r in rows] == [str(p) for p in npz["pred"]]  # mnist5k's names are '0'..'9'
    np.testing.assert_array_equal([float(r["prob"]) for r in rows], npz["probs"].max(-1))
    assert run_files(wd) == files


def test_predict_image_folder_matches_the_split(run, tfds_data_dir, tmp_path):
    from PIL import Image

    wd, _, files = run
    split = load_split("mnist5k", "test", tfds_data_dir)
    folder = tmp_path / "images"
    picks = [0, 1, 2, 3, 4]
    for i in picks[:4]:  # class sub-folders named like the run's classes ('0'..'9')
        d = folder / str(split.source[i]["label"])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.source[i]["image"][..., 0]).save(d / f"ex{i}.png")
    Image.fromarray(split.source[4]["image"][..., 0]).save(folder / "ex4.png")  # loose: unlabelled
    (folder / "notes.txt").write_text("not an image")  # skipped with a warning
    prefix = tmp_path / "img"
    assert main(["predict", "--workdir", str(wd), "--image-folder", str(folder), "--out", str(prefix)]) == 0
    got = np.load(f"{prefix}.npz")
    ref = np.load(_predict_split(wd, tmp_path))
    order = [int(pathlib.Path(p).stem[2:]) for p in got["path"]]
    assert sorted(order) == picks
    np.testing.assert_allclose(got["probs"], ref["probs"][order], atol=1e-6)
    np.testing.assert_array_equal(got["pred"], ref["pred"][order])
    want = [-1 if i == 4 else int(split.source[i]["label"]) for i in order]
    np.testing.assert_array_equal(got["label"], want)
    assert run_files(wd) == files


def _predict_split(wd: pathlib.Path, tmp_path: pathlib.Path) -> str:
    prefix = tmp_path / "split_latest"
    assert main(["predict", "--workdir", str(wd), "--split", "test[:5]", "--out", str(prefix)]) == 0
    return f"{prefix}.npz"


def test_eval_on_another_dataset_and_its_shape_check(run, tmp_path, capsys):
    wd, _, files = run
    out = tmp_path / "digits.json"
    assert main(["eval", "--workdir", str(wd), "--dataset", "optdigits", "--split", "test", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dataset"] == "optdigits" and res["count"] == len(load_split("optdigits", "test", res_dir(wd)))
    pp = json.dumps([{"op": "rescale", "in_max": 16}])  # no resize: 8x8 digits, the run takes 14x14
    bad = tmp_path / "bad.json"
    assert main(["eval", "--workdir", str(wd), "--dataset", "optdigits", "--split", "test",
                 f"--config.data.eval_pp={pp}", "--out", str(bad)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "(8, 8, 1)" in err and "(14, 14, 1)" in err
    assert not bad.exists()
    assert run_files(wd) == files


def res_dir(wd: pathlib.Path) -> str:
    return json.loads((wd / "config.json").read_text())["data"]["data_dir"]


def error_line(stderr: str) -> str:
    """The one ``tl-jax...: error: ...`` line of stderr (INFO log lines aside), no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("tl-jax")]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in stderr, stderr
    return lines[0]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return error_line(capsys.readouterr().err)


def test_bad_inputs_are_one_line_and_write_nothing(run, tmp_path, capsys):
    wd, _, files = run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _error(capsys, ["eval", "--workdir", str(empty)])
    assert "has no config.json" in _error(capsys, ["predict", "--workdir", str(empty), "--split", "test",
                                                   "--out", str(tmp_path / "p")])
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(wd / "config.json", no_ckpt / "config.json")
    assert "holds no checkpoint" in _error(capsys, ["eval", "--workdir", str(no_ckpt)])
    assert "holds no checkpoint" in _error(capsys, ["predict", "--workdir", str(no_ckpt), "--split", "test",
                                                    "--out", str(tmp_path / "p")])
    assert os.listdir(no_ckpt) == ["config.json"] and os.listdir(empty) == []
    err = _error(capsys, ["eval", "--workdir", str(wd), "--checkpoint", "123"])
    assert "no checkpoint step 123" in err and "available steps: [4, 8]" in err
    assert "--checkpoint must be" in _error(capsys, ["eval", "--workdir", str(wd), "--checkpoint", "last"])
    # best without recorded metrics: a copy of the run without metrics.jsonl (orbax holds none here)
    bare = tmp_path / "bare"
    shutil.copytree(wd, bare, ignore=shutil.ignore_patterns("eval", "metrics.jsonl"))
    err = _error(capsys, ["eval", "--workdir", str(bare), "--checkpoint", "best"])
    assert "--checkpoint=best" in err and "'test/accuracy'" in err
    cfg = json.loads((bare / "config.json").read_text())
    cfg["train"]["best_metric"] = "auto"  # 'auto' without a validation set: no best step was tracked
    (bare / "config.json").write_text(json.dumps(cfg))
    assert "tracked no best checkpoint" in _error(capsys, ["eval", "--workdir", str(bare), "--checkpoint", "best"])
    # image folder with a sub-folder that is not a class of the run: refused
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    err = _error(capsys, ["predict", "--workdir", str(wd), "--image-folder", str(folder.parent),
                          "--out", str(tmp_path / "cats")])
    assert "['cat'] are not classes of the run" in err
    assert not list(tmp_path.glob("cats*")) and not list(tmp_path.glob("p.*"))
    err = _error(capsys, ["eval", "--workdir", str(wd), "--out", str(wd / "summary.json")])
    assert "would overwrite the run's summary.json" in err
    assert _error(capsys, ["evaluate"]) == ("tl-jax: error: unknown command 'evaluate'; valid commands: train, "
                                            "sweep, report, search, eval, predict, rank, fewshot, analyze, "
                                            "interpolate, data, weights (tl-jax --help)")
    assert run_files(wd) == files


def test_select_step_and_init_from_suffixes(run, tmp_path):
    from tl_jax.train import checkpoint as ck
    from tl_jax.params.param_rules import flatten_paths

    wd, _, files = run
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["test/accuracy"] for r in records if "test/accuracy" in r}
    best = max(sorted(evals), key=lambda s: (evals[s], s))
    assert ck.select_step(wd, "best").name == str(best)
    assert ck.select_step(wd, "latest").name == "8" == ck.select_step(wd / "checkpoints", 8).name
    assert ck.parse_step_spec("a:b/c") == ("a:b/c", "latest") and ck.parse_step_spec("x:12") == ("x", 12)

    def params(spec):
        return flatten_paths(ck.load_variables(spec)["params"])

    step4, step8 = params(f"{wd}/checkpoints/4"), params(f"{wd}/checkpoints/8")
    assert any(not np.array_equal(step4[k], step8[k]) for k in step4)
    for spec, want in ((f"{wd}:4", step4), (str(wd), step8), (f"{wd}:latest", step8),
                       (f"{wd}:best", params(f"{wd}/checkpoints/{best}"))):
        got = params(spec)
        assert all(np.array_equal(got[k], want[k]) for k in want), spec
    with pytest.raises(ValueError, match=r"config.init_from: no checkpoint step 7 .* available steps: \[4, 8\]"):
        ck.load_variables(f"{wd}:7")
    with pytest.raises(ValueError, match=r"config.init_from: '.*config.json' is a file"):
        ck.load_variables(str(wd / "config.json"))

    # a run built with init_from=W:4 (nothing kept fresh) starts from exactly step 4's params
    from tl_jax.parallel import mesh as mesh_lib
    from tl_jax.train.loop import build_model_and_state

    c = config_lib.load_config(TINY)
    c.init_from, c.dont_load = f"{wd}:4", []
    mesh = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    _, _, state = build_model_and_state(c, 10, {"image": np.zeros((1, 14, 14, 1), np.float32)}, mesh)
    got = flatten_paths(jax.device_get(state.params))
    assert all(np.array_equal(got[k], step4[k]) for k in step4)
    assert run_files(wd) == files


def test_predict_csv_of_texts_with_the_runs_tokenizer(tmp_path):
    """A tiny BERT run on a prepared CSV dataset; `predict --csv` tokenises new texts with the tokenizer
    recorded in the dataset's metadata and scores them like `model.apply` on the saved params."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from tl_jax.data.text_csv import load_tokenizer, prepare_csv, tokenize
    from tl_jax.models import get_model
    from tl_jax.train.checkpoint import load_variables
    from tl_jax.train.loop import train

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "great", "bad", "awful", "movie", "book", "the", "was"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = [("the movie was good", "pos"), ("great book", "pos"), ("good good", "pos"), ("great", "pos"),
            ("the movie was bad", "neg"), ("awful book", "neg"), ("bad bad", "neg"), ("awful", "neg")]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    data_dir = str(tmp_path / "tfds")
    prepare_csv(tmp_path / "train.csv", "tiny_reviews", data_dir, tokenizer=tmp_path / "tokenizer.json",
                max_length=6, test_fraction=0.25, seed=0)
    c = config_lib.base_config()
    c.model.name, c.model.num_classes = "bert", 2
    kwargs = dict(vocab_size=len(words), hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    c.model.kwargs = kwargs
    c.data.name, c.data.data_dir, c.data.train_pp, c.data.eval_pp = "tiny_reviews", data_dir, [], []
    c.data.batch_size, c.data.eval_batch_size = 2, 2
    c.train.steps, c.train.checkpoint_every, c.train.log_every, c.train.progress = 2, 2, 1, False
    wd = tmp_path / "run"
    train(c, str(wd))

    texts = [("the book was great", "pos"), ("awful movie", "neg"), ("unknown words here", "neg")]
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *texts])
    prefix = tmp_path / "text_preds"
    assert main(["predict", "--workdir", str(wd), "--csv", str(tmp_path / "new.csv"), "--out", str(prefix)]) == 0
    got = np.load(f"{prefix}.npz")
    ids, mask, _ = tokenize(load_tokenizer(tmp_path / "tokenizer.json", 6)[0], [t for t, _ in texts])
    model = get_model("bert", 2, **kwargs)
    z = np.asarray(model.apply(load_variables(str(wd)), ids, attention_mask=mask, train=False), np.float64)
    np.testing.assert_allclose(got["probs"], softmax(z), atol=1e-6)
    np.testing.assert_array_equal(got["pred"], z.argmax(-1))
    np.testing.assert_array_equal(got["label"], [1, 0, 0])  # class names sorted: ['neg', 'pos']
    with open(f"{prefix}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["pred_class"] for r in table] == [["neg", "pos"][p] for p in got["pred"]]
