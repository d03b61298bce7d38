"""experiments/augment_recipe_digits.py: the arms' configs, the sweep, the choice on val alone and the table
(test read only for the plain arm and the chosen setting) on fake summaries; one recipe point through the real
train (slow)."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import tl_jax.sweep.study
from tl_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILE = ROOT / "experiments" / "augment_recipe_digits.py"


def load_experiment():
    spec = importlib.util.spec_from_file_location("augment_recipe_digits", FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arms_differ_only_by_the_recipe():
    ar = load_experiment()
    plain = ar.get_config("arm=plain,seed=2")
    recipe = ar.get_config("arm=recipe,seed=2,magnitude=5,alpha=0.2,drop_path=0")
    assert [op["op"] for op in plain.data.train_pp] == ["rescale", "resize", "pad", "normalize"]
    assert [op["op"] for op in recipe.data.train_pp] == ["rescale", "resize", "pad", "inception_crop",
                                                         "randaugment", "normalize"]
    assert recipe.data.train_pp[4]["magnitude"] == 5 and recipe.data.mixup.alpha == 0.2
    assert plain.data.mixup.alpha == 0.0 and "drop_path_rate" not in plain.model.kwargs
    assert plain.data.eval_pp == recipe.data.eval_pp and plain.data.val_fraction == recipe.data.val_fraction == 0.2
    for key in ("init_from", "data.shots", "data.shots_seed", "train.steps", "model.kwargs.base_width"):
        assert plain[key] == recipe[key]  # the same source, shots, schedule and model in both arms


def test_the_sweep_is_the_plain_arm_and_the_grid_times_the_seeds():
    ar = load_experiment()
    points = ar.get_sweep("shots=10,steps=300,seeds=3,drop_path=0.1")
    assert len(points) == 3 * (1 + len(ar.GRID["magnitude"]) * len(ar.GRID["alpha"]))
    assert sum(p["arm"] == "plain" for p in points) == 3
    assert all(p["drop_path"] == 0.1 for p in points if p["arm"] == "recipe")
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


def test_drop_path_without_it_in_the_zoo_resnet_is_a_one_line_error(monkeypatch):
    ar = load_experiment()
    monkeypatch.setattr(ar, "has_drop_path", lambda: False)
    with pytest.raises(config_lib.ConfigError, match="drop_path=0.1: .*pass drop_path=0"):
        ar.get_config("arm=recipe,drop_path=0.1")


def fake_summaries(val_by_name, test_by_name):
    """{setting name: [summary per seed]}: test/accuracy only where given (reading any other test is a KeyError)."""
    out = {}
    for name, vals in val_by_name.items():
        tests = test_by_name.get(name)
        out[name] = [{"val/accuracy": v, **({"test/accuracy": tests[i]} if tests else {})}
                     for i, v in enumerate(vals)]
    return out


def test_choice_is_the_best_mean_val_and_the_table_reads_test_for_two_settings_only():
    ar = load_experiment()
    runs = fake_summaries(
        {"plain": [0.95, 0.96, 0.94], "A": [0.99, 0.80, 0.80], "B": [0.93, 0.93, 0.94], "C": [0.90, 0.90, 0.90]},
        {"plain": [0.90, 0.91, 0.89], "B": [0.92, 0.95, 0.93]})
    chosen = ar.choose({k: [s["val/accuracy"] for s in v] for k, v in runs.items() if k != "plain"})
    assert chosen == "B"  # A has the best single seed, B the best mean
    assert ar.choose({"x": [0.5], "y": [0.5]}) == "x"  # ties: the first in grid order
    lines = ar.table(runs, chosen, seeds=3).splitlines()
    assert len(lines) == 2 + 4
    plain_row, b_row, c_row = lines[2], lines[4], lines[5]
    assert f"**{np.mean([0.90, 0.91, 0.89]):.3f} ± {np.std([0.90, 0.91, 0.89]):.3f}**" in plain_row
    assert "0.900 ± 0.008" in plain_row and "| 0.950 |" in plain_row
    assert b_row.startswith("| recipe (chosen on val) | B | 0.933 | 0.920 | 0.950 | 0.930 | **0.933 ± 0.012** |")
    assert c_row == "| recipe | C | 0.900 |  |  |  |  |"


def test_main_on_fake_runs_writes_the_table_and_says_when_drop_path_is_missing(monkeypatch, tmp_path, capsys):
    ar = load_experiment()
    monkeypatch.setattr(ar, "has_drop_path", lambda: False)
    seen = []

    def fake_run_point(config_file, point, workdir):
        seen.append(point)
        assert pathlib.Path(config_file) == FILE and pathlib.Path(workdir).parent == tmp_path
        if point.get("stage") == "source":
            return {"test/accuracy": 0.97}
        assert point["arm"] == "plain" or point["drop_path"] == 0.0  # the ResNet has none: the recipe runs without
        good = point["arm"] == "recipe" and point["magnitude"] == 5 and point["alpha"] == 0.8
        return {"val/accuracy": 0.9 + 0.05 * good + 0.002 * point["seed"], "test/accuracy": 0.8 + 0.1 * good}

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    assert ar.main(["--workdir", str(tmp_path), "--seeds", "2", "--steps", "7"]) == 0
    assert len(seen) == 1 + 2 * 5 and seen[0] == {"stage": "source", "source_steps": 600}
    assert all(p["steps"] == 7 and p["source"] == str(tmp_path / "source") for p in seen[1:])
    text = (tmp_path / "results.md").read_text()
    assert "| recipe (chosen on val) | M=5, α=0.8, drop path 0 | 0.951 | 0.900 | 0.900 | **0.900 ± 0.000** |" in text
    assert "No drop path" in text and text in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["chosen"] == "M=5, α=0.8, drop path 0"


@pytest.mark.slow  # three compiles (source, target train and eval steps): ~1.5 min of CPU
def test_one_recipe_point_trains_two_steps_from_a_two_step_source(tmp_path, tfds_data_dir):
    """The real train: a 2-step source, then the recipe arm (inception crop, RandAugment, mixup and, when the
    zoo ResNet has it, drop path) at 1 shot for 2 steps from that source."""
    ar = load_experiment()
    data = [f"data.data_dir={json.dumps(tfds_data_dir)}", "train.progress=false"]
    run = tl_jax.sweep.study.run_point
    run(str(FILE), {"stage": "source", "source_steps": 2}, tmp_path / "source", data)
    drop_path = 0.1 if ar.has_drop_path() else 0.0
    point = {"arm": "recipe", "shots": 1, "steps": 2, "seed": 0, "drop_path": drop_path,
             "source": str(tmp_path / "source")}
    summary = run(str(FILE), point, tmp_path / "recipe", data)
    assert summary["steps"] == 2 and 0.0 <= summary["val/accuracy"] <= 1.0 and 0.0 <= summary["test/accuracy"] <= 1.0
    recorded = json.loads((tmp_path / "recipe" / "config.json").read_text())
    assert recorded["init_from"] == str(tmp_path / "source") and recorded["data"]["shots"] == 1
    assert recorded["data"]["mixup"]["alpha"] == 0.8 and recorded["data"]["train_pp"][4]["op"] == "randaugment"
    assert recorded["model"]["kwargs"].get("drop_path_rate", 0.0) == drop_path
