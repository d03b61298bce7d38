"""The researcher's own model file, linen or NNX, by path from the CLI: frozen backbone, SIGKILL resume, eval, predict."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tl_jax.train.checkpoint import load_variables
from tl_jax.params.param_rules import flatten_paths

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny.py")

NNX_FILE = textwrap.dedent('''
    """A researcher's Flax NNX model: BatchNorm in the backbone, dropout before the head."""
    from flax import nnx


    class Backbone(nnx.Module):
        def __init__(self, channels: int, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.fc = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            return nnx.relu(self.fc(x.mean(axis=(1, 2))))


    class MyNNXNet(nnx.Module):
        def __init__(self, num_classes: int, *, rngs: nnx.Rngs, channels: int = 1, dropout: float = 0.1):
            self.backbone = Backbone(channels, rngs=rngs)
            self.dropout = nnx.Dropout(dropout, rngs=rngs)
            self.head = nnx.Linear(16, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(self.dropout(self.backbone(x)))


    def make(num_classes, *, rngs, channels=1):
        return MyNNXNet(num_classes, rngs=rngs, channels=channels)
''')

LINEN_FILE = textwrap.dedent('''
    """A researcher's linen model: BatchNorm in the backbone, dropout before the head."""
    import flax.linen as nn


    class MyLinenNet(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x, *, train=False):
            h = nn.Conv(8, (3, 3), name="conv1")(x)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(h)
            h = nn.relu(nn.Dense(16, name="fc")(nn.relu(h).mean(axis=(1, 2))))
            h = nn.Dropout(0.1, deterministic=not train)(h)
            return nn.Dense(self.num_classes, name="head")(h)


    def make(num_classes):
        return MyLinenNet(num_classes)
''')


def _cli(args, cwd, fault=""):
    env = dict(os.environ, TL_JAX_FAULT=fault, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tl_jax.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_own_model_file_frozen_resumed_evaluated_predicted(kind, tmp_path, tfds_data_dir):
    (tmp_path / "my_model.py").write_text(NNX_FILE if kind == "nnx" else LINEN_FILE)
    frozen = "backbone/.*" if kind == "nnx" else "(conv1|bn1|fc)/.*"
    train = ["train", "--config", TINY, f"--config.data.data_dir={tfds_data_dir}",
             "--config.model.name=my_model.py:make", "--config.train.steps=10", "--config.train.checkpoint_every=3",
             f"--config.param_rules=[[\"{frozen}\", null], [\".*\", 1.0]]"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = _cli([*train, "--workdir", str(ref)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the frozen part (params and BatchNorm statistics) is bit-identical to the initial state; the head moved
    first, last = load_variables(str(ref / "checkpoints" / "3")), load_variables(str(ref))
    for collection in ("params", "batch_stats"):
        a, b = flatten_paths(first[collection]), flatten_paths(last[collection])
        assert a.keys() == b.keys() and a
        for path in a:
            same = np.array_equal(a[path], b[path])
            assert same == (not path.startswith("head/")), (collection, path)

    # SIGKILL after step 5, resume: bit-identical params, identical metrics.jsonl
    assert _cli([*train, "--workdir", str(killed)], tmp_path, fault="kill_after_step=5").returncode == -signal.SIGKILL
    proc = _cli([*train, "--workdir", str(killed)], tmp_path)
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    a, b = flatten_paths(load_variables(str(ref))["params"]), flatten_paths(load_variables(str(killed))["params"])
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert (ref / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()

    # eval (from another directory: the reference is recorded absolute) reproduces the summary
    summary = json.loads((ref / "summary.json").read_text())
    out = tmp_path / "eval.json"
    proc = _cli(["eval", "--workdir", str(ref), "--out", str(out)], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(summary["test/accuracy"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(summary["test/loss"], abs=1e-5)

    # predict: one row per test example, probabilities that sum to 1, argmax = pred, accuracy = eval's
    proc = _cli(["predict", "--workdir", str(ref), "--split", "test", "--out", str(tmp_path / "pred")], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = np.load(tmp_path / "pred.npz")
    assert pred["probs"].shape == (1000, 10)
    np.testing.assert_allclose(pred["probs"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred["pred"], pred["probs"].argmax(1))
    assert np.mean(pred["pred"] == pred["label"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 1001
