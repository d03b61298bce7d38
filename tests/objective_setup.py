"""The shared setup of the domain-adaptation objectives' tests (CDAN, MCC, MDD, self-training, BSS/DELTA):
a tiny CNN, a batch of source images and labels with unlabelled target images (and their strong views),
and the objective built from the default config with ``target='optdigits'``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax import config as config_lib
from tl_jax.models import get_model
from tl_jax.objectives import build_objective
from tl_jax.objectives.classification import cross_entropy
from tl_jax.params.param_rules import flatten_paths

TGT_PP = [{"op": "rescale", "in_max": 16.0}, {"op": "resize", "size": 14}]
R = np.random.default_rng(0)
BATCH = {"image": jnp.asarray(R.normal(size=(8, 8, 8, 1)), jnp.float32),
         "label": jnp.arange(8, dtype=jnp.int32) % 10,
         "target_image": jnp.asarray(R.normal(0.5, 1.5, size=(6, 8, 8, 1)), jnp.float32),
         "target_strong_image": jnp.asarray(R.normal(0.5, 2.0, size=(6, 8, 8, 1)), jnp.float32)}


def setup(name, data_dir=None, **group):
    config = config_lib.base_config()
    config.objective.name = name
    config.data.data_dir = data_dir
    config.train.steps = 100
    if "target" in config.objective[name]:
        config.objective[name].target = "optdigits"
        config.objective[name].target_pp = TGT_PP
    for k, v in group.items():
        config.objective[name][k] = v
    model = get_model("cnn", 10)
    obj = build_objective(config, model)
    params = model.init(jax.random.PRNGKey(0), BATCH["image"])["params"]
    extra, aux = obj.init_extra(jax.random.PRNGKey(1), params, {})
    return obj, {**params, **extra}, aux


def outputs(obj, params, images):
    return obj.model.apply({"params": {k: params[k] for k in ("backbone", "head")}}, images, return_features=True)


def setup_with_batch(name, data_dir=None, **group):
    """:func:`setup` with the labelled source batch and its unlabelled target images (DANN, CORAL, MMD)."""
    obj, params, _ = setup(name, data_dir, **group)
    return obj, params, {k: BATCH[k] for k in ("image", "label", "target_image")}


def grads_of(fn, params):
    """``jax.grad(fn)(params)`` keyed by param path."""
    return flatten_paths(jax.jit(jax.grad(fn))(params))


def ce_only(obj, params, batch):
    """The source cross-entropy alone (the objective's classification term)."""
    zs, *_ = obj.outputs(params, {}, batch, None)
    return cross_entropy(zs, batch["label"]).mean()

