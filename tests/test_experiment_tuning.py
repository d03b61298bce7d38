"""experiments/residual_adaptation.py --tune: the weights are chosen on val/accuracy alone (never test)."""
import importlib.util
import pathlib

import pytest

import tl_jax.sweep.study

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_experiment():
    spec = importlib.util.spec_from_file_location("residual_adaptation", ROOT / "experiments/residual_adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_picks_the_best_mean_val_accuracy_and_ties_go_to_the_paper_weight(monkeypatch, tmp_path):
    ra = load_experiment()
    val = {  # (method, weight) -> val/accuracy per seed
        ("finetune_bss", 1e-4): [0.90, 0.96], ("finetune_bss", 1e-3): [0.92, 0.92],
        ("finetune_bss", 1e-2): [0.95, 0.95],
        ("finetune_delta", 1e-3): [0.9, 0.9], ("finetune_delta", 1e-2): [0.9, 0.9],
        ("finetune_delta", 1e-1): [0.9, 0.9],
    }
    calls = []

    def fake_run_point(config_file, point, workdir):
        calls.append(point)
        assert point["val"] == ra.TUNE_VAL and point["seed"] in (7, 8) and pathlib.Path(workdir).parent == tmp_path
        if point["method"] == "finetune":
            return {"val/accuracy": 0.5}
        return {"val/accuracy": val[point["method"], point["weight"]][point["seed"] - 7]}   # no test/* at all

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    chosen = ra.tune(["finetune_bss", "finetune_delta"], [7, 8], pathlib.Path("src"), tmp_path)
    assert chosen == {"finetune_bss": 1e-2, "finetune_delta": 1e-2}   # delta: a three-way tie -> the paper's 0.01
    assert len(calls) == 2 * (1 + 3 + 3)


@pytest.mark.parametrize("method", sorted(load_experiment().REGULARIZED))
def test_tuning_grid_brackets_the_paper_weight(method):
    ra = load_experiment()
    grid, paper = ra.TUNE_GRID[method], ra.REGULARIZED[method][1]
    assert grid[1] == paper and grid[0] < paper < grid[2]
    c = ra.get_config(f"method={method},seed=100,val=0.2,weight={grid[0]}")
    assert c.data.val_fraction == 0.2 and c.objective[c.objective.name].weight == grid[0]


def load_da():
    spec = importlib.util.spec_from_file_location("domain_adaptation", ROOT / "experiments/domain_adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_domain_adaptation_tune_config_trains_and_scores_on_disjoint_parts_of_the_target_train_split():
    da = load_da()
    c = da.get_config("method=mcc,tune=1,weight=0.1")
    group = c.objective.mcc
    assert (group.target_split, group.target_test_split) == da.TUNE_SPLITS == ("train[:80%]", "train[80%:]")
    assert group.weight == 0.1
    assert da.get_config("method=mcc").objective.mcc.target_test_split == "test"  # the table's runs


def test_domain_adaptation_tune_picks_by_mean_val_accuracy_never_reading_test(monkeypatch, tmp_path):
    da = load_da()
    val = {("coral", 100.0): [0.80, 0.90], ("coral", 1000.0): [0.84, 0.84], ("coral", 10000.0): [0.70, 0.99],
           ("mmd", 0.1): [0.8, 0.8], ("mmd", 1.0): [0.8, 0.8], ("mmd", 10.0): [0.8, 0.8]}
    calls = []

    def fake_run_point(config_file, point, workdir):
        calls.append(point)
        assert point["tune"] == 1 and point["seed"] in (5, 6) and pathlib.Path(workdir).parent == tmp_path
        if point["method"] == "source_only":
            return {"test/accuracy": 0.5}  # tune=1: the val carve-out, reported under the eval split's name
        return {"test/accuracy": val[point["method"], point["weight"]][point["seed"] - 5]}

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    chosen = da.tune(["coral", "mmd"], [5, 6], tmp_path)
    assert chosen == {"coral": 100.0, "mmd": 1.0}  # coral means 0.85 > 0.845 > 0.84; mmd: a tie -> the default
    assert len(calls) == 2 * (1 + 3 + 3)


def test_distill_tune_picks_each_knob_on_val_and_kd_hint_runs_at_the_chosen_temperature(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("distill_mnist", ROOT / "experiments/distill_mnist.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    val = {("kd", "temp", 2.0): 0.93, ("kd", "temp", 4.0): 0.92, ("kd", "temp", 8.0): 0.91,
           ("hint", "beta", 0.001): 0.90, ("hint", "beta", 0.01): 0.90, ("hint", "beta", 0.1): 0.90,
           ("kd_hint", "beta", 0.001): 0.90, ("kd_hint", "beta", 0.01): 0.91, ("kd_hint", "beta", 0.1): 0.94}
    calls, names = [], set()

    def fake_run_point(config_file, point, workdir):
        calls.append(point)
        names.add(pathlib.Path(workdir).name)
        assert point["val"] == dm.TUNE_VAL and point["seed"] in (100, 101) and pathlib.Path(workdir).parent == tmp_path
        c = dm.get_config(",".join(f"{k}={v}" for k, v in point.items()))
        assert c.data.val_fraction == dm.TUNE_VAL
        if point["stage"] == "student":
            return {"val/accuracy": 0.88}
        if point["stage"] == "kd_hint":
            assert point["temp"] == 2.0  # kd's pick
        knob = dm.TUNE_GRID[point["stage"]][0]
        return {"val/accuracy": val[point["stage"], knob, point[knob]]}  # no test/* at all

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    chosen = dm.tune(["student", "kd", "hint", "kd_hint"], [100, 101], 10, tmp_path / "teacher", tmp_path)
    assert chosen == {"kd": {"temp": 2.0}, "hint": {"beta": 0.01}, "kd_hint": {"temp": 2.0, "beta": 0.1}}
    assert len(calls) == len(names) == 2 * (1 + 3 * 3)  # every run its own workdir


def test_mean_over_seeds_names_runs_without_the_hidden_paths(monkeypatch, tmp_path):
    seen = []

    def fake_run_point(config_file, point, workdir):
        seen.append((point, pathlib.Path(workdir).name))
        return {"val/accuracy": {3: 0.5, 4: 0.7}[point["seed"]]}

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    got = tl_jax.sweep.study.mean_over_seeds("x.py", {"method": "m", "seed": 0, "w": 0.1}, [3, 4], tmp_path, "val/accuracy",
                                       prefix="kd_", hidden={"teacher": "/abs/teacher"})
    assert got == pytest.approx(0.6)
    assert [name for _, name in seen] == ["kd_m_seed3_w0.1", "kd_m_seed4_w0.1"]
    assert all(p["teacher"] == "/abs/teacher" for p, _ in seen)
