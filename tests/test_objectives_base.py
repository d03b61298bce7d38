"""The Objective interface: every registered objective, built through the train setup, is immutable.

``build_model_and_state`` finishes the model first (precision, frozen norms, pmap axis) and builds the
objective once with it; nothing may assign to it afterwards — not the train step, not the eval sums,
not a parallel strategy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, load_split, train_dataset
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.objectives.base import _REGISTRY
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.parallel.pmap import PmapStrategy
from tl_jax.parallel.strategy import JitStrategy
from tl_jax.train.build import build_model_and_state
from tl_jax.train.step import make_train_step

PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]
TARGET_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]
DA = ("dann", "coral", "mmd", "cdan", "mcc", "mdd", "self_training")
NAMES = sorted(name for name, cls in _REGISTRY.items() if cls.__module__.startswith("tl_jax."))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny CNN (10 classes, 14x14 inputs): the teacher / source of the objectives that load one."""
    params = get_model("cnn", 10).init(jax.random.PRNGKey(5), jnp.zeros((1, 14, 14, 1)))["params"]
    out = tmp_path_factory.mktemp("objective_base") / "source"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "state", {"params": params})
    return str(out)


def default_config(name: str, data_dir: str, checkpoint: str):
    """``tests/configs/tiny.py`` with ``objective.name = name`` and the least each objective needs."""
    c = config_lib.load_config("tests/configs/tiny.py")
    c.data.data_dir = data_dir
    c.data.shots = 2  # DELTA and Co-Tuning map the training examples once at build time
    c.objective.name = name
    group = c.objective.get(name)
    if name in DA:
        group.target, group.target_pp = "optdigits", TARGET_PP
    if name in ("distill", "feature_distill"):
        group.teacher, group.teacher_model = checkpoint, "cnn"
    if name in ("co_tuning", "residual_output"):
        group.source = checkpoint
    return c


def train_batch(objective, config, data_dir):
    """The objective's first train batch (its own streams combined with config.data's)."""
    standard = train_dataset(load_split(config.data.name, "train", data_dir), build_preprocess(PP), batch_size=8,
                             seed=0, process_index=0, process_count=1)
    batch = objective.train_dataset(standard, batch_size=8, seed=0, process_index=0, process_count=1)[0]
    return {k: jnp.asarray(v) for k, v in batch.items()}


def eval_batch(objective, config, data_dir, n=4):
    """``n`` examples of the objective's eval data (its split and preprocessing), with a mask."""
    split, pp = objective.eval_data(load_split(config.data.name, "test", data_dir), build_preprocess(PP))
    examples = [pp(split.source[i]) for i in range(n)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    return {**batch, "mask": jnp.ones(n, jnp.float32)}


def test_every_method_registers_itself():
    assert {"classification", "dann", "coral", "mmd", "cdan", "mcc", "mdd", "self_training", "bss", "delta",
            "co_tuning", "distill", "feature_distill", "multitask", "multidomain", "joint", "residual_output",
            "residual_params"} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_built_objective_is_immutable_and_not_mutated_by_its_users(name, tfds_data_dir, checkpoint):
    config = default_config(name, tfds_data_dir, checkpoint)
    mesh = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    sample = {"image": np.zeros((1, 14, 14, 1), np.float32)}
    objective, _, state = build_model_and_state(config, 10, sample, mesh)
    before = dict(vars(objective))
    assert objective.param_groups is not None and objective.name == name
    with pytest.raises(AttributeError, match="immutable once built"):
        objective.model = objective.model
    with pytest.raises(AttributeError, match="immutable once built"):
        objective.penalties = None
    # what the loop does with it: its train and eval data, the step's loss (or the method's own update)
    # and the eval sums traced, a parallel strategy's programs built around its loss
    variables = (state.params, state.batch_stats, state.aux)
    batch = train_batch(objective, config, tfds_data_dir)
    jax.eval_shape(objective.value_and_grad or objective.loss, *variables, batch, jax.random.PRNGKey(0), jnp.int32(0))
    jax.eval_shape(objective.eval_sums, *variables, eval_batch(objective, config, tfds_data_dir))
    for strategy in (JitStrategy(mesh), PmapStrategy(mesh)):
        strategy.train_step(make_train_step(objective.loss, optax.sgd(0.1), axis_name=strategy.axis_name,
                                            value_and_grad=objective.value_and_grad))
    after = dict(vars(objective))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), [k for k in before if after[k] is not before[k]]


def test_replace_returns_a_changed_copy_and_leaves_the_original():
    config = config_lib.base_config()
    model = get_model("cnn", 10)
    obj = build_objective(config, model)
    other = obj.replace(model=model.clone(dropout_rate=0.5), frozen_stats=["backbone/bn"])
    assert obj.model is model and obj.frozen_stats == () and other.frozen_stats == ("backbone/bn",)
    assert other.model.dropout_rate == 0.5 and other.config is obj.config
    with pytest.raises(AttributeError, match="immutable once built"):
        del other.model
