"""The path from ``tl-jax train`` to the compiled step stays short (issue 29: at most ~6 calls over 4 files).

The stack is read at the first call of :meth:`tl_jax.train.programs.StepPrograms.__call__` during a real
``tl-jax train`` of the tiny config; the frames between ``tl_jax/cli/main.py:main`` and the step are the path
a reader follows (docs/architecture.md draws it).
"""
from __future__ import annotations

import traceback

from tl_jax.cli.main import main
from tl_jax.train.programs import StepPrograms


def test_tl_jax_train_reaches_the_step_through_six_functions_in_four_files(tmp_path, monkeypatch):
    stacks = []
    call = StepPrograms.__call__

    def recording(self, state, batch, step):
        if not stacks:
            stacks.append(traceback.extract_stack()[:-1])  # without this wrapper's frame
        return call(self, state, batch, step)

    monkeypatch.setattr(StepPrograms, "__call__", recording)
    rc = main(["train", "--config", "tests/configs/tiny.py:steps=1", "--workdir", str(tmp_path / "run"),
               "--config.train.eval_every=1", "--config.train.checkpoint_every=1"])
    assert rc == 0 and stacks
    frames = [f for f in stacks[0] if "/tl_jax/" in f.filename.replace("\\", "/")]
    names = [(f.filename.replace("\\", "/").split("/tl_jax/")[1], f.name) for f in frames]
    start = names.index(("cli/main.py", "main"))
    path = names[start:] + [("train/programs.py", "__call__")]
    assert path == [("cli/main.py", "main"), ("cli/main.py", "run_command"), ("cli/train.py", "cmd_train"),
                    ("train/loop.py", "train"), ("train/loop.py", "run"), ("train/programs.py", "__call__")], path
    assert len(path) - 1 <= 6 and len({file for file, _ in path}) <= 4
