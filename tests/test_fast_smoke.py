"""Fast checks of the modules whose thorough tests train a run (and are marked slow).

`make test-fast` skips the slow tests; these keep each such module imported and its
cheap paths (argument errors, pure helpers) checked there (tests/test_fast_tier.py
requires every module to be reached). The trained-run behaviour stays in
tests/test_eval_predict.py, tests/test_recipes.py and tests/test_sweep.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from tl_jax.cli import eval_predict, interpolate, main, rank_fewshot  # noqa: F401  (run by main([...]) below)
from tl_jax.evaluation import predict_inputs, saved_run
from tl_jax.sweep import vectorized

NOT_A_RUN = "has no config.json: not a tl-jax run"


@pytest.mark.parametrize("argv", [["eval"], ["predict", "--split", "test", "--out", "OUT/p"],
                                  ["interpolate", "--out", "OUT/i", "--finetuned"]],
                         ids=["eval", "predict", "interpolate"])
def test_saved_run_commands_refuse_a_dir_that_is_not_a_run(argv, tmp_path, capsys):
    """One error line naming the flag and the missing config.json, exit 2, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    flag = "--finetuned" if argv[0] == "interpolate" else "--workdir"
    args = [a.replace("OUT", str(tmp_path)) for a in argv]
    args = args + [str(empty)] if args[-1] == flag else args + [flag, str(empty)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tl-jax {argv[0]}: error: ") and NOT_A_RUN in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(empty.iterdir())


def test_rank_names_a_candidate_without_checkpoints(tmp_path, capsys):
    assert main(["rank", "--target", "experiments/mnist_to_digits.py:stage=target,shots=10",
                 "--candidates", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--candidates {tmp_path}" in err and "no checkpoint" in err


def test_read_config_and_eval_pp_parsing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        saved_run.read_config(tmp_path)
    assert saved_run.parse_eval_pp(None) is None
    assert saved_run.parse_eval_pp('[{"op": "resize", "size": 14}]') == [{"op": "resize", "size": 14}]


def test_image_folder_input_errors_and_list_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="--image-folder .* does not exist"):
        predict_inputs.image_folder_split(str(tmp_path / "nope"), None, None)
    src = predict_inputs.ListSource([{"label": 3}, {"label": 5}])
    assert len(src) == 2 and src[np.int64(1)] == {"label": 5}


def test_stacked_iterator_steps_the_points_together():
    """The vectorised sweep's data: batch ``b`` of point ``i`` is ``out[k][i]``; states round-trip."""

    class Counter:
        def __init__(self, start):
            self.i = start

        def __next__(self):
            self.i += 1
            return {"x": np.full((2, 3), self.i), "y": np.array([self.i, -self.i])}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, state):
            self.i = state["i"]

    it = vectorized.StackedIterator([Counter(0), Counter(10)])
    first = next(it)
    assert first["x"].shape == (2, 2, 3) and first["y"].tolist() == [[1, -1], [11, -11]]
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["x"], second["x"])
    assert issubclass(vectorized.CannotVectorize, ValueError)
