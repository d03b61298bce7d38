"""config.evals: the periodic few-shot evaluator logs like any metric and changes nothing in training."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split
from tl_jax.models import model_from_config
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.transferability.extract import Candidate, extract, split_arrays
from tl_jax.evaluation.fewshot_ridge import fewshot_eval
from tl_jax.params.param_rules import flatten_paths

TINY = "tests/configs/tiny.py"
DIGITS_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]
EVAL = {"kind": "fewshot", "name": "digits", "every": 4, "dataset": "optdigits", "eval_pp": DIGITS_PP,
        "shots": [1, 5], "seeds": 2}


def tiny(data_dir, evals=()):
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    c.evals = [dict(e) for e in evals]
    return c


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_fewshot_metrics_are_logged_and_equal_an_independent_evaluation(tmp_path, tfds_data_dir):
    wd = tmp_path / "run"
    summary = train(tiny(tfds_data_dir, [{**EVAL, "data_dir": tfds_data_dir}]), str(wd))
    logged = {r["step"]: r for r in records(wd) if "fewshot/digits/1shot" in r}
    assert sorted(logged) == [4, 8]  # every 4 steps, the last step included
    assert summary["fewshot/digits/5shot"] == logged[8]["fewshot/digits/5shot"]
    assert "test/accuracy" in logged[8]  # the last step's few-shot values join its eval record
    # independently: the final checkpoint's features of optdigits -> ridge few-shot
    variables = load_variables(str(wd))
    model = model_from_config(config_lib.load_config(TINY).model, 10)
    pp = build_preprocess(DIGITS_PP)
    arrays = {s: split_arrays(load_split("optdigits", s, tfds_data_dir), None, pp, 1024) for s in ("train", "test")}
    feats = {s: extract(Candidate("ckpt", model, variables, 10), a, "features", 200)[0] for s, a in arrays.items()}
    ref = fewshot_eval(feats["train"], arrays["train"]["label"], feats["test"], arrays["test"]["label"],
                       shots=[1, 5], seeds=2)
    for k in (1, 5):
        assert summary[f"fewshot/digits/{k}shot"] == pytest.approx(ref["shots"][k]["accuracy"], abs=1e-9)
    assert 0.1 < summary["fewshot/digits/5shot"] <= 1.0
    # the evaluator only reads the weights: the training is bit-identical to a run without it
    plain = tmp_path / "plain"
    train(tiny(tfds_data_dir), str(plain))
    a, b = flatten_paths(variables["params"]), flatten_paths(load_variables(str(plain))["params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("fewshot/")} for r in rs]  # noqa: E731
    assert [r for r in strip(records(wd)) if len(r) > 1] == strip(records(plain))


@pytest.mark.parametrize("entry, needle", [
    ({"dataset": "optdigits", "colour": 1}, "config.evals[0]: unknown key(s) ['colour']"),
    ({"dataset": "optdigits", "kind": "svm"}, "config.evals[0].kind must be one of"),
    ({"name": "x"}, "config.evals[0].dataset must name a dataset"),
    ({"dataset": "optdigits", "shots": [0]}, "config.evals[0].shots must be a non-empty list of ints >= 1"),
    ({"dataset": "optdigits", "every": -1}, "config.evals[0].every must be an int >= 0"),
    ({"dataset": "optdigits", "name": "a/b"}, "config.evals[0].name must be a string without '/'"),
])
def test_bad_evals_are_one_line_naming_the_key(tmp_path, tfds_data_dir, entry, needle):
    with pytest.raises(config_lib.ConfigError) as e:
        train(tiny(tfds_data_dir, [entry]), str(tmp_path / "run"))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry, needle", [
    ({**EVAL, "shots": [500]}, "config.evals[0].shots 500 is more than class"),
    ({**EVAL, "eval_pp": [{"op": "random_crop", "size": 12}]}, "config.evals[0].eval_pp must be deterministic"),
    ({**EVAL, "dataset": "no_such_dataset"}, "no_such_dataset"),
])
def test_evaluators_that_cannot_run_fail_before_the_workdir_is_touched(tmp_path, tfds_data_dir, entry, needle):
    with pytest.raises(ValueError) as e:
        train(tiny(tfds_data_dir, [{**entry, "data_dir": tfds_data_dir}]), str(tmp_path / "run"))
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()


def test_duplicate_names_are_refused(tmp_path, tfds_data_dir):
    with pytest.raises(config_lib.ConfigError, match="name='digits' is used by another evaluator"):
        train(tiny(tfds_data_dir, [EVAL, EVAL]), str(tmp_path / "run"))
