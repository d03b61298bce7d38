"""tl-jax search: the space helpers, one-line refusals (test metric, unknown key, no validation set), and a
tiny learning-rate search that survives a killed process and resumes by adding trials."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("optuna")

from tl_jax.cli import main  # noqa: E402
from tl_jax.config import ConfigError  # noqa: E402
from tl_jax.sweep import search as search_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEARCH = str(ROOT / "tests" / "configs" / "tiny_search.py")


def test_space_helpers_check_their_arguments():
    assert search_lib.loguniform(1e-4, 0.1) == search_lib.Dist("loguniform", (1e-4, 0.1))
    assert search_lib.choice(["sgd", "adam"]).args == ("sgd", "adam") == search_lib.choice("sgd", "adam").args
    assert search_lib.intrange(1, 8, step=2).args == (1, 8, 2)
    for bad, match in [(lambda: search_lib.loguniform(0, 1), r"loguniform\(0, 1\): need finite numbers with 0 < low"),
                       (lambda: search_lib.uniform(1, 1), r"uniform\(1, 1\): need finite numbers with low < high"),
                       (lambda: search_lib.intrange(1, 4.5), r"intrange\(1, 4.5, step=1\): need ints"),
                       (lambda: search_lib.choice("adam"), r"choice\('adam',\): need two or more")]:
        with pytest.raises(ConfigError, match=match):
            bad()
    ok = {"space": {"config.seed": search_lib.intrange(0, 3)}, "metric": "val/loss", "direction": "minimize"}
    assert search_lib.check_search(ok).direction == "minimize"
    with pytest.raises(ConfigError, match="unknown field 'metrics'"):
        search_lib.check_search({**ok, "metrics": 1})
    with pytest.raises(ConfigError, match="direction must be one of"):
        search_lib.check_search({**ok, "direction": "max"})
    with pytest.raises(ConfigError, match=r"space\['config.seed'\] must be loguniform"):
        search_lib.check_search({**ok, "space": {"config.seed": [0, 1]}})


@pytest.mark.parametrize("arg, extra, message", [
    ("metric=test/accuracy", ["--config.data.val_fraction=0.1"],
     "get_search: metric 'test/accuracy' is not a validation metric: search on val/*"),
    ("key=config.optimizer.lr", ["--config.data.val_fraction=0.1"],
     "get_search space key 'config.optimizer.lr': unknown config key config.optimizer.lr"),
    ("key=lr", ["--config.data.val_fraction=0.1"], "get_search space key 'lr': unknown config argument"),
    ("", [], "get_search metric 'val/accuracy' needs a validation set: set config.data.val_fraction"),
    ("", ["--config.data.val_fraction=0.1", "--trials=0"], "--trials must be >= 1, got 0"),
])
def test_bad_searches_are_one_line_and_touch_nothing(arg, extra, message, tmp_path, capsys):
    spec = f"{SEARCH}:{arg}" if arg else SEARCH
    trials = [] if any(e.startswith("--trials") for e in extra) else ["--trials", "2"]
    rc = main(["search", "--config", spec, "--workdir", str(tmp_path / "s"), *trials, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("tl-jax search: error: ")
    assert message in err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_search_resumes_a_killed_trial_and_adds_trials(tmp_path, tfds_data_dir, capsys):
    root = tmp_path / "s"
    ov = [f"--config.data.data_dir={tfds_data_dir}", "--config.data.val_fraction=0.1",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=2"]
    args = ["search", "--config", SEARCH, "--workdir", str(root), *ov]
    env = {**os.environ, "TL_JAX_FAULT": "kill_after_step=3", "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-m", "tl_jax.cli", *args, "--trials", "2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (root / "trial_0" / "checkpoints" / "2").is_dir() and not (root / "trial_0" / "summary.json").exists()
    capsys.readouterr()

    assert main([*args, "--trials", "3"]) == 0
    out = capsys.readouterr().out
    record = json.loads((root / "search.json").read_text())
    states = [(t["number"], t["state"], t["workdir"]) for t in record["trials"]]
    assert states == [(0, "fail", "trial_0"), (1, "complete", "trial_0"), (2, "complete", "trial_2"),
                      (3, "complete", "trial_3")]
    assert record["trials"][1]["params"] == record["trials"][0]["params"]  # the killed trial, resumed
    mtimes = {n: (root / n / "summary.json").stat().st_mtime for n in ("trial_0", "trial_2", "trial_3")}

    assert main([*args, "--trials", "1"]) == 0  # adds one trial; the others are left as they are
    out = capsys.readouterr().out
    record = json.loads((root / "search.json").read_text())
    assert [t["state"] for t in record["trials"]] == ["fail"] + ["complete"] * 4
    assert mtimes == {n: (root / n / "summary.json").stat().st_mtime for n in mtimes}
    values = {t["workdir"]: t["value"] for t in record["trials"] if t["state"] == "complete"}
    for name, value in values.items():  # the objective is the run's own val/accuracy
        assert value == json.loads((root / name / "summary.json").read_text())["val/accuracy"]
    best = record["best"]
    assert best["value"] == max(values.values()) and best["workdir"] in values
    lr = best["params"]["config.optimizer.learning_rate"]
    assert 1e-4 <= lr <= 0.1
    assert out.startswith(f"best of 4 finished trials: {best['workdir']}: val/accuracy={best['value']:.4f}")
    assert f"tl-jax train --config {SEARCH}:steps=4 --workdir {root / best['workdir']} " \
           f"--config.optimizer.learning_rate={lr!r}" in out
