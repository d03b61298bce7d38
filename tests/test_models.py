"""Tests for tl_jax.models: shapes, param trees/counts, dropout, frozen norms, dtype."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tl_jax.models import (
    CNN,
    MODELS,
    ResNet,
    ResNet18,
    ResNet50,
    cnn_param_count,
    get_model,
    has_batch_stats,
    norm_paths,
)

KEY = jax.random.key(0)


def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def tiny_resnet(**kw) -> ResNet:
    """A 2-stage ResNet with one BasicBlock per stage (fast on CPU)."""
    return ResNet(num_classes=3, stage_sizes=(1, 1), base_width=4, stem="cifar", **kw)


def images(shape=(2, 16, 16, 3), seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    "make, d",
    [
        (lambda: CNN(num_classes=5, width=1), 512),
        (lambda: ResNet18(num_classes=5, base_width=8, stem="cifar"), 64),
        (lambda: ResNet50(num_classes=5, base_width=8, stem="cifar"), 256),
    ],
    ids=["cnn", "resnet18", "resnet50"],
)
def test_output_shapes_and_tree(make, d):
    model = make()
    x = images()
    variables = jax.jit(model.init)(KEY, x)
    assert set(variables["params"]) == {"backbone", "head"}
    assert variables["params"]["head"]["kernel"].shape == (d, 5)
    is_resnet = isinstance(model, ResNet)
    # ResNets run in train mode (batch stats), covering both block types' BN updates
    fwd = functools.partial(
        model.apply, return_features=True, train=is_resnet,
        mutable=["batch_stats"] if is_resnet else False,
    )
    out = jax.jit(fwd)(variables, x)
    logits, feats = out[0] if is_resnet else out
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert feats.shape == (2, d) and feats.dtype == jnp.float32
    assert has_batch_stats(variables) == is_resnet
    if is_resnet:
        assert set(norm_paths(out[1])) == set(model.norm_module_paths())


def test_imagenet_stem_shapes():
    model = ResNet(num_classes=2, stage_sizes=(1, 1), base_width=4)
    x = images((1, 32, 32, 3))
    variables = jax.jit(model.init)(KEY, x)
    assert jax.jit(model.apply)(variables, x).shape == (1, 2)
    assert variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 4)


@pytest.mark.parametrize(
    "factory, expected", [(ResNet18, 11_689_512), (ResNet50, 25_557_032)]
)
def test_resnet_param_count_matches_torchvision(factory, expected):
    model = factory(num_classes=1000)
    shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)))
    assert n_params(shapes["params"]) == expected
    assert set(norm_paths(shapes["batch_stats"])) == set(model.norm_module_paths())


def test_resnet50_torchvision_names():
    model = ResNet50(num_classes=10, base_width=64)
    shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
    bb = shapes["params"]["backbone"]
    assert {"conv1", "bn1", "layer1_0", "layer4_2"} <= set(bb)
    assert set(bb["layer1_0"]) == {
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn",
    }
    assert "downsample_conv" not in bb["layer1_1"]
    # v1.5: stride lives on the 3x3 conv of a bottleneck
    assert bb["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert "bias" not in bb["layer1_0"]["conv1"]


def test_cnn_param_count_formula():
    for width in (1, 2):
        model = CNN(num_classes=10, width=width)
        shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 28, 28, 1)))
        assert n_params(shapes["params"]) == cnn_param_count(10, 28, 28, 1, width)
        assert set(shapes["params"]["backbone"]) == {"conv1", "conv2", "fc"}
    # 28x28x1, width 1: 320 + 18496 + 3136*512+512 + 5130
    assert cnn_param_count(10, 28, 28, 1) == 320 + 18_496 + 1_606_144 + 5_130


def test_dropout_only_in_train_mode():
    model = CNN(num_classes=4, dropout_rate=0.5)
    x = images((4, 8, 8, 1))
    variables = model.init(KEY, x)
    eval1 = model.apply(variables, x)
    eval2 = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    t1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(t1, eval1) and not np.allclose(t1, t2)
    with pytest.raises(Exception):  # train mode without a dropout rng
        model.apply(variables, x, train=True)
    # rate 0 never needs an rng
    plain = CNN(num_classes=4)
    np.testing.assert_array_equal(
        plain.apply(variables, x, train=True), plain.apply(variables, x)
    )


def test_features_and_embed_consistent_with_logits():
    model = tiny_resnet()
    x = images()
    variables = model.init(KEY, x)
    logits, feats = model.apply(variables, x, return_features=True)
    emb = model.apply(variables, x, method=model.embed)
    np.testing.assert_allclose(emb, feats, rtol=1e-6, atol=1e-6)
    head = variables["params"]["head"]
    assert set(head) == {"kernel", "bias"}
    np.testing.assert_allclose(
        logits, feats @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


def test_frozen_norms_all_frozen_keeps_stats():
    base = tiny_resnet()
    x = images(seed=3) * 3.0 + 1.0
    variables = base.init(KEY, x)
    paths = norm_paths(variables["batch_stats"])
    assert paths[0] == "backbone/bn1" and "backbone/layer2_0/downsample_bn" in paths
    assert set(paths) == set(base.norm_module_paths())

    frozen = tiny_resnet(frozen_norms=tuple(paths))
    out, new_vars = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, new_vars["batch_stats"], variables["batch_stats"])
    np.testing.assert_allclose(out, frozen.apply(variables, x), rtol=1e-6, atol=1e-6)

    out_free, free_vars = base.apply(variables, x, train=True, mutable=["batch_stats"])
    bs, new_bs = variables["batch_stats"], free_vars["batch_stats"]
    for p in paths:
        old, new = bs, new_bs
        for k in p.split("/"):
            old, new = old[k], new[k]
        assert not np.allclose(old["mean"], new["mean"]), p
    assert not np.allclose(out_free, out)


def test_frozen_norms_partial():
    model = tiny_resnet(frozen_norms=("backbone/bn1", "backbone/layer1_0/bn2"))
    x = images(seed=4)
    variables = model.init(KEY, x)
    _, new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"]["backbone"], new_vars["batch_stats"]["backbone"]
    np.testing.assert_array_equal(old["bn1"]["mean"], new["bn1"]["mean"])
    np.testing.assert_array_equal(old["layer1_0"]["bn2"]["var"], new["layer1_0"]["bn2"]["var"])
    assert not np.allclose(old["layer1_0"]["bn1"]["mean"], new["layer1_0"]["bn1"]["mean"])


def test_unknown_frozen_norm_raises():
    x = images()
    with pytest.raises(ValueError, match="backbone/bn9"):
        tiny_resnet(frozen_norms=("backbone/bn9",)).init(KEY, x)
    with pytest.raises(ValueError, match="no BatchNorm"):
        CNN(num_classes=2, frozen_norms=("backbone/bn1",)).init(KEY, x)


def test_bf16_dtype():
    model = tiny_resnet(dtype=jnp.bfloat16)
    x = images()
    variables = model.init(KEY, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    (logits, feats), state = model.apply(
        variables, x, return_features=True, capture_intermediates=True,
        mutable=["intermediates"],
    )
    # logits and features are returned in float32 ...
    assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
    # ... but are computed in bfloat16
    inter = state["intermediates"]
    assert inter["head"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["backbone"]["__call__"][0].dtype == jnp.bfloat16
    ref = tiny_resnet().apply(variables, x)
    np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.1)


def test_get_model_registry_and_errors():
    assert {"cnn", "resnet18", "resnet50", "vit", "bert"} <= set(MODELS)
    model = get_model("resnet18", 7, base_width=8, stem="cifar", frozen_norms=["backbone/bn1"])
    assert isinstance(model, ResNet) and model.num_classes == 7
    assert model.stage_sizes == (2, 2, 2, 2) and model.frozen_norms == ("backbone/bn1",)
    assert get_model("cnn", 3, width=4).width == 4
    with pytest.raises(ValueError, match=r"config\.model\.name.*resnet18"):
        get_model("vgg", 10)
    with pytest.raises(ValueError, match=r"base_width.*accepted.*width"):
        get_model("cnn", 10, base_width=8)
    with pytest.raises(ValueError, match="stage_sizes"):
        get_model("resnet50", 10, stage_sizes=(1,))


def test_norm_paths_helper():
    tree = {"backbone": {"bn1": {"mean": 0, "var": 1}, "l": {"bn": {"mean": 0, "var": 1}}}}
    assert norm_paths(tree) == ["backbone/bn1", "backbone/l/bn"]
    assert norm_paths({"batch_stats": tree}) == ["backbone/bn1", "backbone/l/bn"]
    assert not has_batch_stats({"params": {}})
