"""DANN: the domain-classification loss vs NumPy; the reversed discriminator gradient and the λ ramp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax import config as config_lib
from tl_jax.objectives.classification import cross_entropy
from tl_jax.objectives.dann import domain_adversarial_loss
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.params.param_rules import flatten_paths


def test_domain_adversarial_loss_matches_numpy():
    zs, zt = np.array([2.0, -1.0, 0.0], np.float32), np.array([[0.5], [-3.0]], np.float32)
    sig = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))
    want = 0.5 * (np.mean(-np.log(sig(zs))) + np.mean(-np.log(1 - sig(zt[:, 0]))))
    np.testing.assert_allclose(domain_adversarial_loss(zs, zt), want, rtol=1e-6)
    np.testing.assert_allclose(domain_adversarial_loss(jnp.zeros(2), jnp.zeros(5)), np.log(2.0), rtol=1e-6)
    assert np.isfinite(float(domain_adversarial_loss(jnp.array([-1e4]), jnp.array([1e4]))))
    with pytest.raises(ValueError, match="domain_logits_target"):
        domain_adversarial_loss(zs, np.zeros((2, 2)))


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


def grads_of(fn, params):
    return flatten_paths(jax.jit(jax.grad(fn))(params))


def ce_only(obj, params, batch):
    zs, *_ = obj.outputs(params, {}, batch, None)
    return cross_entropy(zs, batch["label"]).mean()


def test_grl_flips_the_discriminator_gradient_into_the_backbone():
    obj, params, batch = setup("dann", weight=0.7)
    step = 30
    lam = float(obj.lam(step))
    assert 0.9 < lam < 1.0

    def plain_domain_loss(p):  # the same discriminator loss WITHOUT gradient reversal
        _, fs, _, ft, _, _ = obj.outputs(p, {}, batch, None)
        d = obj.discriminator.apply({"params": p["discriminator"]}, jnp.concatenate([fs, ft]))
        return domain_adversarial_loss(d[:8], d[8:])

    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, step)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    dom = grads_of(plain_domain_loss, params)
    for path in total:
        if path.startswith("discriminator/"):  # the discriminator minimises w·L_d
            want = 0.7 * dom[path]
        else:  # the backbone gets −λ·w·∂L_d (the head sees only CE)
            want = ce[path] - lam * 0.7 * dom[path]
        np.testing.assert_allclose(total[path], want, rtol=2e-4, atol=1e-6, err_msg=path)
    assert np.abs(dom["backbone/fc/kernel"]).max() > 0


def test_dann_lambda_ramp_zero_at_start_removes_the_backbone_term():
    obj, params, batch = setup("dann")
    assert float(obj.lam(0)) == 0.0 and float(obj.lam(100)) > 0.999
    total = grads_of(lambda p: obj.loss(p, {}, {}, batch, None, 0)[0], params)
    ce = grads_of(lambda p: ce_only(obj, p, batch), params)
    for path in ce:
        if not path.startswith("discriminator/"):
            np.testing.assert_allclose(total[path], ce[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.abs(total["discriminator/out/kernel"]).max() > 0  # the discriminator still learns
