"""experiments/residual_adaptation.py --tune: the weights are chosen on val/accuracy alone (never test)."""
import importlib.util
import pathlib

import pytest

import tl_jax.study

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

    monkeypatch.setattr(tl_jax.study, "run_point", fake_run_point)
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
