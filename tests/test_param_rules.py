"""Freezing rules: first match wins, full coverage, no dead rules, no state for frozen params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from tl_jax.params import param_rules as pr

PARAMS = {"backbone": {"conv1": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.zeros(4)},
                       "fc": {"kernel": jnp.ones((8, 5)), "bias": jnp.zeros(5)}},
          "head": {"kernel": jnp.ones((5, 10)), "bias": jnp.zeros(10)}}


def test_first_match_wins():
    mults = pr.match_rules(PARAMS, [["backbone/conv1/.*", None], ["backbone/.*", 0.1], [".*", 1.0]])
    assert mults == {"backbone/conv1/bias": None, "backbone/conv1/kernel": None,
                     "backbone/fc/bias": 0.1, "backbone/fc/kernel": 0.1,
                     "head/bias": 1.0, "head/kernel": 1.0}


def test_uncovered_param_is_named():
    with pytest.raises(pr.ParamRuleError, match="head/bias, head/kernel"):
        pr.match_rules(PARAMS, [["backbone/.*", None]])


def test_dead_rule_is_named():
    with pytest.raises(pr.ParamRuleError, match=r"\[1\] 'bakbone/.\*'"):
        pr.match_rules(PARAMS, [["head/.*", 1.0], ["bakbone/.*", None], [".*", 1.0]])


def test_shadowed_rule_is_dead():
    with pytest.raises(pr.ParamRuleError, match="shadowed"):
        pr.match_rules(PARAMS, [[".*", 1.0], ["head/.*", None]])


@pytest.mark.parametrize("rules, msg", [
    ([["(", 1.0]], "invalid regex"),
    ([[".*", -1.0]], "multiplier"),
    ([[".*", float("nan")]], "multiplier"),
    ([[".*"]], "pair"),
    ([], "non-empty"),
    ("backbone", "non-empty"),
])
def test_bad_tables(rules, msg):
    with pytest.raises(pr.ParamRuleError, match=msg):
        pr.match_rules(PARAMS, rules)


def test_frozen_params_hold_no_optimizer_state_and_do_not_move():
    rules = [["backbone/.*", None], ["head/.*", 1.0]]
    tx = pr.build_optimizer(PARAMS, rules, lambda m: optax.adam(0.1 * m))
    state = tx.init(PARAMS)
    sizes = {pr.path_str(p): np.size(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    # Adam mu/nu exist for the 2 head leaves only (plus scalar counts).
    mu_nu = {k: v for k, v in sizes.items() if "/mu/" in k or "/nu/" in k}
    assert mu_nu and all("head" in k for k in mu_nu), mu_nu
    assert sum(mu_nu.values()) == 2 * (5 * 10 + 10)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    for path in ("backbone/conv1/kernel", "backbone/fc/bias"):
        np.testing.assert_array_equal(pr.flatten_paths(new)[path], pr.flatten_paths(PARAMS)[path])
    assert not np.allclose(new["head"]["kernel"], PARAMS["head"]["kernel"])


def test_lr_multiplier_scales_sgd_update():
    rules = [["backbone/.*", 0.1], [".*", 1.0]]
    tx = pr.build_optimizer(PARAMS, rules, lambda m: optax.sgd(0.5 * m))
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["backbone"]["fc"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5, rtol=1e-6)


def test_summary_table_counts():
    table = pr.summary_table(PARAMS, [["backbone/.*", None], [".*", 1.0]])
    assert "| frozen | 4 | 85 |" in table  # 36 + 4 + 40 + 5
    assert "| lr_x1 | 2 | 60 |" in table


def test_frozen_module_paths():
    bn_params = {"backbone": {"bn1": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
                              "bn2": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
                 "head": {"kernel": jnp.ones((3, 2))}}
    rules = [["backbone/bn1/.*", None], [".*", 1.0]]
    assert pr.frozen_module_paths(bn_params, rules, ["backbone/bn1", "backbone/bn2"]) == ("backbone/bn1",)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["backbone/.*", "backbone/conv1/.*", "backbone/fc/.*", "head/.*",
                                 "head/kernel", ".*/bias"]), min_size=1, max_size=4, unique=True),
       st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=4, max_size=4))
def test_property_first_match_and_coverage(patterns, mults):
    """Every param gets the multiplier of the first fullmatching rule, or an error is raised."""
    import re
    rules = [[p, m] for p, m in zip(patterns, mults)] + [[".*", 1.0]]
    paths = list(pr.flatten_paths(PARAMS))
    expected, used = {}, set()
    for path in paths:
        i = next(i for i, (p, _) in enumerate(rules) if re.fullmatch(p, path))
        expected[path] = rules[i][1]
        used.add(i)
    if len(used) < len(rules):
        with pytest.raises(pr.ParamRuleError, match="match no param"):
            pr.match_rules(PARAMS, rules)
    else:
        assert pr.match_rules(PARAMS, rules) == expected


def test_param_groups_is_what_the_free_functions_give(monkeypatch):
    from tl_jax.params.param_rules import (ParamGroups, build_optimizer, frozen_module_paths, label_tree,
                                             summary_table, trainable_mask)

    params = {"backbone": {"bn": {"scale": np.ones(3), "bias": np.zeros(3)}, "conv": {"kernel": np.ones((2, 3))}},
              "head": {"kernel": np.ones((3, 4)), "bias": np.zeros(4)}}
    rules = [["backbone/bn/.*", None], ["backbone/.*", 0.1], [".*", 1.0]]
    g = ParamGroups.resolve(params, rules)
    assert jax.tree.leaves(g.labels()) == jax.tree.leaves(label_tree(params, rules))
    assert jax.tree.leaves(g.trainable()) == jax.tree.leaves(trainable_mask(params, rules)) == \
        [False, False, True, True, True]  # leaf order: bn bias, bn scale, conv kernel, head bias, head kernel
    assert g.frozen_modules(["backbone/bn", "backbone/conv"]) == ("backbone/bn",) == \
        frozen_module_paths(params, rules, ["backbone/bn", "backbone/conv"])
    assert g.trained() == {"lr_x0.1": 0.1, "lr_x1": 1.0}
    assert g.table() == summary_table(params, rules) and "| frozen | 2 | 6 | 21.4% |" in g.table()  # 6 of 28
    tx = g.optimizer(lambda m: optax.sgd(m))
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(build_optimizer(params, rules, optax.sgd).init(params))


def test_a_run_matches_its_rules_once(tmp_path, tfds_data_dir, monkeypatch):
    """prepare_run resolves config.param_rules into one ParamGroups that everything else reads."""
    from tl_jax import config as config_lib
    from tl_jax.train import loop
    from tl_jax.params import param_rules as pr

    calls = []
    original = pr.match_rules
    monkeypatch.setattr(pr, "match_rules", lambda *a, **k: calls.append(1) or original(*a, **k))
    c = config_lib.load_config("tests/configs/tiny.py:steps=2")
    c.data.data_dir = tfds_data_dir
    c.param_rules = [["backbone/conv1/.*", None], ["backbone/.*", 0.1], [".*", 1.0]]
    c.loss.l2 = 1e-4
    loop.train(c, str(tmp_path / "wd"))
    assert len(calls) == 1
