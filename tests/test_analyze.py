"""Proxy A-distance against hand computations and its two limits; t-SNE PNG; `tl-jax analyze` on a tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tl_jax import config as config_lib
from tl_jax.cli.main import main
from tl_jax.evaluation.domain_analysis import (a_distance_from_error, analyze_features, equal_sizes, heldout_mask,
                                               proxy_a_distance, run_domains, write_tensorboard)
from tl_jax.train.loop import train

DIGITS_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]


def test_a_distance_of_a_hand_computed_tiny_case():
    # 1-d: source 32 rows at -2 and 8 outliers at +2 (rows 0-7), target the mirror image. Whatever rows are held
    # out, the training majority puts -2 on the source side and +2 on the target side, so the held-out error is
    # the held-out outliers' share, and d_A = 2 (1 - 2 error).
    source = np.full((40, 1), -2.0)
    source[:8] = 2.0
    target = -source
    for seed in (0, 1, 2):
        held = heldout_mask(40, 0.2, seed)
        assert held.sum() == 8
        error = 2 * held[:8].sum() / 16
        res = proxy_a_distance(source, target, test_fraction=0.2, seed=seed)
        assert res["error"] == pytest.approx(error)
        assert res["a_distance"] == pytest.approx(2 * (1 - 2 * error))
        assert (res["n_train"], res["n_test"]) == (64, 16)
    assert a_distance_from_error(0.5) == 0.0 and a_distance_from_error(0.0) == 2.0
    assert a_distance_from_error(0.25) == 1.0


def test_a_distance_of_identical_and_of_separated_distributions():
    r = np.random.default_rng(0)
    same = proxy_a_distance(r.normal(size=(1000, 16)), r.normal(size=(1200, 16)), seed=0)
    assert abs(same["a_distance"]) <= 0.2
    shifted = r.normal(size=(1000, 16))
    shifted[:, 0] += 10.0
    apart = proxy_a_distance(r.normal(size=(1000, 16)), shifted, seed=0)
    assert apart["a_distance"] >= 1.8
    half = r.normal(size=(1000, 16))
    half[:, 0] += 1.0  # partly overlapping: in between
    assert 0.2 < proxy_a_distance(r.normal(size=(1000, 16)), half, seed=0)["a_distance"] < 1.8


def test_equal_sizes_draws_the_larger_domain_down():
    a, b = equal_sizes(np.arange(10)[:, None], np.arange(100, 104)[:, None], seed=0)
    assert len(a) == len(b) == 4 and list(b[:, 0]) == [100, 101, 102, 103]
    assert np.all(np.diff(a[:, 0]) > 0) and set(a[:, 0]) <= set(range(10))


def test_analyze_features_writes_a_png(tmp_path):
    r = np.random.default_rng(0)
    src = (r.normal(size=(60, 8)), r.integers(0, 3, 60))
    tgt = (r.normal(size=(50, 8)) + 3.0, r.integers(0, 3, 50))
    res = analyze_features(src, tgt, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["a_distance"] >= 1.8 and (res["n_source"], res["n_target"]) == (60, 50)
    write_tensorboard(str(tmp_path / "tb"), [res])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("a_distance/t")] == [pytest.approx(res["a_distance"])]
    assert len(acc.Images("tsne/t")) == 1 and acc.Images("tsne/t")[0].encoded_image_string[:4] == b"\x89PNG"


def test_run_domains_reads_a_domain_adaptation_target(tmp_path):
    cfg = {"data": {"name": "mnist5k", "test_split": "test", "eval_pp": [{"op": "a"}], "data_dir": None},
           "objective": {"name": "dann", "dann": {"target": "optdigits", "target_test_split": "train[80%:]",
                                                  "target_pp": [{"op": "b"}], "target_eval_pp": [],
                                                  "target_data_dir": ""}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src, tgt = run_domains(str(tmp_path) + ":best")
    assert src == {"name": "mnist5k", "split": "test", "pp": [{"op": "a"}], "data_dir": None}
    assert tgt == {"name": "optdigits", "split": "train[80%:]", "pp": [{"op": "b"}], "data_dir": None}
    with pytest.raises(ValueError, match="--runs .*: no config.json"):
        run_domains(str(tmp_path / "x" / "y" / "z"))


def test_cli_analyze_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    cfg = {"data": {"name": "mnist5k", "test_split": "test", "eval_pp": [], "data_dir": None},
           "objective": {"name": "erm"}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    assert main(["analyze", "--runs", str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--target: the run has no domain-adaptation target" in err and "\n" not in err
    (tmp_path / "file").write_text("")
    assert main(["analyze", "--runs", str(tmp_path / "run"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    assert main(["analyze", "--runs", str(tmp_path / "run"), "--target-pp", "[{", "--target", "optdigits",
                 "--out", str(tmp_path / "a")]) == 2
    assert "--target-pp must be a JSON list" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow  # a tiny run, then features, t-SNE and the domain classifier: ~20 s on 2 cores
def test_cli_analyze_writes_the_png_and_the_json(tmp_path, tfds_data_dir, capsys):
    c = config_lib.load_config("tests/configs/tiny.py")
    c.data.data_dir = tfds_data_dir
    c.train.steps = 4
    wd = tmp_path / "run"
    train(c, str(wd))
    out = tmp_path / "analysis"
    assert main(["analyze", "--runs", str(wd), "--target", "optdigits:test", "--target-pp", json.dumps(DIGITS_PP),
                 "--max-points", "120", "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())["runs"]
    assert len(result) == 1 and result[0]["source"] == "mnist5k:test" and result[0]["target"] == "optdigits:test"
    assert (result[0]["n_source"], result[0]["n_target"]) == (120, 120)
    assert -0.5 < result[0]["a_distance"] <= 2.0
    png = out / "tsne_0_run.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and result[0]["png"] == str(png)
    assert "proxy A-distance" in capsys.readouterr().out
    assert list(out.glob("events.out.tfevents.*"))  # the TensorBoard copy
