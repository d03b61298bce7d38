"""DANN: the domain-classification loss vs NumPy; the reversed discriminator gradient and the λ ramp."""
import jax.numpy as jnp
import numpy as np
import pytest

from objective_setup import ce_only, grads_of
from objective_setup import setup_with_batch as setup
from tl_jax.objectives.dann import domain_adversarial_loss


def test_domain_adversarial_loss_matches_numpy():
    zs, zt = np.array([2.0, -1.0, 0.0], np.float32), np.array([[0.5], [-3.0]], np.float32)
    sig = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))
    want = 0.5 * (np.mean(-np.log(sig(zs))) + np.mean(-np.log(1 - sig(zt[:, 0]))))
    np.testing.assert_allclose(domain_adversarial_loss(zs, zt), want, rtol=1e-6)
    np.testing.assert_allclose(domain_adversarial_loss(jnp.zeros(2), jnp.zeros(5)), np.log(2.0), rtol=1e-6)
    assert np.isfinite(float(domain_adversarial_loss(jnp.array([-1e4]), jnp.array([1e4]))))
    with pytest.raises(ValueError, match="domain_logits_target"):
        domain_adversarial_loss(zs, np.zeros((2, 2)))


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
