"""Deep CORAL and multi-kernel MMD: losses vs NumPy; the objective is CE + w·term."""
import jax
import jax.numpy as jnp
import json
import numpy as np
import os
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.coral_mmd import coral_loss, mmd_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective


FS = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [1.0, 3.0]], np.float32)
FT = np.array([[1.0, 1.0], [3.0, -1.0], [0.0, 0.5]], np.float32)


def np_coral(fs, ft):
    fs, ft = fs.astype(np.float64), ft.astype(np.float64)
    cs, ct = np.cov(fs, rowvar=False), np.cov(ft, rowvar=False)     # unbiased (n − 1)
    return np.sum((cs - ct) ** 2) / (4 * fs.shape[1] ** 2)


def test_coral_matches_numpy():
    np.testing.assert_allclose(coral_loss(FS, FT), np_coral(FS, FT), rtol=1e-5)
    # hand value: fs = [[0],[2]] has var 2, ft = [[0],[1]] var 0.5 -> (1.5)² / 4
    np.testing.assert_allclose(coral_loss(np.array([[0.0], [2.0]]), np.array([[0.0], [1.0]])), 2.25 / 4)
    np.testing.assert_allclose(coral_loss(FS, FS + 5.0), 0.0, atol=1e-6)     # shift-invariant
    with pytest.raises(ValueError, match="ft"):
        coral_loss(FS, FT[:, :1])
    with pytest.raises(ValueError, match="fs"):
        coral_loss(FS[:1], FT)


def np_mmd(fs, ft, betas=None, mul=2.0, k=5):
    z = np.concatenate([fs, ft]).astype(np.float64)
    n, ns = len(z), len(fs)
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    if betas is None:
        base = d.sum() / (n * n - n)
        betas = [base * mul ** (i - k // 2) for i in range(k)]
    kern = sum(np.exp(-d / b) for b in betas)
    return kern[:ns, :ns].mean() + kern[ns:, ns:].mean() - 2 * kern[:ns, ns:].mean()


def test_mmd_matches_numpy():
    np.testing.assert_allclose(mmd_loss(FS, FT), np_mmd(FS, FT), rtol=1e-5)
    np.testing.assert_allclose(mmd_loss(FS, FT, kernel_mul=3.0, num_kernels=2), np_mmd(FS, FT, mul=3.0, k=2),
                               rtol=1e-5)
    np.testing.assert_allclose(mmd_loss(FS, FT, bandwidths=[1.0, 4.0]), np_mmd(FS, FT, betas=[1.0, 4.0]), rtol=1e-5)
    # hand value: one point each, distance² 4, β = 4: k_ss = k_tt = 1, k_st = e^{-1}
    np.testing.assert_allclose(mmd_loss(np.zeros((1, 1)), np.full((1, 1), 2.0), bandwidths=[4.0]),
                               2 - 2 * np.exp(-1.0), rtol=1e-6)


def test_mmd_identical_vs_shifted():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 3)))
    assert abs(float(mmd_loss(x, x))) < 1e-5
    assert float(mmd_loss(x, x + 2.0)) > 0.1
    assert abs(float(mmd_loss(np.ones((3, 2)), np.ones((2, 2))))) < 1e-6      # zero spread: no NaN
    g = jax.grad(lambda a: mmd_loss(a, x + 2.0))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bandwidths=[1.0, -1.0]), "bandwidths"),
    (dict(bandwidths=[]), "bandwidths"),
    (dict(kernel_mul=0.0), "kernel_mul"),
    (dict(num_kernels=0), "num_kernels"),
])
def test_mmd_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mmd_loss(FS, FT, **kwargs)


TGT_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]


def setup(name, data_dir=None, **group):
    config = config_lib.base_config()
    config.objective.name = name
    config.data.data_dir = data_dir
    config.train.steps = 100
    config.objective[name].target = "optdigits"
    config.objective[name].target_pp = TGT_PP
    for k, v in group.items():
        config.objective[name][k] = v
    model = get_model("cnn", 10)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
             "label": jnp.arange(8, dtype=jnp.int32) % 10,
             "target_image": jnp.asarray(rng.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32)}
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
    extra, _ = obj.init_extra(jax.random.PRNGKey(1), params, {})
    return obj, {**params, **extra}, batch


@pytest.mark.parametrize("name, layer", [("coral", "features"), ("mmd", "features"), ("mmd", "logits")])
def test_coral_mmd_loss_is_ce_plus_weighted_term(name, layer):
    obj, params, batch = setup(name, weight=3.0, layer=layer)
    loss, (_, metrics) = obj.loss(params, {}, {}, batch, None, 0)
    model = obj.model
    z, f = model.apply({"params": {k: params[k] for k in ("backbone", "head")}},
                       jnp.concatenate([batch["image"], batch["target_image"]]), return_features=True)
    f = f if layer == "features" else z
    term = coral_loss(f[:8], f[8:]) if name == "coral" else mmd_loss(f[:8], f[8:])
    ce = cross_entropy(z[:8], batch["label"]).mean()
    np.testing.assert_allclose(float(loss), float(ce + 3.0 * term), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"train/da/{name}"]), float(term), rtol=1e-5)
    assert float(metrics["train/ce"]) == pytest.approx(float(ce), rel=1e-5)


def metrics(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
