"""LoRA end to end (tl_jax/peft): trained through the CLI on the tiny config with the base frozen, merged by
``tl-jax weights merge`` into a plain checkpoint that loads without PEFT and predicts the same logits, and
composed with other objectives and recipes (DANN, L2-SP, EMA, multitask, LP-FT), sharded and resumed, vectorised,
read by eval and fewshot. Each runs tiny trainings (~2.5 min in all on 2 cores): slow."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from peft_checks import lora_and_merged_logits
from tl_jax.cli import main
from tl_jax.evaluation.saved_run import load
from tl_jax.params.param_rules import flatten_paths
from tl_jax.peft.lora import LORA
from tl_jax.peft import merge
from tl_jax.peft.merge_run import merge_run, run_config
from tl_jax.sweep.runner import run_sweep
from tl_jax.train.checkpoint import load_variables
from tl_jax.transferability.extract import load_candidate

TINY = "tests/configs/tiny.py:steps=4"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train(workdir, data_dir, *overrides):
    argv = ["train", "--config", TINY, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.train.feature_cache=false", *overrides]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tfds_data_dir):
    """A tiny source run and a LoRA (rank 2, all Dense/Conv) run starting from it, through the CLI."""
    root = tmp_path_factory.mktemp("peft")
    _train(root / "src", tfds_data_dir)
    _train(root / "lora", tfds_data_dir, "--config.peft.lora.rank=2", "--config.peft.lora.alpha=4.0",
           f"--config.init_from={root / 'src'}", "--config.optimizer.learning_rate=0.01")
    return root


@pytest.mark.slow
def test_lora_run_trains_lora_and_head_and_keeps_the_base(runs):
    src = flatten_paths(load_variables(str(runs / "src"))["params"])
    got = flatten_paths(load_variables(str(runs / "lora"))["params"])
    lora = {p: v for p, v in got.items() if p.startswith(f"{LORA}/")}
    assert lora and all(p.endswith(("/a", "/b")) for p in lora)
    assert any(p.endswith("/b") and np.any(v != 0) for p, v in lora.items())  # B moved from its zero init
    base = {p: v for p, v in got.items() if not p.startswith((f"{LORA}/", "head/"))}
    assert base and set(base) == {p for p in src if not p.startswith("head/")}
    for p, v in base.items():
        np.testing.assert_array_equal(v, src[p], err_msg=p)  # frozen: bit for bit the source's
    losses = [m["train/loss"] for m in map(json.loads, (runs / "lora" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in m]
    assert losses and all(np.isfinite(losses))


@pytest.mark.slow
def test_frozen_base_has_no_optimizer_state(runs):
    run = load(runs / "lora")
    groups = run.objective.param_groups
    frozen = [p for p, m in groups.multipliers.items() if m is None]
    assert frozen and all(not p.startswith((f"{LORA}/", "head/")) for p in frozen)
    assert all(m == 1.0 for p, m in groups.multipliers.items() if p.startswith((f"{LORA}/", "head/")))
    n_state = sum(np.size(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x) > 0)
    n_trained = sum(np.size(v) for p, v in flatten_paths(run.state.params).items() if groups.multipliers[p])
    assert n_state == 2 * n_trained  # Adam's mu and nu for the LoRA params and the head only


@pytest.mark.slow
def test_weights_merge_gives_a_plain_checkpoint_with_the_same_logits(runs, capsys):
    out = runs / "merged"
    assert main(["weights", "merge", "--workdir", str(runs / "lora"), "--out", str(out)]) == 0
    assert "LoRA layers" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already exists"):
        merge_run(runs / "lora", out)
    y_lora, y_plain, plain_params = lora_and_merged_logits(runs / "lora", out, 5)
    assert LORA not in plain_params
    assert np.max(np.abs(y_plain - y_lora)) <= 1e-5 * np.max(np.abs(y_lora))
    with pytest.raises(ValueError, match="the run has no LoRA"):
        merge_run(runs / "src", runs / "merged2")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["--config.objective.name=dann", "--config.objective.dann.target=optdigits",
     '--config.objective.dann.target_pp=[{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]'],
    ["--config.loss.l2_sp=0.01"],
    ["--config.train.ema_decay=0.5"],
    ["--config.objective.name=multitask", '--config.objective.multitask.tasks=["digit", "parity", "ge5"]',
     "--config.objective.multitask.weighting=uncertainty"],
    ["--config.objective.name=joint", '--config.objective.joint.domains=[{"name": "optdigits", "train_pp": '
     '[{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}], "eval_pp": [{"op": "rescale", '
     '"in_max": 16.0}, {"op": "resize", "size": 14}]}]', '--config.objective.joint.tasks=["digit", "parity"]',
     "--config.objective.joint.weights=[[1.0, 0.5], [1.0, 1.0]]", "--config.objective.joint.proportions=[0.5, 0.5]",
     "--config.objective.joint.weighting=uncertainty"],
], ids=["dann", "l2_sp", "ema", "multitask", "joint"])
def test_lora_composes_with_other_objectives(runs, tfds_data_dir, tmp_path, overrides):
    wd = tmp_path / "run"
    _train(wd, tfds_data_dir, "--config.peft.lora.rank=2", f"--config.init_from={runs / 'src'}",
           "--config.train.steps=2", "--config.train.checkpoint_every=2", *overrides)
    run = load(wd)
    assert run.step == 2
    mults = run.objective.param_groups.multipliers
    assert any(p.startswith(f"{LORA}/") and m for p, m in mults.items())
    src = flatten_paths(load_variables(str(runs / "src"))["params"])
    got = flatten_paths(run.state.params)
    for p, m in mults.items():
        if m is None:
            np.testing.assert_array_equal(got[p], src[p], err_msg=p)
    extras = [p for p in mults if p.split("/")[0] in run.objective.extra_keys]
    assert bool(extras) == bool(run.objective.extra_keys) and all(mults[p] for p in extras)  # a DANN
    # discriminator, multitask's log-variances train with the base frozen
    assert all(m for p, m in mults.items() if p.startswith("head/"))  # the head, or multitask's head/<task>
    metrics = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for m in metrics for k, v in m.items() if k.startswith("train/loss"))


def _subprocess_train(workdir, data_dir, init_from, devices, fault=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TL_JAX_COORDINATOR", "JAX_COORDINATOR",
                                                                   "TL_JAX_NUM_PROCESSES", "SLURM_", "OMPI_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TL_JAX_FAULT=fault)
    args = ["--config", TINY, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.train.feature_cache=false", "--config.peft.lora.rank=2", "--config.peft.lora.alpha=4.0",
            f"--config.init_from={init_from}", "--config.optimizer.learning_rate=0.01",
            "--config.train.checkpoint_every=2"]
    return subprocess.run([sys.executable, "-m", "tl_jax.train", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_lora_on_8_fake_devices_killed_and_resumed_matches_one_device(runs, tfds_data_dir, tmp_path):
    """The fixture's LoRA run again, data-sharded over 8 fake CPU devices, SIGKILLed after step 3 and resumed
    from its step-2 checkpoint: the final params match the 1-device run's (5e-5: another reduction order) and
    every metric step is logged once."""
    wd = tmp_path / "sharded"
    first = _subprocess_train(wd, tfds_data_dir, runs / "src", 8, fault="kill_after_step=3")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    proc = _subprocess_train(wd, tfds_data_dir, runs / "src", 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr, proc.stderr[-2000:]
    ref, got = (flatten_paths(load_variables(str(w))["params"]) for w in (runs / "lora", wd))
    assert ref.keys() == got.keys() and any(k.startswith(f"{LORA}/") for k in got)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=5e-5, atol=5e-5, err_msg=k)
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line)["step"] for line in (runs / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps


@pytest.mark.slow
def test_lp_ft_probes_the_base_then_trains_lora_and_head(runs, tfds_data_dir, tmp_path):
    """config.recipe 'lp_ft' with LoRA: the probe (WORKDIR/lp) trains the head alone, LoRA's B still zero;
    the fine-tune trains LoRA and the head with the base bit for bit the source's."""
    wd = tmp_path / "lpft"
    _train(wd, tfds_data_dir, "--config.peft.lora.rank=2", f"--config.init_from={runs / 'src'}",
           "--config.recipe.name=lp_ft", "--config.recipe.lp_steps=2", "--config.train.steps=2",
           "--config.train.checkpoint_every=2", "--config.optimizer.learning_rate=0.01")
    src = flatten_paths(load_variables(str(runs / "src"))["params"])
    probe = flatten_paths(load_variables(str(wd / "lp"))["params"])
    final = flatten_paths(load_variables(str(wd))["params"])
    b = [p for p in probe if p.startswith(f"{LORA}/") and p.endswith("/b")]
    assert b and all(not np.any(probe[p]) for p in b)  # frozen in the probe: still the zero init
    assert any(np.any(final[p]) for p in b)  # trained in the fine-tune
    assert any(not np.array_equal(final[p], probe[p]) for p in probe if p.startswith("head/"))  # trained on
    for p, v in final.items():
        if not p.startswith((f"{LORA}/", "head/")):
            np.testing.assert_array_equal(probe[p], src[p], err_msg=p)
            np.testing.assert_array_equal(v, src[p], err_msg=p)


@pytest.mark.slow
def test_vectorised_lora_sweep_equals_sequential(tfds_data_dir, tmp_path):
    """tests/configs/tiny_sweep.py (2 points: lr, L2, backbone lr multiplier, seed) with LoRA on and the user's
    rules (freeze_base=false: the sweep's `.*` rule trains lora/.*): one vmapped group, the sequential metrics."""
    ov = [f"data.data_dir={tfds_data_dir}", "train.checkpoint_every=2", "peft.lora.rank=2", "peft.freeze_base=false"]
    records = {m: run_sweep("tests/configs/tiny_sweep.py", str(tmp_path / m), vectorize=m, overrides=ov)
               for m in ("on", "off")}
    assert [g["mode"] for g in records["on"]["groups"]] == ["vectorized"]
    for name in ("p0", "p1"):
        vec, seq = (load_variables(str(tmp_path / m / name))["params"] for m in ("on", "off"))
        assert LORA in vec
        for p, v in flatten_paths(vec).items():
            np.testing.assert_allclose(v, flatten_paths(seq)[p], rtol=1e-4, atol=1e-5, err_msg=f"{name} {p}")


@pytest.mark.slow
def test_eval_and_fewshot_read_a_lora_run(runs, tfds_data_dir, tmp_path):
    """`tl-jax eval` rebuilds the LoRA model from the run's config; `tl-jax rank`/`fewshot` build the plain
    model from config.model, so the candidate's LoRA is folded into its base first (not silently dropped)."""
    assert main(["eval", "--workdir", str(runs / "lora")]) == 0
    out = tmp_path / "fewshot.json"
    assert main(["fewshot", "--workdir", str(runs / "lora"), "--target", "tests/configs/tiny.py", "--shots", "5",
                 "--seeds", "1", f"--config.data.data_dir={tfds_data_dir}", "--out", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["shots"]["5"]["accuracy"] <= 1.0
    got = flatten_paths(load_candidate(str(runs / "lora"), "--workdir").variables["params"])
    want = flatten_paths(merge(load_variables(str(runs / "lora"))["params"], run_config(runs / "lora")))
    src = flatten_paths(load_variables(str(runs / "src"))["params"])
    assert got.keys() == want.keys() and not any(p.startswith(f"{LORA}/") for p in got)
    for p in got:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    assert not np.allclose(got["backbone/conv2/kernel"], src["backbone/conv2/kernel"], atol=1e-7)  # LoRA in it


@pytest.mark.slow
def test_a_lora_run_as_distillation_teacher_is_folded(runs, tfds_data_dir, tmp_path):
    """config.objective.distill.teacher = a LoRA run: the teacher (a plain model from its config.model) gets the
    LoRA folded into its params, not the base alone; a LoRA student trains 2 steps from it."""
    wd = tmp_path / "student"
    _train(wd, tfds_data_dir, "--config.peft.lora.rank=2", f"--config.init_from={runs / 'src'}",
           "--config.objective.name=distill", f"--config.objective.distill.teacher={runs / 'lora'}",
           "--config.train.steps=2", "--config.train.checkpoint_every=2")
    teacher = flatten_paths(load(wd).state.aux["teacher"]["params"])
    want = flatten_paths(merge(load_variables(str(runs / "lora"))["params"], run_config(runs / "lora")))
    assert teacher.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(teacher[p], want[p], rtol=0, atol=0, err_msg=p)
