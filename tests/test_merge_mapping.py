"""``merge_params(mapping=...)`` / ``config.init_map``: a student bert starts from a subset of the teacher's layers."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.models import get_model
from tl_jax.params.merge import MergeError, layer_subset, map_paths, merge_params
from tl_jax.params.param_rules import flatten_paths

IDS = np.zeros((2, 6), np.int32)


def bert_params(num_layers: int, seed: int) -> dict:
    model = get_model("bert", 3, vocab_size=20, hidden_size=8, num_layers=num_layers, num_heads=2,
                      intermediate_size=16, max_position=16)
    return jax.tree.map(np.asarray, model.init(jax.random.key(seed), IDS)["params"])


def test_layer_subset_rules():
    assert layer_subset([0, 2, 4]) == [["backbone/layer_0/(.*)", "backbone/layer_0/\\1"],
                                       ["backbone/layer_2/(.*)", "backbone/layer_1/\\1"],
                                       ["backbone/layer_4/(.*)", "backbone/layer_2/\\1"],
                                       ["backbone/layer_\\d+/.*", None]]
    for bad in ([], [0, 0], [-1], [1.0]):
        with pytest.raises(MergeError, match="layers must be distinct non-negative ints"):
            layer_subset(bad)


def test_student_gets_the_teachers_mapped_layers_exactly():
    teacher, student0 = bert_params(6, seed=0), bert_params(3, seed=1)
    merged = merge_params(teacher, student0, dont_load=["head/.*"], mapping=layer_subset([0, 2, 4]))
    t, s, s0 = flatten_paths(teacher), flatten_paths(merged), flatten_paths(student0)
    assert set(s) == set(s0)
    n_layer_leaves = 0
    for path, leaf in s.items():
        if path.startswith("backbone/layer_"):
            i = int(path.split("/")[1].removeprefix("layer_"))
            src = path.replace(f"layer_{i}/", f"layer_{[0, 2, 4][i]}/", 1)
            np.testing.assert_array_equal(leaf, t[src])
            n_layer_leaves += 1
        elif path.startswith("head/"):
            np.testing.assert_array_equal(leaf, s0[path])  # dont_load: the student's own fresh head
        else:
            np.testing.assert_array_equal(leaf, t[path])  # embeddings: as in the teacher
    assert n_layer_leaves == 3 * 16  # 16 leaves per bert layer, all mapped
    assert not np.array_equal(s["backbone/layer_1/intermediate/kernel"], t["backbone/layer_1/intermediate/kernel"])


def test_unmapped_layers_without_a_drop_rule_are_reported():
    teacher, student = bert_params(4, seed=0), bert_params(2, seed=1)
    with pytest.raises(MergeError, match=r"both mapped to backbone/layer_1/"):
        merge_params(teacher, student, ["head/.*"], mapping=[["backbone/layer_2/(.*)", "backbone/layer_1/\\1"]])
    with pytest.raises(MergeError, match=r"unused in the model: backbone/layer_3/"):
        merge_params(teacher, student, ["head/.*"], mapping=[["backbone/layer_1/.*", None],
                                                             ["backbone/layer_2/(.*)", "backbone/layer_1/\\1"]])


@pytest.mark.parametrize("teacher_layers, student_layers, keep, match", [
    (6, 3, [0, 2, 7], r"rule 'backbone/layer_7/\(\.\*\)' matches no param of teacher: it lacks backbone/layer_7/$"),
    (6, 2, [0, 2, 4], r"rule 'backbone/layer_4/\(\.\*\)' -> 'backbone/layer_2/\\\\1' maps to params the model lacks "
                      r"\(e\.g\. backbone/layer_2/.*\): no backbone/layer_2/ in the model$"),
])
def test_a_layer_the_teacher_or_student_lacks_is_one_line(teacher_layers, student_layers, keep, match):
    teacher, student = bert_params(teacher_layers, 0), bert_params(student_layers, 1)
    with pytest.raises(MergeError, match=match) as e:
        merge_params(teacher, student, ["head/.*"], source="teacher", mapping=layer_subset(keep))
    assert "\n" not in str(e.value)


def test_map_paths_renames_first_rule_and_drops():
    flat = {"a/x": 1, "b/x": 2, "c/x": 3}
    rules = [["a/(.*)", "z/\\1"], ["a/x", "never"], ["b/.*", None], ["d/.*", None]]
    assert map_paths(flat, rules, check_rules=False) == {"z/x": 1, "c/x": 3}
    with pytest.raises(MergeError, match=r"rule 'a/x' matches no param of checkpoint"):  # shadowed by rule 0
        map_paths(flat, rules)
    assert map_paths(flat, [rules[0], rules[3]]) == {"z/x": 1, "b/x": 2, "c/x": 3}  # a drop rule may match nothing
    assert map_paths(flat, []) is flat
    with pytest.raises(MergeError, match=r"config.init_map\[0\] must be \[regex, replacement or null\]"):
        map_paths(flat, [["a", "b", "c"]])


@pytest.mark.parametrize("value, match", [
    ([["backbone/(", "x"]], r"config.init_map\[0\]: invalid regex"),
    ([["a", 3]], r"config.init_map\[0\] must be \[regex, replacement or null\]"),
    ("layer_0", r"config.init_map: expected list"),
])
def test_config_init_map_is_validated(value, match):
    c = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.set_value(c, "init_map", value)  # the schema's type, then validate()'s rules
        config_lib.validate(c)


def test_init_map_through_build(tmp_path):
    """``config.init_map`` reaches ``merge_params`` where ``init_from`` is loaded (train/build.py)."""
    from tl_jax.train.build import build_model_and_state
    from tl_jax.weights.convert import save_variables

    teacher = bert_params(4, seed=0)
    save_variables(tmp_path / "teacher", {"params": teacher})
    c = config_lib.base_config()
    c.model.name = "bert"
    c.model.kwargs = dict(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                          max_position=16)
    c.model.num_classes = 3
    c.init_from = str(tmp_path / "teacher")
    c.init_map = layer_subset([1, 3])
    sample = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "label": np.zeros(2, np.int32)}
    from tl_jax.parallel import mesh as mesh_lib

    _, _, state = build_model_and_state(c, 3, sample, mesh_lib.make_mesh(1))
    got = flatten_paths(jax.tree.map(np.asarray, state.params))
    t = flatten_paths(teacher)
    np.testing.assert_array_equal(got["backbone/layer_0/output/kernel"], t["backbone/layer_1/output/kernel"])
    np.testing.assert_array_equal(got["backbone/layer_1/attention/query/bias"], t["backbone/layer_3/attention/query/bias"])
