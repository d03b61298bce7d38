"""The seed recipes (experiments/seeds/): configs resolve; every recipe runs on tfds mock data (``--mock-data``);
``config.data.shots=0`` means all examples everywhere."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.sweep.runner import load_points

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "experiments" / "seeds").glob("s0*.py"))
TINY = ROOT / "tests" / "configs" / "tiny.py"
# A catalogue recipe on N mock examples for 2 steps: shots=0 (all of the few mock examples), 32-px images.
SWEEP_ARGS = {
    "s000_mnist_finetune": "data=catalogue,shots=0",
    "s001_cifar_resnet": "data=catalogue,shots=0,px=32",
    "s002_joint_augment": "data=catalogue,shots=0",
    "s003_text_distill": "data=embedded",  # its catalogue data is your CSV, not tfds: the in-memory stand-in
    "s004_frozen_resnet50_head": "data=catalogue,weights=,px=32",
}
NARROW = ("s001_cifar_resnet", "s002_joint_augment", "s004_frozen_resnet50_head")
SHORT = ["--config.train.steps=2", "--config.train.log_every=1", "--config.data.batch_size=8",
         "--config.data.eval_batch_size=8"]


def test_five_recipes():
    assert [p.stem for p in SEEDS] == sorted(SWEEP_ARGS)


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
@pytest.mark.parametrize("data", ["embedded", "catalogue"])
def test_recipe_configs_resolve(path, data):
    c = config_lib.load_config(str(path))  # the default get_config()
    config_lib.validate(c)
    c = config_lib.load_config(f"{path}:data={data}")
    config_lib.validate(c)
    _, points = load_points(f"{path}:data={data}")
    assert points and all(isinstance(p, dict) for p in points)
    assert path.read_text().split('"""')[1].count("tl-jax sweep --config experiments/seeds/") + \
        path.read_text().split('"""')[1].count(f"python experiments/seeds/{path.name}") >= 1  # the command


@pytest.mark.slow
@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
def test_recipe_runs_on_mock_data(path, tmp_path, capsys):
    """Every point of the recipe's catalogue sweep, 2 steps on 16 tfds mock examples (shapes, freezing, compile)."""
    arg = SWEEP_ARGS[path.stem]
    mock = [] if "embedded" in arg else ["--config.data.mock_examples=16", f"--config.data.data_dir={tmp_path}/d"]
    if path.stem in NARROW:  # the ResNets at 1/8 width: the same layers, shapes and rules, a fraction of the compile
        mock.append("--config.model.kwargs.base_width=8")
    root = tmp_path / "study"
    assert main(["sweep", "--config", f"{path}:{arg}", "--workdir", str(root), "--vectorize", "off",
                 "--no-report", *SHORT, *mock]) == 0
    _, points = load_points(f"{path}:{arg}")
    summaries = sorted(root.glob("*/summary.json"))
    assert len(summaries) == len(points)
    for s in summaries:
        summary = json.loads(s.read_text())
        assert summary["steps"] == 2 and 0.0 <= summary["test/accuracy"] <= 1.0
        recorded = json.loads((s.parent / "config.json").read_text())
        if mock:
            assert summary["mock_data"] == 16 and recorded["data"]["mock_examples"] == 16
        else:
            assert "mock_data" not in summary and recorded["data"]["mock_examples"] is None


@pytest.mark.slow
def test_mock_data_flag_marks_config_and_summary(tmp_path, capsys):
    wd = tmp_path / "run"
    assert main(["train", "--config", f"{TINY}:steps=2", "--workdir", str(wd), "--mock-data", "32",
                 "--config.data.name=cifar10", f"--config.data.data_dir={tmp_path}/none"]) == 0
    summary = json.loads((wd / "summary.json").read_text())
    recorded = json.loads((wd / "config.json").read_text())
    assert summary["mock_data"] == 32 and summary["steps"] == 2
    assert recorded["data"]["mock_examples"] == 32 and recorded["data"]["name"] == "cifar10"
    assert "mock_data=32" in capsys.readouterr().out


def test_mock_data_refused_for_data_on_this_machine(tmp_path, capsys):
    wd = tmp_path / "run"
    assert main(["train", "--config", f"{TINY}:steps=2", "--workdir", str(wd), "--mock-data", "8"]) == 2
    err = capsys.readouterr().err
    assert "--mock-data) is for tfds catalogue datasets" in err and "'mnist5k'" in err and err.count("\n") == 1
    assert not wd.exists()
    assert main(["train", "--config", f"{TINY}:steps=2", "--workdir", str(wd), "--mock-data", "0",
                 "--config.data.name=cifar10"]) == 2
    assert "config.data.mock_examples (--mock-data) must be a positive integer" in capsys.readouterr().err
    assert not wd.exists()


# -- config.data.shots: 0 and null both mean all examples ---------------------------------------------------------

def test_shots_zero_is_all_examples_on_every_path():
    c = config_lib.apply_overrides(config_lib.load_config(str(TINY)), ["data.shots=0"])  # --config.data.shots=0
    assert c.data.shots is None
    c = config_lib.load_config(f"{SEEDS[0]}:shots=0")  # an experiment argument shots=0
    assert c.data.shots is None
    c = config_lib.load_config(f"{SEEDS[0]}:shots=5")
    assert c.data.shots == 5
    c = config_lib.base_config()  # a config built in Python: validate accepts 0, the run records null
    c.data.shots = 0
    config_lib.validate(c)
    from tl_jax.train.loop import run_identity

    assert run_identity(c)["data"]["shots"] is None


@pytest.mark.parametrize("value", [-1, True])
def test_negative_shots_refused(value):
    c = config_lib.base_config()
    with c.data.ignore_type():
        c.data.shots = value
    with pytest.raises(config_lib.ConfigError, match=r"config.data.shots must be an int >= 1 per class, or 0 or "
                                                     r"null for all examples"):
        config_lib.validate(c)


@pytest.mark.slow
def test_s004_takes_any_converted_backbone(tmp_path, capsys):
    """s004's ``weights=`` may be any converted backbone (issue 30): a tiny Hugging Face ViT (random init), saved as
    ``save_pretrained`` writes it and converted, becomes the frozen backbone of the recipe's head run; the run
    builds the recorded architecture and normalises with the weights' own mean/std, not ImageNet's."""
    import transformers

    from tl_jax.weights import convert_weights

    path = ROOT / "experiments" / "seeds" / "s004_frozen_resnet50_head.py"
    spec = importlib.util.spec_from_file_location("s004_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=32, patch_size=8))
    vit.save_pretrained(tmp_path / "hf")
    convert_weights(tmp_path / "hf", out=tmp_path / "vit")
    assert recipe.converted_backbone("") is None and recipe.converted_backbone(str(tmp_path / "nothing")) is None
    c = recipe.get_config(f"data=catalogue,weights={tmp_path / 'vit'}")
    assert c.model.name == "vit" and c.model.kwargs["patch_size"] == 8 and c.init_from == str(tmp_path / "vit")
    assert not [op for op in c.data.train_pp if op["op"] == "normalize"]  # the weights' own comes from the setup
    wd = tmp_path / "run"
    assert main(["train", "--config", f"{path}:data=catalogue,"
                 f"weights={tmp_path / 'vit'},px=32", "--workdir", str(wd), *SHORT, "--config.data.mock_examples=16",
                 f"--config.data.data_dir={tmp_path}/d"]) == 0
    recorded = json.loads((wd / "config.json").read_text())
    norm = [op for op in recorded["data"]["eval_pp"] if op["op"] == "normalize"]
    assert recorded["model"]["name"] == "vit" and len(norm) == 1 and norm[0]["mean"] == [0.5, 0.5, 0.5]
    assert json.loads((wd / "summary.json").read_text())["steps"] == 2
