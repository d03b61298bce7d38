"""TensorBoard events (read back with tensorboard's own reader), trackers that fail, batch-job log lines."""
import json
import pathlib
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tl_jax import cli
from tl_jax.train import progress as progress_lib
from tl_jax.train.trackers import Trackers

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny.py")


def events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_steps(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_continued_run(tmp_path, tfds_data_dir):
    wd = tmp_path / "run"
    base = ["train", "--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",
            "--config.param_rules=[[\"backbone/conv1/.*\", null], [\"backbone/.*\", 0.1], [\".*\", 1.0]]",
            "--config.optimizer.schedule=cosine", "--config.optimizer.learning_rate=0.01"]
    assert cli.main(base + ["--config.train.steps=4"]) == 0
    assert cli.main(base + ["--config.train.steps=8"]) == 0  # continued: a second writer, same steps once
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    acc = events(wd)
    tags = set(acc.Tags()["scalars"])
    logged = {k for r in records for k in r if k != "step"}
    assert logged <= tags, logged - tags
    for tag in ("train/loss", "train/accuracy", "test/accuracy", "test/loss"):
        want = {r["step"]: r[tag] for r in records if tag in r}
        got = scalar_steps(acc, tag)
        assert sorted(got) == sorted(want), tag  # no step twice, none missing
        np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-6)
    # learning rate per trained group: m * cosine(step) (optax: lr * 0.5 * (1 + cos(pi * t / T)))
    for label, mult in (("lr_x1", 1.0), ("lr_x0.1", 0.1)):
        got = scalar_steps(acc, f"train/lr/{label}")
        for step, value in got.items():
            total = 4 if step <= 4 else 8  # the first 4 steps ran with steps=4
            np.testing.assert_allclose(value, mult * 0.01 * 0.5 * (1 + np.cos(np.pi * step / total)), rtol=1e-5)
    assert "train/lr/frozen" not in tags and "train/steps_per_s" in tags
    assert any("config" in t for t in acc.Tags()["tensors"])  # the config as text


def test_study_report_images_in_tensorboard(tmp_path, tfds_data_dir):
    root = tmp_path / "study"
    code = cli.main(["sweep", "--config", str(ROOT / "tests" / "configs" / "tiny_sweep.py"), "--workdir", str(root),
                     f"--config.data.data_dir={tfds_data_dir}", "--config.train.steps=2", "--vectorize=off"])
    assert code == 0
    acc = events(root)
    assert "study/results" in acc.Tags()["images"]
    points = [d for d in root.iterdir() if d.is_dir() and (d / "summary.json").exists()]
    assert points and all(list(d.glob("events.out.tfevents.*")) for d in points)  # one TB run per point


class _Broken:
    def scalars(self, step, values):
        raise OSError("disk full")

    def close(self):
        pass


def test_a_failing_tracker_is_dropped_with_one_warning(caplog):
    t = Trackers([("broken", _Broken())])
    t.scalars(1, {"a": 1.0})
    t.scalars(2, {"a": 1.0})
    assert caplog.text.count("tracker broken failed") == 1 and t.writers == []


def test_a_tracker_that_is_not_installed_never_loses_the_run(tmp_path, tfds_data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    wd = tmp_path / "run"
    code = cli.main(["train", "--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",
                     "--config.train.steps=2", "--config.tracking.wandb=true"])
    assert code == 0 and (wd / "summary.json").exists()
    err = capsys.readouterr().err
    assert err.count("config.tracking.wandb is on but wandb is not installed") == 1


def test_batch_job_log_lines_have_progress_and_eta(caplog):
    caplog.set_level("INFO", logger="tl_jax")
    p = progress_lib.Progress(0, 100, True, terminal=False)
    p._last = (0, p._last[1] - 2.0)  # 2 s ago
    rate = p.window({"step": 50, "train/loss": 0.5, "train/accuracy": 0.75})
    assert 20 < rate < 30
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 50/100 (50%) loss=0.5000 accuracy=0.7500 ") and "steps/s ETA 2s" in line
    assert progress_lib.format_eta(185) == "3m05s" and progress_lib.format_eta(7440) == "2h04m"


@pytest.mark.slow  # end to end (training runs / processes): not in make test-fast
def test_wandb_offline_and_mlflow_local_get_the_metrics(tmp_path, tfds_data_dir, monkeypatch):
    """Both trackers on, offline: W&B's run summary and MLflow's metric history equal metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    wd = tmp_path / "run"
    code = cli.main(["train", "--config", TINY, "--workdir", str(wd), f"--config.data.data_dir={tfds_data_dir}",
                     "--config.tracking.wandb=true", "--config.tracking.mlflow=true"])
    assert code == 0
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]

    client = MlflowClient(tracking_uri=(wd / "mlruns").as_uri())
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.run_name == "run" and run.data.params["train.steps"] == "8"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx({r["step"]: r["train/loss"] for r in train}, rel=1e-6)

    # W&B offline: the run's record file (wandb-core's binary log) holds every logged value, as JSON text
    (record_file,) = list(wd.glob("wandb/offline-run-*/run-*.wandb"))
    raw = record_file.read_bytes()
    values = [v for r in records for k, v in r.items() if k != "step" and isinstance(v, float) and v != int(v)]
    assert values and all(json.dumps(v).encode() in raw for v in values)


def test_tensorboard_starts_without_importing_torch(tmp_path):
    """tensorboardX imports PyTorch when installed (seconds of every run's start); the writer hides it."""
    import subprocess

    code = ("import sys; from tl_jax.train.trackers import TensorBoardWriter\n"
            f"w = TensorBoardWriter({str(tmp_path)!r}); w.scalars(1, {{'a': 0.5}}); w.close()\n"
            "print('torch' in sys.modules, sys.modules.get('torch', 'absent'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "absent"]  # not imported, and importable later (no None left in sys.modules)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("a")] == [0.5]
