"""README's own-model example, exactly as README shows it: the model file and the commands, run as written.

The code block that starts with ``# my_model.py`` is written to ``my_model.py`` and every ``tl-jax``
line of the bash block after it is run (from a directory where ``experiments/`` is this checkout's),
with only ``--config.data.data_dir`` added so the test reuses the session's prepared datasets.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILE_MARK = "# my_model.py"


def readme_example(text: str) -> tuple[str, list[list[str]]]:
    """``(model file, commands)``: the python block opening with ``# my_model.py`` and the ``tl-jax``
    commands (continuation lines joined, comments dropped) of the bash block that follows it."""
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
    index = next(i for i, (lang, body) in enumerate(blocks) if lang == "python" and body.startswith(FILE_MARK))
    lang, script = blocks[index + 1]
    assert lang == "bash", f"README: the block after the {FILE_MARK} block is {lang}, not bash"
    script = script.replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in script.splitlines() if line.startswith("tl-jax ")]
    return blocks[index][1], [c[1:] for c in commands]


def test_readme_example_is_found():
    model_file, commands = readme_example((ROOT / "README.md").read_text())
    assert "class Net(nnx.Module)" in model_file
    assert [c[0] for c in commands] == ["train", "train", "predict"]
    assert all("--config.model.name=my_model.py:Net" in c for c in commands[:2])


@pytest.mark.slow
def test_readme_own_model_reaches_095(tmp_path, tfds_data_dir):
    model_file, commands = readme_example((ROOT / "README.md").read_text())
    (tmp_path / "my_model.py").write_text(model_file)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    logs = []
    for args in commands:
        if args[0] == "train":
            args = [*args, f"--config.data.data_dir={tfds_data_dir}"]
        proc = subprocess.run([sys.executable, "-m", "tl_jax.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
        logs.append(proc.stderr)
    source = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert source["test/accuracy"] >= 0.95, source  # issue 33: README's own model must learn (0.973 measured)
    probe = json.loads((tmp_path / "runs" / "mine_probe" / "summary.json").read_text())
    assert probe["test/accuracy"] >= 0.9, probe  # 10 shots per class on the frozen backbone (0.938 measured)
    assert "feature_cache: training the head on" in logs[1]  # the own NNX model gets the cached probe path
    pred = np.load(tmp_path / "runs" / "mine_probe" / "test_predictions.npz")
    assert np.mean(pred["pred"] == pred["label"]) == pytest.approx(probe["test/accuracy"], abs=1e-6)
