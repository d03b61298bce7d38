"""Your own data in memory: arrays, grain MapDatasets and sequences train like tfds data."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.data import load_split
from tl_jax.data.in_memory import register_dataset, unregister_dataset
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train
from tl_jax.params.param_rules import flatten_paths

ROOT = pathlib.Path(__file__).resolve().parent.parent


def optdigits_arrays(data_dir, split):
    """The embedded optdigits split as numpy arrays (read through tfds: the independent reference)."""
    s = load_split("optdigits", split, data_dir)
    rows = [s.source[i] for i in range(len(s))]
    return {"image": np.stack([r["image"] for r in rows]), "label": np.array([r["label"] for r in rows])}


def tiny_config(data_dir, name, **train):
    c = config_lib.base_config()
    c.data.name, c.data.data_dir = name, data_dir
    c.data.train_pp = [{"op": "rescale", "in_max": 16.0}, {"op": "random_crop", "size": 6}]
    c.data.eval_pp = [{"op": "rescale", "in_max": 16.0}, {"op": "center_crop", "size": 6}]
    c.data.shots, c.data.batch_size, c.data.eval_batch_size = 5, 16, 100
    c.train.update({**dict(steps=6, log_every=2, eval_every=3, checkpoint_every=3, progress=False), **train})
    return c


@pytest.fixture
def arrays(tfds_data_dir):
    return {split: optdigits_arrays(tfds_data_dir, split) for split in ("train", "test")}


def test_arrays_train_exactly_like_the_tfds_dataset(tmp_path, tfds_data_dir, arrays):
    """Same examples, same config: bit-identical params and the same metrics.jsonl as the tfds run."""
    register_dataset("digits_in_memory", **arrays)
    try:
        ref = train(tiny_config(tfds_data_dir, "optdigits"), str(tmp_path / "tfds"))
        mem = train(tiny_config(tfds_data_dir, "digits_in_memory"), str(tmp_path / "mem"))
    finally:
        unregister_dataset("digits_in_memory")
    assert ref["test/accuracy"] == mem["test/accuracy"] and ref["test/loss"] == mem["test/loss"]
    a, b = (flatten_paths(load_variables(str(tmp_path / w))["params"]) for w in ("tfds", "mem"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (tmp_path / "tfds" / "metrics.jsonl").read_text() == (tmp_path / "mem" / "metrics.jsonl").read_text()


def test_grain_dataset_and_list_of_dicts_give_the_same_examples(arrays):
    train = arrays["train"]
    rows = [{"image": train["image"][i], "label": int(train["label"][i])} for i in range(len(train["label"]))]
    splits = {"arrays": train, "list": rows, "grain": grain.MapDataset.source(rows)}
    got = {k: register_dataset(f"mem_{k}", train=v)["train"] for k, v in splits.items()}
    try:
        for k, s in got.items():
            assert len(s) == len(rows) and s.num_classes == 10 and s.image_shape == (8, 8, 1), k
            np.testing.assert_array_equal(s.labels(), train["label"])
            for i in (0, 7, len(rows) - 1):
                np.testing.assert_array_equal(s.source[i]["image"], train["image"][i])
                assert int(s.source[i]["label"]) == train["label"][i]
    finally:
        for k in splits:
            unregister_dataset(f"mem_{k}")
    assert train["image"].flags.writeable  # the user's arrays are not made read-only


@pytest.mark.parametrize("data, message", [
    ({"image": np.zeros((4, 2, 2)), "label": np.arange(3)}, r"equally long .*'image': 4, 'label': 3"),
    ({"image": np.zeros((4, 2, 2))}, "has no 'label' array"),
    ({"pixels": np.zeros((4, 2, 2)), "label": np.arange(4)}, "needs 'image' or 'input_ids'"),
    ({"image": np.zeros((4, 2, 2)), "label": np.linspace(0, 1, 4)}, "must be integer class ids"),
    ({"image": np.zeros((4, 2, 2)), "label": -np.arange(4)}, "labels must be class ids >= 0"),
    ({"image": np.zeros((4, 2)), "label": np.arange(4)}, r"must be \[N, H, W, C\] or \[N, H, W\]"),
    ([{"image": np.zeros((2, 2))}], "must be a dict with 'label'"),
    (42, "must be a dict of arrays, a grain MapDataset or a sequence"),
])
def test_bad_arrays_are_one_line(data, message):
    with pytest.raises(ValueError, match=message) as e:
        register_dataset("bad_arrays", train=data)
    assert "dataset 'bad_arrays' split 'train'" in str(e.value) and "\n" not in str(e.value)


def test_embedded_names_cannot_be_shadowed():
    with pytest.raises(ValueError, match="not one of"):
        register_dataset("mnist5k", train={"image": np.zeros((2, 2, 2)), "label": np.arange(2)})


def test_unknown_split_lists_the_splits(arrays):
    register_dataset("mem_splits", **arrays)
    try:
        with pytest.raises(ValueError, match=r"has no split 'validation'; its splits: \['test', 'train'\]"):
            load_split("mem_splits", "validation")
    finally:
        unregister_dataset("mem_splits")


LOADER = textwrap.dedent('''
    """A researcher's data loader: returns in-memory splits."""
    import numpy as np
    from sklearn.datasets import load_digits


    def load():
        d = load_digits()
        x, y = d.images.astype(np.uint8), d.target
        return {"train": {"image": x[:1400], "label": y[:1400]}, "test": {"image": x[1400:], "label": y[1400:]}}
''')


@pytest.mark.slow
def test_data_reference_from_the_cli_resumes_exactly(tmp_path, tfds_data_dir):
    (tmp_path / "my_data.py").write_text(LOADER)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_in_memory import tiny_config

        def get_config(arg=None):
            return tiny_config(None, "my_data.py:load", steps=8)
    '''))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(wd, fault=""):
        return subprocess.run([sys.executable, "-m", "tl_jax.train", "--config", str(cfg), "--workdir", str(wd)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**env, "TL_JAX_FAULT": fault})

    assert run(tmp_path / "ref").returncode == 0
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["data"]["name"] == \
        f"{tmp_path / 'my_data.py'}:load"
    assert run(tmp_path / "killed", "kill_after_step=4").returncode == -signal.SIGKILL
    proc = run(tmp_path / "killed")
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-2000:]
    a, b = (flatten_paths(load_variables(str(tmp_path / w))["params"]) for w in ("ref", "killed"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
