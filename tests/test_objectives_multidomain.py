"""Multi-domain: the weighted loss vs NumPy; the objective's loss, eval sums, mixture and exact resume, end to end."""
import grain
import jax
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.multidomain import domain_scales, domain_share, multi_domain_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from conftest import RUN_FILES, workdir_files


LOSS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan], np.float32)   # last entry is padding
DOM = np.array([0, 0, 2, 2, 0, 1])
LAM = np.array([1.0, 3.0, 0.5, 2.0], np.float32)                  # domain 3 absent, domain 1 only padded
W = np.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.0], np.float32)
MASK = np.array([1, 1, 1, 1, 1, 0])


def np_multi_domain(loss, dom, lam, w, m, normalization):
    loss, w, m = (np.asarray(a, np.float64) for a in (loss, w, m))
    loss = np.where(w * m != 0, loss, 0.0)
    per = np.zeros(len(lam))
    for d in range(len(lam)):
        sel = dom == d
        num = np.sum(w[sel] * m[sel] * loss[sel])
        if normalization == "domain_mean":
            den = np.sum(w[sel] * m[sel])
            per[d] = lam[d] * num / den if den > 0 else 0.0
        else:
            per[d] = lam[d] * num / max(m.sum(), 1.0)
    return per.sum(), per


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
def test_matches_numpy(normalization):
    total, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK, normalization=normalization)
    want_total, want_per = np_multi_domain(LOSS, DOM, LAM, W, MASK, normalization)
    np.testing.assert_allclose(per, want_per, rtol=1e-6)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    assert np.all(np.isfinite(per)) and per[1] == 0 and per[3] == 0


def test_hand_values():
    # domain 0: weighted mean (1*1 + 0.5*2 + 0*5)/(1.5) = 4/3;  domain 2: (2*3 + 1*4)/3 = 10/3
    _, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK)
    np.testing.assert_allclose(per, [4 / 3, 0.0, 0.5 * 10 / 3, 0.0], rtol=1e-6)
    # global: 5 real examples; domain 0: 1*(1 + 1 + 0)/5, domain 2: 0.5*(6 + 4)/5
    _, per = multi_domain_loss(LOSS, DOM, LAM, example_weights=W, mask=MASK, normalization="global_mean")
    np.testing.assert_allclose(per, [2 / 5, 0.0, 1.0, 0.0], rtol=1e-6)


def test_defaults_reduce_to_means():
    loss = jnp.array([1.0, 2.0, 3.0, 6.0])
    dom = jnp.array([0, 1, 1, 0])
    total, _ = multi_domain_loss(loss, dom, jnp.ones(2), normalization="global_mean")
    np.testing.assert_allclose(total, 3.0)             # plain mean
    total, per = multi_domain_loss(loss, dom, jnp.ones(2))
    np.testing.assert_allclose(per, [3.5, 2.5])         # per-domain means


def test_gradient_finite_and_zero_on_padding():
    f = jax.jit(lambda l: multi_domain_loss(l, DOM, LAM, example_weights=W, mask=MASK)[0])
    g = np.asarray(jax.grad(f)(jnp.asarray(LOSS)))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, [1 / 1.5, 0.5 / 1.5, 0.5 * 2 / 3, 0.5 / 3, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(normalization="global_sum"), "normalization"),
    (dict(domain_weights=np.array([1.0, -1.0, 1.0, 1.0])), "domain_weights"),
    (dict(domain_weights=np.array([1.0, np.inf, 1.0, 1.0])), "domain_weights"),
    (dict(example_weights=-W), "example_weights"),
    (dict(example_weights=W[:3]), "example_weights"),
    (dict(mask=MASK[:2]), "mask"),
    (dict(domain_ids=DOM[:5]), "domain_ids"),
    (dict(domain_ids=DOM + 2), "domain_ids"),
])
def test_bad_args(kwargs, match):
    args = dict(per_example_loss=LOSS, domain_ids=DOM, domain_weights=LAM) | kwargs
    with pytest.raises(ValueError, match=match):
        multi_domain_loss(**args)


PP = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 8}]
DIGITS_PP = [{"op": "rescale", "in_max": 16.0}]  # optdigits is 8x8 already
RNG = jax.random.PRNGKey(0)


def config(data_dir=None, **group):
    c = config_lib.base_config()
    c.data.data_dir = data_dir
    c.data.train_pp, c.data.eval_pp = PP, PP
    c.objective.name = "multidomain"
    c.objective.multidomain.domains = [{"name": "optdigits", "train_pp": DIGITS_PP, "eval_pp": DIGITS_PP}]
    for k, v in group.items():
        c.objective.multidomain[k] = v
    return c


def make(data_dir=None, **group):
    return build_objective(config(data_dir, **group), get_model("cnn", 10))


def fixed_batch():
    r = np.random.default_rng(0)
    return {"image": r.normal(size=(10, 8, 8, 1)).astype(np.float32),
            "label": r.integers(0, 10, size=10).astype(np.int32),
            "domain": np.array([0, 0, 0, 1, 0, 1, 0, 0, 1, 0], np.int32)}


def np_ce(logits, labels):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(labels)), labels]


@pytest.mark.parametrize("normalization", ["domain_mean", "global_mean"])
def test_loss_matches_numpy_for_both_normalisations(normalization):
    obj = make(weights=[0.5, 2.0], normalization=normalization)
    b = fixed_batch()
    params = obj.model.init(RNG, b["image"])["params"]
    loss, (_, m) = obj.loss(params, {}, {}, b, RNG, jnp.int32(0))
    ce = np_ce(obj.model.apply({"params": params}, b["image"]), b["label"])
    d, lam = b["domain"], np.array([0.5, 2.0])
    if normalization == "domain_mean":
        per = [lam[k] * ce[d == k].mean() for k in (0, 1)]
    else:
        per = [lam[k] * ce[d == k].sum() / len(ce) for k in (0, 1)]
    np.testing.assert_allclose(loss, sum(per), rtol=1e-5)
    np.testing.assert_allclose([m["train/loss/mnist5k"], m["train/loss/optdigits"]], per, rtol=1e-5)
    np.testing.assert_allclose(m["train/share/optdigits"], 0.3, rtol=1e-6)


def test_zero_domain_weight_removes_its_gradient():
    obj = make(weights=[1.0, 0.0])
    b = fixed_batch()
    params = obj.model.init(RNG, b["image"])["params"]
    g = jax.jit(jax.grad(lambda p: obj.loss(p, {}, {}, b, RNG, jnp.int32(0))[0]))(params)
    keep = b["domain"] == 0
    only0 = {k: v[keep] for k, v in b.items()}
    obj0 = make(weights=[1.0, 1.0])
    g0 = jax.jit(jax.grad(lambda p: obj0.loss(p, {}, {}, only0, RNG, jnp.int32(0))[0]))(params)
    for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)


def test_eval_sums_give_per_domain_and_macro_means():
    obj = make()
    b = {"image": np.random.default_rng(1).normal(size=(6, 8, 8, 1)).astype(np.float32),
         "label": np.array([1, 2, 3, 4, 5, 0], np.int32), "domain": np.array([0, 1, 0, 1, 0, 0], np.int32),
         "mask": np.array([1, 1, 1, 1, 1, 0], np.float32)}  # last row: padding
    b["domain_scale"] = domain_scales([3.0, 2.0])[b["domain"]]  # what eval_data's preprocessing adds
    params = obj.model.init(RNG, b["image"])["params"]
    sums = jax.device_get(obj.eval_sums(params, {}, {}, b))
    logits = obj.model.apply({"params": params}, b["image"])
    correct = (np.argmax(logits, -1) == b["label"]).astype(float)
    ce = np_ce(logits, b["label"])
    real = b["mask"] == 1
    n = sums["count"]
    assert n == 5
    acc = [correct[real & (b["domain"] == k)].mean() for k in (0, 1)]
    loss = [ce[real & (b["domain"] == k)].mean() for k in (0, 1)]
    np.testing.assert_allclose([sums["accuracy/mnist5k"] / n, sums["accuracy/optdigits"] / n], acc, atol=1e-6)
    np.testing.assert_allclose([sums["loss/mnist5k"] / n, sums["loss/optdigits"] / n], loss, rtol=1e-5)
    np.testing.assert_allclose(sums["accuracy"] / n, np.mean(acc), atol=1e-6)
    np.testing.assert_allclose(sums["loss"] / n, np.mean(loss), rtol=1e-5)


@pytest.mark.parametrize("group, match", [
    ({"weights": [1.0, -0.5]}, r"multidomain\.weights\[1\] must be a finite number >= 0"),
    ({"weights": [1.0]}, r"multidomain\.weights has 1 values for 2"),
    ({"proportions": [0.0, 0.0]}, r"multidomain\.proportions are all 0"),
    ({"normalization": "sum"}, r"multidomain\.normalization must be one of"),
    ({"domains": [{"name": "optdigits", "colour": 1}]}, r"multidomain\.domains\[0\] has unknown key\(s\) \['colour'\]"),
    ({"domains": [{"name": "mnist5k"}]}, r"multidomain\.domains: domain names must differ"),
    ({"domains": [{"train_pp": []}]}, r"multidomain\.domains\[0\]\.name must name a dataset"),
])
def test_bad_config_is_one_clear_error(group, match):
    with pytest.raises(ValueError, match=match):
        make(**group)


def test_mixture_proportions_and_exact_resume(tfds_data_dir):
    obj = make(tfds_data_dir, proportions=[0.75, 0.25])
    ds = obj.train_dataset(None, batch_size=16, seed=0, process_index=0, process_count=1)
    share = domain_share(ds, 2, batches=8)
    np.testing.assert_allclose(share, [0.75, 0.25], atol=1e-9)  # deterministic interleaving: exact
    b = ds[0]
    assert b["image"].shape == (16, 8, 8, 1) and b["domain"].dtype == np.int32
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = next(it)
    it2 = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    it2.set_state(state)
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # proportion 0: that domain is never trained on (it is still evaluated)
    only = make(tfds_data_dir, proportions=[0.0, 1.0]).train_dataset(None, batch_size=8, seed=0, process_index=0,
                                                                      process_count=1)
    np.testing.assert_allclose(domain_share(only, 2, batches=3), [0.0, 1.0])


def test_mismatched_image_shapes_are_refused(tfds_data_dir):
    c = config(tfds_data_dir)
    c.objective.multidomain.domains = [{"name": "optdigits", "train_pp": [{"op": "resize", "size": 9}]}]
    obj = build_objective(c, get_model("cnn", 10))
    with pytest.raises(ValueError, match=r"domains\[0\]\.train_pp gives optdigits images of shape \(9, 9, 1\)"):
        obj.train_dataset(None, batch_size=8, seed=0, process_index=0, process_count=1)


@pytest.mark.slow
def test_train_end_to_end_reports_each_domain(tmp_path, tfds_data_dir):
    from tl_jax.train.loop import train

    c = config_lib.load_config("tests/configs/tiny.py:steps=4")
    c.data.data_dir = tfds_data_dir
    c.data.train_pp, c.data.eval_pp = PP, PP
    c.objective.name = "multidomain"
    c.objective.multidomain.domains = [{"name": "optdigits", "train_pp": DIGITS_PP, "eval_pp": DIGITS_PP}]
    c.objective.multidomain.weights = [1.0, 2.0]
    wd = str(tmp_path / "md")
    s = train(c, wd)
    assert workdir_files(wd) == RUN_FILES
    accs = [s["test/accuracy/mnist5k"], s["test/accuracy/optdigits"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    np.testing.assert_allclose(s["test/accuracy"], np.mean(accs), atol=1e-6)
    assert s["train/share/mnist5k"] == 0.5 and s["steps"] == 4
    logged = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [m["step"] for m in logged if "test/accuracy/optdigits" in m] == [4]
