"""The benchmark protocol configs (experiments/benchmarks/): every config of every suite builds and validates,
task lists and class counts are the protocols', the published numbers agree with themselves and with
docs/benchmarks.md, VTAB's derived labels match VTAB's definitions, and (slow) each suite trains end to end on a
tiny image folder in its real layout or on tfds mock data."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.sweep.runner import load_points

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "experiments" / "benchmarks"
DOCS = ROOT / "docs" / "benchmarks.md"
DA_SUITES = {"office31": (6, 31), "office_home": (12, 65), "visda2017": (1, 12), "domainnet": (12, 345)}
HELPERS = {"da_protocol", "vtab_folders"}  # not configs: the DA protocol and the VTAB folder export
METHODS = ("source_only", "dann", "cdan", "mcc", "mdd", "mmd", "coral", "self_training")
VTAB_CLASSES = {"caltech101": 102, "cifar100": 100, "dtd": 47, "flowers102": 102, "pets": 37, "sun397": 397,
                "svhn": 10, "camelyon": 2, "eurosat": 10, "resisc45": 45, "retinopathy": 5, "clevr_count": 8,
                "clevr_dist": 6, "dmlab": 6, "kitti_dist": 4, "dsprites_loc": 16, "dsprites_ori": 16,
                "smallnorb_azi": 18, "smallnorb_ele": 9}


def module(name: str):
    """``experiments/benchmarks/<name>.py`` as a module (registered: its dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def config(name: str, arg: str):
    c = config_lib.load_config(f"{BENCH / name}.py:{arg}")
    config_lib.validate(c)
    return c


def test_every_file_is_a_known_suite_or_helper():
    assert {p.stem for p in BENCH.glob("*.py")} == set(DA_SUITES) | {"vtab1k"} | HELPERS


@pytest.mark.parametrize("suite", sorted(DA_SUITES))
def test_da_suite_every_task_and_method_builds(suite):
    n_tasks, n_classes = DA_SUITES[suite]
    mod = module(suite)
    assert len(mod.TASKS) == len(set(mod.TASKS)) == n_tasks and mod.SUITE.num_classes == n_classes
    domains = mod.SUITE.domains
    for task in mod.TASKS:
        src, tgt = task.split("2")
        assert src in domains and tgt in domains and src != tgt
        for method in METHODS:
            c = config(suite, f"task={task},method={method},weights=pretrained/r50,data_dir=d")
            group = c.objective[c.objective.name]
            assert c.data.name == f"{suite}_{domains[src].lower()}"
            assert group.target == f"{suite}_{domains[tgt].lower()}"
            assert c.model.name == "resnet50" and c.model.kwargs.to_dict() == {"base_width": 64, "stem": "imagenet"}
            assert c.model.num_classes == n_classes and c.init_from == "pretrained/r50" and c.data.data_dir == "d"
            assert c.optimizer.name == "sgd" and c.param_rules == [["backbone/.*", 0.1], [".*", 1.0]]
            assert (group.weight == 0.0) == (method == "source_only") and c.train.steps >= 2_500
            assert c.data.eval_pp[-1]["op"] == "normalize" and group.target_test_split == mod.SUITE.test_split
    if suite == "office31":  # the TLlib recipe numbers, spelled out once
        c = config(suite, "task=W2A,method=dann")
        assert (c.optimizer.learning_rate, c.data.batch_size, c.train.steps, c.loss.l2) == (0.01, 32, 20_000, 5e-4)
        assert c.objective.dann.hidden == 1024 and c.data.train_pp[0]["op"] == "inception_crop"
        assert c.objective.dann.gamma == 20.0  # TLlib's GRL warm start 2/(1+exp(-i/1000))-1 over 20,000 steps
        c = config(suite, "task=W2A,method=mdd,steps=3000")
        assert (c.objective.mdd.gamma, c.objective.mdd.grl_max) == (3.0, 0.1)
        c = config(suite, "task=A2W,method=mcc")
        assert (c.optimizer.learning_rate, c.data.batch_size, c.train.steps) == (0.005, 36, 10_000)
        assert config(suite, "method=mdd").loss.l2 == 2.5e-4
        assert config(suite, "method=source_only").objective.coral.weight == 0.0
    if suite == "visda2017":
        c = config(suite, "method=mcc")
        assert (c.optimizer.learning_rate, c.objective.mcc.temperature) == (0.002, 3.0)
        assert c.data.train_pp[0] == {"op": "center_crop", "size": 224}  # TLlib's cen.crop
    if suite == "domainnet":
        c = config(suite, "task=s2r,method=mcc")
        assert (c.objective.mcc.weight, c.data.train_split) == (10.0, "train")
        assert c.objective.mcc.target_test_split == "test"
        assert (c.data.batch_size, c.objective.mcc.temperature) == (32, 2.0)


@pytest.mark.parametrize("suite", sorted(DA_SUITES))
def test_da_published_numbers_are_consistent(suite):
    mod = module(suite)
    assert set(mod.PUBLISHED) <= set(METHODS) and "dann" in mod.PUBLISHED
    for method, by_task in mod.PUBLISHED.items():
        tasks = {k: v for k, v in by_task.items() if k != "avg"}
        assert set(tasks) == set(mod.TASKS), method
        assert all(0 < v <= 100 for v in by_task.values())
        if "avg" in by_task:  # TLlib's Avg column is the mean of its task columns (to its rounding)
            assert abs(by_task["avg"] - np.mean(list(tasks.values()))) < 0.06, method
    if suite == "office31":
        assert mod.PUBLISHED["dann"]["avg"] == 86.1 and mod.PUBLISHED["mcc"]["A2D"] == 95.6


def test_da_errors_name_the_argument():
    with pytest.raises(config_lib.ConfigError, match=r"task='A2C': Office-31 tasks are \['A2W'"):
        config("office31", "task=A2C")
    with pytest.raises(config_lib.ConfigError, match=r"method='adda': known methods"):
        config("office_home", "method=adda")


def test_da_tune_reads_no_target_test_and_converted_weights_pick_the_model(tmp_path):
    c = config("office31", "task=A2W,method=dann,tune=1")
    assert (c.objective.dann.target_split, c.objective.dann.target_test_split) == ("train", "test")
    assert c.objective.dann.target_split != config("office31", "task=A2W").objective.dann.target_split
    c = config("domainnet", "task=c2s,method=dann,tune=1")  # its test split is the protocol's: another dataset
    assert (c.objective.dann.target, c.objective.dann.target_split) == ("domainnet_sketch_tune", "train")
    assert config("domainnet", "task=c2s,method=dann").objective.dann.target == "domainnet_sketch"
    (tmp_path / "tl_jax_weights.json").write_text(json.dumps({"model": "resnet18", "model_kwargs": {"base_width": 8}}))
    c = config("visda2017", f"method=self_training,weights={tmp_path}")
    assert c.model.name == "resnet18" and c.model.kwargs.to_dict() == {"base_width": 8}
    st = c.objective.self_training
    assert [op["op"] for op in st.strong_pp] == ["center_crop", "flip_lr", "randaugment", "rescale", "normalize"]
    assert st.weak_pp == c.data.train_pp and st.target_pp == []
    assert (st.threshold, st.target_batch_size, c.optimizer.learning_rate) == (0.8, 64, 0.003)


def test_da_sweeps_list_every_task_and_method():
    for suite, (n_tasks, _) in DA_SUITES.items():
        _, points = load_points(f"{BENCH / suite}.py:methods=dann;mdd,seeds=2,weights=w")
        assert len(points) == n_tasks * 2 * 2 and all(p["weights"] == "w" for p in points)


@pytest.mark.parametrize("stage", ["final", "tune"])
def test_vtab_every_task_builds(stage):
    mod = module("vtab1k")
    assert {k: t.num_classes for k, t in mod.TASKS.items()} == VTAB_CLASSES
    assert sum(bool(t.tfds) for t in mod.TASKS.values()) == 12
    for task, t in mod.TASKS.items():
        c = config("vtab1k", f"task={task},stage={stage},data_dir=d")
        assert c.model.num_classes == VTAB_CLASSES[task] and c.model.name == "vit"
        assert c.model.kwargs.to_dict() == {"variant": "B", "patch_size": 16} and c.data.batch_size == 64
        assert (c.optimizer.name, c.optimizer.learning_rate, c.train.steps) == ("sgd", 0.01, 1000)
        if stage == "tune":  # train800 -> val200; the test split is never read
            assert c.data.val_split is not None and c.data.test_split == c.data.val_split
        elif t.tfds:
            assert c.data.train_split == f"{t.train800}+{t.val200}" and c.data.test_split == t.test
            assert c.data.val_split is None and c.data.name == t.tfds
        else:
            assert c.data.name == f"vtab_{task}" and (c.data.train_split, c.data.test_split) == ("train", "test")
    assert abs(np.mean(list(mod.PUBLISHED.values())) - 66.4) < 0.05  # the Sup-100% mean over the 19 tasks
    with pytest.raises(config_lib.ConfigError, match="task='imagenet': VTAB-1k tasks are"):
        config("vtab1k", "task=imagenet")
    assert len(load_points(f"{BENCH / 'vtab1k'}.py")[1]) == 19


def test_vtab_class_counts_match_the_tfds_features():
    """The 12 tfds tasks' label ClassLabels, smallNORB's pose labels, dSprites' 32 positions / 40 orientations in
    16 bins (tfds' dataset info, no data needed)."""
    import tensorflow_datasets as tfds

    for task, t in module("vtab1k").TASKS.items():
        if t.tfds:
            assert tfds.builder(t.tfds).info.features["label"].num_classes == t.num_classes, task
    norb, sprites = tfds.builder("smallnorb").info.features, tfds.builder("dsprites").info.features
    assert (norb["label_azimuth"].num_classes, norb["label_elevation"].num_classes) == (18, 9)
    assert (sprites["label_x_position"].num_classes, sprites["label_orientation"].num_classes) == (32, 40)


def test_vtab_derived_labels_match_vtab_definitions():
    vf = module("vtab_folders")
    assert vf.clevr_count({"objects": {"size": np.zeros(5)}}) == 2
    coords = np.array([[0, 0, 9.2], [0, 0, 8.7]])  # closest depth 8.7: bins 0, 8, 8.5, 9 ... -> 2
    assert vf.clevr_dist({"objects": {"pixel_coords": coords}}) == 2
    assert vf.clevr_dist({"objects": {"pixel_coords": np.array([[0, 0, 10.5]])}}) == 5
    loc = np.array([[1.0, 1.0, 30.0], [2.0, 1.0, 6.0], [0.0, 1.0, 15.0]])
    assert vf.kitti_dist({"objects": {"location": loc, "type": np.array([0, 4, 2])}}) == 1  # vehicles at 30, 15
    assert vf.kitti_dist({"objects": {"location": loc, "type": np.array([5, 6, 7])}}) == 3  # no vehicle: 1000
    assert vf.kitti_dist({"objects": {"location": loc, "type": np.array([1, 3, 5])}}) == 2  # one vehicle, at 30
    assert vf.kitti_dist({"objects": {"location": loc, "type": np.array([1, 0, 3])}}) == 0  # vehicles at 30, 6
    assert [vf.dsprites_loc({"label_x_position": x}) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [vf.dsprites_ori({"label_orientation": o}) for o in (0, 2, 3, 39)] == [0, 0, 1, 15]
    assert np.array_equal(vf.to_rgb8(np.array([[[1], [0]]], np.uint8), 255)[0, :, 0], [255, 0])


def test_vtab_export_writes_vtab_splits_and_refuses_missing_classes(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    vf = module("vtab_folders")
    asked = []

    def source(name, split, data_dir, download):  # every elevation class 0..8 in every split, 18 examples
        asked.append((name, split))
        return [{"image": np.full((6, 6, 1), i, np.uint8), "label_elevation": i % 9} for i in range(18)]

    monkeypatch.setattr(tfds, "data_source", source)
    counts = vf.export("smallnorb_ele", None, tmp_path)
    assert asked == [("smallnorb", "train[:800]+test[:200]"), ("smallnorb", "test[50%:]"),
                     ("smallnorb", "train[:800]"), ("smallnorb", "test[:200]")]
    assert counts == {"smallnorb_ele/train": 18, "smallnorb_ele/test": 18, "smallnorb_ele_tune/train": 18,
                      "smallnorb_ele_tune/test": 18}
    img = np.asarray(Image.open(tmp_path / "smallnorb_ele" / "train" / "03" / "000012.png"))
    assert img.shape == (6, 6, 3) and (img == 12).all()
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: [{"image": np.zeros((4, 4, 1), np.uint8),
                                                               "label_elevation": 0}])
    with pytest.raises(ValueError, match=r"smallnorb:train\[:800\]\+test\[:200\] has no example of class"):
        vf.export("smallnorb_ele", None, tmp_path / "again")


def test_domainnet_split_by_lists(tmp_path):
    dn = module("domainnet")
    for split, files in (("train", ["a/1.jpg", "b/2.jpg"]), ("test", ["a/3.jpg"])):
        lines = []
        for f in files:
            path = tmp_path / "clipart" / f
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            lines.append(f"clipart/{f} 0")
        (tmp_path / f"clipart_{split}.txt").write_text("\n".join(lines) + "\n")
    assert dn.split_by_lists(tmp_path, "clipart", tmp_path / "out") == {"train": 2, "test": 1}
    assert (tmp_path / "out" / "clipart" / "test" / "a" / "3.jpg").resolve() == tmp_path / "clipart" / "a" / "3.jpg"
    with pytest.raises(FileNotFoundError, match="painting_train.txt: DomainNet's official train list"):
        dn.split_by_lists(tmp_path, "painting", tmp_path / "out")


def test_docs_hold_every_table_and_command():
    text = DOCS.read_text()
    da = module("da_protocol")
    for suite in DA_SUITES:
        mod = module(suite)
        assert da.markdown_table(mod.SUITE) in text, suite
        assert f"experiments/benchmarks/{suite}.py:" in text
    assert module("vtab1k").markdown_table() in text and "experiments/benchmarks/vtab1k.py:" in text
    assert "python experiments/benchmarks/vtab_folders.py" in text
    assert "python experiments/benchmarks/domainnet.py --root" in text


# -- end to end on tiny data (slow) --------------------------------------------------------------------------------

SHORT = ["--config.train.steps=2", "--config.train.log_every=1"]
CLASSES = ("back_pack", "bike", "calculator")


def write_jpegs(folder: pathlib.Path, seed: int, n: int = 3) -> None:
    """``folder/<class>/<i>.jpg``: ``n`` tiny random JPEGs per class of :data:`CLASSES`."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / cls / f"{i}.jpg")


def prepare(folder: pathlib.Path, name: str, data: pathlib.Path) -> None:
    assert main(["data", "prepare", "--image-folder", str(folder), "--name", name, "--data-dir", str(data),
                 "--image-size", "36", "36"]) == 0


def train(arg: str, workdir: pathlib.Path, *extra: str) -> dict:
    suite, _, arg = arg.partition(":")
    assert main(["train", "--config", f"{BENCH / suite}.py:{arg},smoke=1", "--workdir", str(workdir),
                 *SHORT, *extra]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["test/accuracy"] <= 1.0
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("suite,task,method,layout", [
    ("office31", "A2W", "dann", "office31/{d}/images"),
    ("office_home", "Cl2Rw", "mdd", "OfficeHomeDataset/{d}"),
    ("visda2017", "S2R", "self_training", "visda-2017/{d}"),
])
def test_da_suite_trains_on_its_folder_layout(suite, task, method, layout, tmp_path, capsys):
    mod = module(suite)
    folders = {"synthetic": "train", "real": "validation"} if suite == "visda2017" else {}
    data = tmp_path / "data"
    for i, letter in enumerate(task.split("2")):
        domain = mod.SUITE.domains[letter]
        folder = tmp_path / layout.format(d=folders.get(domain, domain))
        write_jpegs(folder, seed=i)
        prepare(folder, mod.SUITE.dataset(letter), data)
    train(f"{suite}:task={task},method={method},data_dir={data}", tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["objective"]["name"] == method and recorded["model"]["num_classes"] == mod.SUITE.num_classes


@pytest.mark.slow
def test_domainnet_trains_on_the_official_split_lists(tmp_path, capsys):
    dn = module("domainnet")
    root, data = tmp_path / "domainnet", tmp_path / "data"
    for i, domain in enumerate(("clipart", "sketch")):
        write_jpegs(root / domain, seed=i, n=2)
        for split, k in (("train", 0), ("test", 1)):
            (root / f"{domain}_{split}.txt").write_text("".join(f"{domain}/{c}/{k}.jpg 0\n" for c in CLASSES))
        dn.split_by_lists(root, domain, tmp_path / "split")
        prepare(tmp_path / "split" / domain, f"domainnet_{domain}", data)
    train(f"domainnet:task=c2s,method=mcc,data_dir={data}", tmp_path / "run")


@pytest.mark.slow
def test_vtab_tfds_task_trains_on_mock_data(tmp_path, capsys):
    summary = train(f"vtab1k:task=caltech101,data_dir={tmp_path}/none", tmp_path / "run", "--mock-data", "8")
    assert summary["mock_data"] == 8


@pytest.mark.slow
def test_vtab_folder_task_trains_on_its_export(tmp_path, monkeypatch, capsys):
    import tensorflow_datasets as tfds

    vf = module("vtab_folders")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: [
        {"image": rng.integers(0, 256, (20, 20, 1), dtype=np.uint8), "label_elevation": i % 9} for i in range(9)])
    vf.export("smallnorb_ele", None, tmp_path / "folders")
    data = tmp_path / "data"
    for suffix in ("", "_tune"):
        prepare(tmp_path / "folders" / f"smallnorb_ele{suffix}", f"vtab_smallnorb_ele{suffix}", data)
    train(f"vtab1k:task=smallnorb_ele,stage=final,data_dir={data}", tmp_path / "final")
    summary = train(f"vtab1k:task=smallnorb_ele,stage=tune,data_dir={data}", tmp_path / "tune")
    assert "val/accuracy" in summary
