"""Joint multi-domain multi-task: the loss vs loops; the objective's special cases, labels, config errors."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.data import register_dataset
from tl_jax.objectives.joint import joint_loss
from tl_jax.objectives.multidomain import multi_domain_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.train.checkpoint import load_variables
from tl_jax.train.loop import train


def reference(ce, dom, lam, mask, normalization):
    """Σ_d Σ_i λ_{d,i} · (mean_{b∈d} | Σ_{b∈d} /B') CE_i(b), pairs with λ = 0 skipped, by plain loops."""
    num_d, num_t = lam.shape
    total, per = 0.0, np.zeros((num_d, num_t))
    real = sum(mask)
    for d in range(num_d):
        for i in range(num_t):
            if lam[d, i] == 0:
                continue
            s, n = 0.0, 0
            for b in range(len(dom)):
                if dom[b] == d and mask[b]:
                    s += ce[i, b]
                    n += 1
            if normalization == "domain_mean":
                term = lam[d, i] * (s / n if n else 0.0)
            else:
                term = lam[d, i] * s / max(real, 1)
            per[d, i] = term
            total += term
    return total, per


def case(seed=0, b=12, d=3, t=2):
    r = np.random.default_rng(seed)
    ce = r.uniform(0.1, 3.0, size=(t, b)).astype(np.float32)
    dom = r.integers(0, d - 1, size=b).astype(np.int32)          # domain d-1 absent from the batch
    lam = r.uniform(0.2, 2.0, size=(d, t))
    if t > 1:
        lam[0, 1] = 0.0                                         # task 1 absent from domain 0
    mask = (r.uniform(size=b) > 0.2).astype(np.float32)
    return ce, dom, lam, mask


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loops(normalization, seed):
    ce, dom, lam, mask = case(seed)
    total, weighted, means = joint_loss(ce, dom, lam, mask=mask, normalization=normalization)
    ref_total, ref_per = reference(ce, dom, lam, mask, normalization)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weighted), ref_per, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(weighted)[2] == 0)                  # absent domain adds 0
    if normalization == "domain_mean":
        i = 0
        sel = (dom == 1) & (mask > 0)
        np.testing.assert_allclose(float(means[1, i]), ce[i, sel].mean(), rtol=1e-6)


def test_inactive_pairs_get_no_gradient_even_with_nan():
    ce, dom, lam, mask = case(3)
    ce[1, dom == 0] = np.nan                                     # task 1 has no labels on domain 0
    grad = jax.grad(lambda x: joint_loss(x, dom, lam, mask=mask)[0])(jnp.asarray(ce))
    g = np.asarray(grad)
    assert np.all(np.isfinite(g))
    assert np.all(g[1, dom == 0] == 0) and np.all(g[:, mask == 0] == 0)
    assert np.any(g[0, (dom == 0) & (mask > 0)] != 0)


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
def test_one_task_is_multi_domain_loss(normalization):
    ce, dom, lam, mask = case(4, t=1)
    lam[0, 0] = 0.7
    total, weighted, _ = joint_loss(ce, dom, lam, mask=mask, normalization=normalization)
    md_total, md_per = multi_domain_loss(ce[0], dom, lam[:, 0], mask=mask, normalization=normalization)
    np.testing.assert_allclose(float(total), float(md_total), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weighted)[:, 0], np.asarray(md_per), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=np.ones((2, 3))), r"weights must have shape \[D, 2\]"),
    (dict(weights=-np.ones((2, 2))), "finite and >= 0"),
    (dict(weights=np.full((2, 2), np.nan)), "finite and >= 0"),
    (dict(normalization="sum"), "normalization"),
    (dict(domain_ids=np.array([0, 5, 0, 1], np.int32)), r"domain_ids must be in \[0, 2\)"),
])
def test_bad_input(kwargs, match):
    args = dict(per_example_losses=np.ones((2, 4), np.float32), domain_ids=np.array([0, 1, 0, 1], np.int32),
                weights=np.ones((2, 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        joint_loss(**args)


PP = [{"op": "rescale", "in_max": 255.0}]
RNG = jax.random.PRNGKey(0)


def digits(name, seed, *, coarse=True, n=48, n_test=20):
    """A registered in-memory dataset of 8x8 images whose labels are learnable (a bright row per class)."""
    r = np.random.default_rng(seed)

    def split(m):
        y = r.integers(0, 10, size=m)
        x = r.integers(0, 60, size=(m, 8, 8, 1)).astype(np.uint8)
        x[np.arange(m), y % 8, :, 0] = 255
        out = {"image": x, "label": y}
        if coarse:
            out["coarse"] = y // 2
        return out

    register_dataset(name, train=split(n), test=split(n_test), num_classes=10)


digits("jA", 0)
digits("jB", 1, coarse=False)


def config(objective="joint", **group):
    c = config_lib.base_config()
    c.model.name = "cnn"
    c.data.name = "jA"
    c.data.train_pp, c.data.eval_pp = PP, list(PP)
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.train.steps = 3
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
    c.train.progress = False
    c.objective.name = objective
    for k, v in group.items():
        c.objective[objective][k] = v
    return c


def make(**group):
    return build_objective(config(**group), get_model("cnn", 10))


def records(wd):
    train_rec, test_rec = {}, {}
    for line in open(os.path.join(wd, "metrics.jsonl")):
        r = json.loads(line)
        target = test_rec if any(k.startswith("test/") for k in r) else train_rec
        target.setdefault(r["step"], {}).update(r)
    return train_rec, test_rec


def assert_params_close(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_one_domain_is_multitask(tmp_path):
    mt = config("multitask", tasks=["digit", "parity"], weights=[1.0, 0.5])
    jt = config(tasks=["digit", "parity"], weights=[[1.0, 0.5]])
    train(mt, str(tmp_path / "mt"))
    train(jt, str(tmp_path / "jt"))
    assert_params_close(load_variables(str(tmp_path / "mt")), load_variables(str(tmp_path / "jt")))
    (mtr, mte), (jtr, jte) = records(tmp_path / "mt"), records(tmp_path / "jt")
    assert sorted(mtr) == sorted(jtr) == [1, 2, 3]
    for step in mtr:
        np.testing.assert_allclose(jtr[step]["train/loss"], mtr[step]["train/loss"], rtol=1e-6)
        for t in ("digit", "parity"):
            np.testing.assert_allclose(jtr[step][f"train/loss/jA/{t}"], mtr[step][f"train/loss/{t}"], rtol=1e-6)
            np.testing.assert_allclose(jtr[step][f"train/accuracy/jA/{t}"], mtr[step][f"train/accuracy/{t}"])
    for t in ("digit", "parity"):
        np.testing.assert_allclose(jte[3][f"test/accuracy/jA/{t}"], mte[3][f"test/accuracy/{t}"], atol=1e-6)
        np.testing.assert_allclose(jte[3][f"test/loss/jA/{t}"], mte[3][f"test/loss/{t}"], rtol=1e-5)


@pytest.mark.slow
def test_one_task_is_multidomain(tmp_path):
    md = config("multidomain", domains=[{"name": "jB"}], proportions=[0.5, 0.5], weights=[1.0, 2.0])
    jt = config(domains=[{"name": "jB"}], tasks=["digit"], proportions=[0.5, 0.5], weights=[[1.0], [2.0]])
    train(md, str(tmp_path / "md"))
    train(jt, str(tmp_path / "jt"))
    assert_params_close(load_variables(str(tmp_path / "md")), load_variables(str(tmp_path / "jt")))
    (mdr, mde), (jtr, jte) = records(tmp_path / "md"), records(tmp_path / "jt")
    for step in mdr:
        for k in ("train/loss", "train/share/jA", "train/share/jB"):
            np.testing.assert_allclose(jtr[step][k], mdr[step][k], rtol=1e-6)
        for d in ("jA", "jB"):
            np.testing.assert_allclose(jtr[step][f"train/weighted/{d}/digit"], mdr[step][f"train/loss/{d}"], rtol=1e-6)
    for k in ("test/accuracy", "test/loss"):
        np.testing.assert_allclose(jte[3][k], mde[3][k], rtol=1e-5)
    for d in ("jA", "jB"):
        np.testing.assert_allclose(jte[3][f"test/accuracy/{d}/digit"], mde[3][f"test/accuracy/{d}"], atol=1e-6)


def batch_of(obj, n=12, seed=0, domains=None):
    r = np.random.default_rng(seed)
    y = r.integers(0, 10, size=n).astype(np.int32)
    b = {"image": r.normal(size=(n, 8, 8, 1)).astype(np.float32), "label": y,
         "domain": np.zeros(n, np.int32) if domains is None else np.asarray(domains, np.int32)}
    for t in obj.tasks:
        b[f"label/{t.name}"] = {"digit": y, "parity": y % 2, "coarse": y // 2}[t.name].astype(np.int32)
    return b


def test_pcgrad_one_domain_equals_multitask_pcgrad():
    group = dict(tasks=["digit", "parity"], weighting="pcgrad", pcgrad_random_order=False)
    jt = make(**group, weights=[[1.0, 0.5]])
    mt = build_objective(config("multitask", **group, weights=[1.0, 0.5]), get_model("cnn", 10))
    b = batch_of(jt)
    params = mt.model.init(RNG, b["image"])["params"]
    (l1, (_, m1)), g1 = mt.value_and_grad(params, {}, {}, b, RNG, jnp.int32(0))
    (l2, (_, m2)), g2 = jt.value_and_grad(params, {}, {}, b, RNG, jnp.int32(0))
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    assert_params_close(g1, g2)
    np.testing.assert_allclose(m2["train/loss/jA/parity"], m1["train/loss/parity"], rtol=1e-6)


def test_uncertainty_one_log_var_per_active_pair():
    obj = make(domains=[{"name": "jB"}], tasks=["digit", "parity"], weights=[[1.0, 1.0], [2.0, None]],
               weighting="uncertainty")
    b = batch_of(obj, domains=[0, 1] * 6)
    params = obj.model.init(RNG, b["image"])["params"]
    extra, _ = obj.init_extra(RNG, params, {})
    assert jax.tree.map(float, extra) == {"task_log_vars": {"jA": {"digit": 0.0, "parity": 0.0}, "jB": {"digit": 0.0}}}
    s = {"jA": {"digit": jnp.float32(0.3), "parity": jnp.float32(-0.2)}, "jB": {"digit": jnp.float32(0.5)}}
    loss, (_, m) = obj.loss({**params, "task_log_vars": s}, {}, {}, b, RNG, jnp.int32(0))
    ref = sum(np.exp(-float(s[d][t])) * m[f"train/weighted/{d}/{t}"] + float(s[d][t])
              for d, t in [("jA", "digit"), ("jA", "parity"), ("jB", "digit")])
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert "train/loss/jB/parity" not in m and "train/weight/jB/digit" in m


def test_zero_weight_pair_gets_no_gradient_and_no_metric():
    obj = make(domains=[{"name": "jB"}], tasks=["digit", "parity"], weights=[[1.0, 0.0], [1.0, 1.0]])
    b = batch_of(obj, domains=[0, 1] * 6)
    b["label/parity"] = np.where(b["domain"] == 0, -1, b["label/parity"]).astype(np.int32)  # absent on jA
    params = obj.model.init(RNG, b["image"])["params"]
    b_only_a = {**b, "domain": np.zeros(12, np.int32)}
    g = jax.grad(lambda p: obj.loss(p, {}, {}, b_only_a, RNG, jnp.int32(0))[0])(params)
    assert np.all(np.asarray(g["head"]["parity"]["kernel"]) == 0)
    _, (_, m) = obj.loss(params, {}, {}, b, RNG, jnp.int32(0))
    assert "train/loss/jA/parity" not in m and "train/loss/jB/parity" in m


def test_field_and_reference_tasks_carry_labels(tmp_path):
    (tmp_path / "labels.py").write_text("def mod3(y):\n    return y % 3\n")
    obj = make(domains=[{"name": "jB"}], weights=[[1.0, 1.0, 1.0], [1.0, None, 1.0]],
               tasks=["digit", "coarse", {"name": "m3", "fn": f"{tmp_path}/labels.py:mod3"}])
    assert [t.name for t in obj.tasks] == ["digit", "coarse", "m3"] and obj.num_classes == [10, 5, 3]
    ds = obj.train_dataset(None, batch_size=16, seed=0, process_index=0, process_count=1)
    b = ds[0]
    assert b["label/digit"].dtype == np.int32 and set(np.unique(b["domain"])) == {0, 1}
    np.testing.assert_array_equal(b["label/m3"], b["label"] % 3)
    a, z = b["domain"] == 0, b["domain"] == 1
    np.testing.assert_array_equal(b["label/coarse"][a], b["label"][a] // 2)
    assert np.all(b["label/coarse"][z] == -1)                 # task absent from jB: no labels there
    split, pp = obj.eval_data(*_default_eval(obj))
    ex = pp(split.source[len(split) - 1])
    assert ex["domain"] == 1 and ex["label/m3"] == ex["label"] % 3 and ex["label/coarse"] == -1


def _default_eval(obj):
    from tl_jax.data import build_preprocess, load_split
    return load_split("jA", "test"), build_preprocess(PP)


def test_one_dataset_as_two_domains():
    obj = make(domains=[{"name": "source", "dataset": "config.data"},
                        {"name": "target", "dataset": "jA", "train_pp": PP + [{"op": "flip_lr"}]}],
               tasks=["digit"], weights=[[1.0], [3.0]])
    assert [d.name for d in obj.domains] == ["source", "target"]
    b = obj.train_dataset(None, batch_size=16, seed=0, process_index=0, process_count=1)[0]
    assert set(np.unique(b["domain"])) == {0, 1}
    _, (_, m) = obj.loss(obj.model.init(RNG, b["image"])["params"], {}, {}, b, RNG, jnp.int32(0))
    assert {"train/loss/source/digit", "train/loss/target/digit", "train/share/target"} <= set(m)


def test_tfds_label_field_kept_by_example_source():
    import tensorflow_datasets as tfds

    from tl_jax.data import load_split
    with tfds.testing.mock_data(num_examples=4):
        src = load_split("cifar100", "train").source
        assert "coarse_label" not in src[0]
        with_field = src.with_label_fields(("coarse_label",))
        ex = with_field[1]
        assert isinstance(ex["coarse_label"], int) and 0 <= ex["coarse_label"] < 20
        assert with_field.field_num_classes("coarse_label") == 20
        with pytest.raises(ValueError, match="no feature 'fine'"):
            src.with_label_fields(("fine",), "config.objective.joint.tasks[1]")


@pytest.mark.parametrize("group, match", [
    (dict(tasks=["digit", "parity"], weights=[[1.0, 1.0, 1.0]]), r"weights must be a \[1\]\[2\] matrix"),
    (dict(tasks=["digit", "parity"], weights=[[1.0], [1.0]]), r"weights must be a \[1\]\[2\] matrix"),
    (dict(tasks=["digit"], weights=[[-1.0]]), r"weights\[0\]\[0\] must be a finite number >= 0"),
    (dict(tasks=["digit"], weights=[[float("nan")]]), r"weights\[0\]\[0\] must be a finite number >= 0"),
    (dict(tasks=["digit"], weights=[[float("inf")]]), r"weights\[0\]\[0\] must be a finite number >= 0"),
    (dict(domains=[{"name": "jB"}], tasks=["coarse"]), r"tasks\[0\] \(coarse\) on domain 'jB'.*no field 'coarse'"),
    (dict(tasks=["fine"]), r"tasks\[0\] \(fine\) on domain 'jA'.*no field 'fine'"),
    (dict(domains=[{"name": "jA"}]), r"domain names must be unique.*\['jA'\]"),
    (dict(domains=[{"name": "x", "dataset": "jB"}, {"name": "x", "dataset": "jA"}]), "domain names must be unique"),
    (dict(tasks=["BAD_FN"]), r"tasks\[0\] \(boom\).*label function .* failed: ZeroDivisionError"),
    (dict(tasks=[{"fn": "BAD_RANGE", "num_classes": 2}]), r"tasks\[0\] \(plus1\).*must be in \[0, 2\), got range"),
])
def test_bad_input_is_one_line_and_leaves_workdir_alone(tmp_path, group, match):
    (tmp_path / "fns.py").write_text("def boom(y):\n    return y // 0 if False else 1 // 0\n"
                                     "def plus1(y):\n    return y % 2 + 1\n")
    refs = {"BAD_FN": f"{tmp_path}/fns.py:boom", "BAD_RANGE": f"{tmp_path}/fns.py:plus1"}
    group["tasks"] = [refs.get(t, t) if isinstance(t, str) else {k: refs.get(v, v) for k, v in t.items()}
                      for t in group.get("tasks", ["digit"])]
    wd = tmp_path / "run"
    with pytest.raises(ValueError, match=match) as err:
        train(config(**group), str(wd))
    assert "\n" not in str(err.value) and str(err.value).startswith("config.objective.joint")
    assert not wd.exists()
