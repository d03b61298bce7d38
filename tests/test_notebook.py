"""docs/tutorial.ipynb: committed without outputs, and it runs top to bottom (nbclient, a fresh kernel).

The executed copy is never written back: the notebook in git stays output-free
(``test_committed_notebook_has_no_outputs`` guards that). The run writes into a
temporary directory (``TL_JAX_TUTORIAL_RUNS``) with the session's tfds data dir.
"""
from __future__ import annotations

import json
import pathlib
import time

import nbclient  # the test extras (pip install -e '.[test]')
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
CELL_TIMEOUT_S = 600  # one cell; the whole notebook takes 2-4 min on 2 cores


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{NOTEBOOK.relative_to(ROOT)}: code cells {dirty} hold outputs; clear them before "
                       "committing (Jupyter: Edit > Clear All Outputs)")
    assert "widgets" not in nb.get("metadata", {}), "the notebook stores widget state"


def test_notebook_covers_the_tutorial_steps():
    """Pretrain, a frozen-backbone transfer, an own NNX model, rank, a plot: each step is in a code cell."""
    code = "\n".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]
                     if c["cell_type"] == "code")
    for needle in ('"train", "--config", f"{DEMO}:stage=source"', '[["backbone/.*", null]', "from flax import nnx",
                   ':Net"', 'tl_jax_cmd("rank"', "plt.show()"):
        assert needle in code, f"docs/tutorial.ipynb no longer has {needle!r}"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch, tfds_data_dir):
    runs = tmp_path / "runs"
    monkeypatch.setenv("TL_JAX_TUTORIAL_RUNS", str(runs))  # the kernel inherits the environment
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_data_dir)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    wall = time.time() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    acc = {r: json.loads((runs / r / "summary.json").read_text())["test/accuracy"]
           for r in ("src", "probe", "scratch", "mine", "mine_probe")}
    assert acc["src"] > 0.9 and acc["mine"] > 0.9, acc  # both sources learned MNIST
    assert acc["probe"] > acc["scratch"], acc  # the tutorial's point: transfer beats scratch at 10 shots
    ranked = json.loads((runs / "rank" / "rank.json").read_text())
    assert len(ranked["rows"] if isinstance(ranked, dict) else ranked) == 2, ranked
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the plot cell drew no figure"
    print(f"docs/tutorial.ipynb ran in {wall:.0f} s; accuracies {acc}")
    assert not any(c.outputs for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
