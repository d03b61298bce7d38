"""Flax NNX models through the linen machinery (tl_jax/models/nnx/bridge.py), against their linen twins.

The NNX twins ``cnn_nnx`` / ``resnet18_nnx`` given the linen models' weights must compute the linen
logits, losses, gradients and BatchNorm statistics; the bridge's trees are linen's (same paths, no RNG
state); dropout is a pure function of the key; frozen norms, the real loop (frozen backbone,
``init_from`` a linen run, SIGKILL + resume) and 8-device sharding work as for linen models.
"""
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tl_jax import config as config_lib
from tl_jax.config import base_config
from tl_jax.models import CNN, ResNet18, accepted_kwargs, get_model
from tl_jax.models.nnx.cnn import CNNNNX
from tl_jax.models.nnx.bridge import NNXModel
from tl_jax.objectives import Objective
from tl_jax.train.checkpoint import load_variables
from tl_jax.params.param_rules import flatten_paths

TINY = "tests/configs/tiny.py"
TOL = dict(rtol=1e-5, atol=1e-5)


def batch(n=4, hw=16, c=3, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)}


def twins(kind, **kw):
    """(linen model, NNX model, linen variables) of one architecture with 5 classes."""
    if kind == "cnn":
        linen, nnx_model = CNN(5, **kw), get_model("cnn_nnx", 5, **kw)
    else:
        linen = ResNet18(num_classes=5, base_width=4, stem="cifar", **kw)
        nnx_model = get_model("resnet18_nnx", 5, base_width=4, stem="cifar", **kw)
    variables = linen.init(jax.random.PRNGKey(1), batch()["image"], train=False)
    if "batch_stats" in variables:  # non-trivial running statistics, so eval mode is tested too
        variables = {**variables, "batch_stats": jax.tree.map(
            lambda x: x + 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, variables["batch_stats"])}
    return linen, nnx_model, variables


def assert_trees_close(a, b, what):
    fa, fb = flatten_paths(a), flatten_paths(b)
    assert fa.keys() == fb.keys(), (what, sorted(set(fa) ^ set(fb)))
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=f"{what}: {k}", **TOL)


# -- the twins compute the linen functions -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_twin_with_linen_weights_gives_linen_logits_loss_grads_and_stats(kind):
    linen, nnx_model, variables = twins(kind)
    b = batch()
    nnx_vars = jax.jit(lambda r: nnx_model.init(r, b["image"], train=False))(jax.random.PRNGKey(0))
    # Same trees: paths, shapes, dtypes; no RNG state (RngKey/RngCount) among them.
    assert jax.tree.structure(nnx_vars) == jax.tree.structure(variables)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx_vars) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                               variables)
    stats = variables.get("batch_stats", {})
    for train in (False, True):
        out = {}
        for name, model in (("linen", linen), ("nnx", nnx_model)):
            loss_fn = Objective(base_config(), model).loss

            @jax.jit
            def run(params, stats, b=b, loss_fn=loss_fn, model=model):
                (loss, (new_stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    params, stats, {}, b, jax.random.PRNGKey(3), jnp.zeros((), jnp.int32))
                v = {"params": params, **({"batch_stats": stats} if stats else {})}
                logits = model.apply(v, b["image"], train=train, mutable=["batch_stats"] if train and stats else False)
                logits = logits[0] if train and stats else logits
                return loss, grads, new_stats, logits

            out[name] = run(variables["params"], stats)
        (l_loss, l_grads, l_stats, l_logits), (n_loss, n_grads, n_stats, n_logits) = out["linen"], out["nnx"]
        np.testing.assert_allclose(n_logits, l_logits, **TOL)
        np.testing.assert_allclose(n_loss, l_loss, **TOL)
        assert_trees_close(n_grads, l_grads, "grads")
        assert_trees_close(n_stats, l_stats, "batch_stats")  # train-mode BatchNorm updates
        if stats:
            assert not np.allclose(flatten_paths(n_stats)["backbone/bn1/mean"], stats["backbone"]["bn1"]["mean"])
    # Eval mode reads the running statistics: logits differ from train mode's batch statistics.
    if stats:
        ev, tr, l_ev = jax.jit(lambda v: (
            nnx_model.apply(v, b["image"], train=False),
            nnx_model.apply(v, b["image"], train=True, mutable=["batch_stats"])[0],
            linen.apply(v, b["image"], train=False)))(variables)
        assert not np.allclose(ev, tr, atol=1e-3)
        np.testing.assert_allclose(ev, l_ev, **TOL)


def test_return_features_embed_and_weights_round_trip_unchanged():
    linen, nnx_model, variables = twins("cnn")
    x = batch()["image"]
    logits, feats = nnx_model.apply(variables, x, return_features=True)
    l_logits, l_feats = linen.apply(variables, x, return_features=True)
    np.testing.assert_allclose(feats, l_feats, **TOL)
    np.testing.assert_allclose(logits, l_logits, **TOL)
    np.testing.assert_allclose(nnx_model.apply(variables, x, method="embed"), l_feats, **TOL)
    # NNX-initialised weights run in the linen model unchanged (same tree: no linen_to_nnx needed).
    nnx_vars = nnx_model.init(jax.random.PRNGKey(5), x)
    np.testing.assert_allclose(linen.apply(nnx_vars, x), nnx_model.apply(nnx_vars, x), **TOL)


def test_init_under_eval_shape_and_apply_before_any_init():
    linen, _, variables = twins("resnet")
    x = batch()["image"]
    fresh = get_model("resnet18_nnx", 5, base_width=4, stem="cifar")
    np.testing.assert_allclose(fresh.apply(variables, x), linen.apply(variables, x), **TOL)  # built from x's shape
    shapes = jax.eval_shape(lambda: get_model("resnet18_nnx", 5, base_width=4, stem="cifar").init(
        jax.random.PRNGKey(0), x, train=False))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
    assert fresh.norm_module_paths() == tuple(sorted(linen.norm_module_paths()))


# -- dropout, frozen norms ---------------------------------------------------------------------------------

def test_dropout_is_a_pure_function_of_the_key_and_off_in_eval():
    model = get_model("cnn_nnx", 5, dropout_rate=0.5)
    assert model.dropout_rate == 0.5
    x = batch()["image"]
    v = model.init(jax.random.PRNGKey(0), x)
    drop = lambda m, x: m.dropout(m.embed(x))  # noqa: E731 - the features after dropout
    run = jax.jit(lambda v, key, train: model.apply(v, x, train=train, rngs={"dropout": key}, method=drop),
                  static_argnums=2)
    k1, k2 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    feats = np.asarray(model.apply(v, x, method="embed"))
    a, a2, b = np.asarray(run(v, k1, True)), np.asarray(run(v, k1, True)), np.asarray(run(v, k2, True))
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)
    live = feats != 0
    kept = a[live] != 0
    np.testing.assert_allclose(a[live][kept], 2.0 * feats[live][kept], rtol=1e-6)  # inverted dropout: x / 0.5
    assert 0.35 < kept.mean() < 0.65, kept.mean()
    np.testing.assert_array_equal(np.asarray(run(v, k1, False)), feats)  # eval: no mask
    # The logits of train mode draw a mask; eval mode equals a model without dropout.
    t1 = model.apply(v, x, train=True, rngs={"dropout": k1})
    assert not np.allclose(t1, model.apply(v, x, train=False))
    np.testing.assert_allclose(model.apply(v, x), model.clone(dropout_rate=0.0).apply(v, x, train=True), **TOL)
    with pytest.raises(ValueError, match=r"apply\(train=True\) with dropout \(rate 0.5\) needs rngs"):
        model.apply(v, x, train=True)  # linen refuses too: masks from a constant key would repeat every step


def test_frozen_norms_via_clone_keep_their_stats_like_linen():
    linen, nnx_model, variables = twins("resnet")
    frozen = ("backbone/bn1", "backbone/layer1_0/bn2")
    linen, nnx_model = linen.clone(frozen_norms=frozen), nnx_model.clone(frozen_norms=frozen)
    x = batch()["image"]
    out, new = jax.jit(lambda v: nnx_model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    l_out, l_new = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, l_out, **TOL)
    assert_trees_close(new, l_new, "batch_stats")
    old, new = flatten_paths(variables["batch_stats"]), flatten_paths(new["batch_stats"])
    for path in old:
        same = np.array_equal(old[path], new[path])
        assert same == (path.rsplit("/", 1)[0] in frozen), path
    with pytest.raises(ValueError, match=r"unknown BatchNorm path\(s\) in frozen_norms: \['backbone/bn9'\]"):
        nnx_model.clone(frozen_norms=("backbone/bn9",))


# -- errors, registry ------------------------------------------------------------------------------------

class Wide(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 7, rngs=rngs)

    def __call__(self, x):
        return self.fc(x.mean(axis=(1, 2)))


class Cached(Wide):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 5, rngs=rngs)
        self.seen = nnx.Cache(jnp.zeros(()))


@pytest.mark.parametrize("build, message", [
    (lambda rngs: "a string", "build returned a str, not an nnx.Module"),
    (lambda rngs: Wide(rngs), r"must return float logits \[B, num_classes\] = \[4, 5\]; got shape \(4, 7\)"),
    (lambda rngs: Cached(rngs), "variable 'seen' is an nnx.Cache"),
])
def test_bad_models_are_one_line_errors(build, message):
    with pytest.raises(ValueError, match=message) as err:
        NNXModel(build, num_classes=5, name="mine").init(jax.random.PRNGKey(0), batch()["image"])
    assert "\n" not in str(err.value) and "model 'mine'" in str(err.value)


def test_registry_kwargs_and_params_that_do_not_fit():
    assert accepted_kwargs("cnn_nnx") == ["dropout_rate", "dtype", "width"]
    assert "base_width" in accepted_kwargs("resnet18_nnx") and "rngs" not in accepted_kwargs("resnet18_nnx")
    model = get_model("cnn_nnx", 5, width=2)
    assert isinstance(model, NNXModel) and model.num_classes == 5
    with pytest.raises(ValueError, match="unknown keyword argument"):
        get_model("cnn_nnx", 5, base_width=4)
    v = model.init(jax.random.PRNGKey(0), batch()["image"])
    assert v["params"]["backbone"]["fc"]["kernel"].shape == (16 * 128, 1024) and "batch_stats" not in v
    with pytest.raises(ValueError, match="do not fit the module built for inputs of shape"):
        get_model("cnn_nnx", 5).apply(v, batch()["image"])  # width 2's params in a width-1 model
    assert isinstance(nnx.eval_shape(lambda: CNNNNX(3, rngs=nnx.Rngs(0))), CNNNNX)


# -- the real loop -----------------------------------------------------------------------------------------

def tiny(data_dir, model="cnn_nnx", **overrides):
    c = config_lib.load_config(TINY)
    c.data.data_dir = data_dir
    c.model.name = model
    config_lib.apply_overrides(c, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return c


def train_metrics(workdir, key="train/loss"):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [m[key] for m in lines if key in m]


@pytest.mark.slow
def test_loop_frozen_backbone_init_from_linen_and_same_run_as_linen(tmp_path, tfds_data_dir):
    from tl_jax.train.loop import prepare_run, train

    src = str(tmp_path / "src")
    train(tiny(tfds_data_dir, "cnn"), src)
    src_params = flatten_paths(load_variables(src)["params"])
    # cnn_nnx from the linen run, backbone frozen, fresh head: the backbone never moves, holds no optimizer state.
    cfg = tiny(tfds_data_dir, init_from=src, dont_load=["head/.*"], param_rules=[["backbone/.*", None], [".*", 1.0]])
    cfg.train.steps = 12
    run = prepare_run(cfg, str(tmp_path / "frozen"))
    assert isinstance(run.objective.model, NNXModel)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.state.opt_state)[0]]
    assert opt_paths and not any("backbone" in p for p in opt_paths), opt_paths
    run.loop()
    tuned = flatten_paths(load_variables(str(tmp_path / "frozen"))["params"])
    for path in src_params:
        if path.startswith("backbone/"):
            np.testing.assert_array_equal(tuned[path], src_params[path], err_msg=path)
    assert not np.array_equal(tuned["head/kernel"], src_params["head/kernel"])
    losses = train_metrics(str(tmp_path / "frozen"))
    assert losses[-1] < losses[0], losses
    # Linen and NNX twins from the same weights: the same run (same batches, same updates).
    runs = {m: train(tiny(tfds_data_dir, m, init_from=src, dont_load=[]), str(tmp_path / m))
            for m in ("cnn", "cnn_nnx")}
    np.testing.assert_allclose(runs["cnn_nnx"]["test/loss"], runs["cnn"]["test/loss"], rtol=1e-4)
    np.testing.assert_allclose(train_metrics(str(tmp_path / "cnn_nnx")), train_metrics(str(tmp_path / "cnn")),
                               rtol=1e-4)
    a, b = (flatten_paths(load_variables(str(tmp_path / m))["params"]) for m in ("cnn", "cnn_nnx"))
    for path in a:
        np.testing.assert_allclose(b[path], a[path], rtol=1e-4, atol=1e-5, err_msg=path)


@pytest.mark.slow
def test_cnn_nnx_sigkill_resumes_bit_identically(tmp_path, tfds_data_dir):
    from test_reliability import assert_same_run, cli_args, run_cli

    extra = ("--config.model.name=cnn_nnx", "--config.train.steps=8", "--config.train.log_every=3",
             "--config.train.checkpoint_every=2")
    ref, wd = tmp_path / "ref", tmp_path / "killed"
    proc = run_cli(cli_args(ref, tfds_data_dir, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(cli_args(wd, tfds_data_dir, *extra), fault="kill_after_step=5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = run_cli(cli_args(wd, tfds_data_dir, *extra))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-2000:]
    assert_same_run(ref, wd)


EIGHT_DEVICES = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
import parallel_worker as w
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import compile_cache
from tl_jax.train.loop import build_model_and_state
compile_cache.enable()
assert jax.device_count() == 8
rng = np.random.default_rng(0)
batches = [{"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size=16).astype(np.int32)} for _ in range(4)]
one = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
out = {}
for name, linen in (("cnn_nnx", "cnn"), ("resnet18_nnx", "resnet18")):
    objs = {}
    for m in (name, linen):
        c = w.model_config(m)
        c.model.kwargs = {"base_width": 4, "stem": "cifar"} if "resnet" in m else {}
        objs[m] = build_model_and_state(c, 10, {"image": batches[0]["image"][:1]}, one)
    objective, tx, state = objs[name]
    host = jax.device_get(state)
    runs = {k: w.run_steps(objective, tx, host, s, batches) for k, s in w.strategies(name == "cnn_nnx").items()}
    ref, _ = runs["single"]
    lin, _ = w.run_steps(objs[linen][0], tx, host, w.strategies(False)["single"], batches)
    out[name] = {"moved": w.max_diff(ref["params"], host.params), "linen": w.max_diff(ref, lin),
                 **{k: w.max_diff(ref, tree) for k, (tree, _) in runs.items() if k != "single"}}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_jit_fsdp_and_pmap_of_nnx_models_match_one_device_and_linen(tmp_path):
    from test_parallel import _env, run_all

    [(rc, out)] = run_all([[sys.executable, "-c", EIGHT_DEVICES]], _env(8), 420, tmp_path / "logs")
    assert rc == 0, out[-4000:]
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    for name, diffs in res.items():
        assert diffs["moved"] > 1e-4, (name, diffs)  # the runs trained
        keys = {"jit8", "pmap8", "linen"} | ({"fsdp4x2"} if name == "cnn_nnx" else set())
        assert keys <= set(diffs), diffs
        for key in keys:
            assert diffs[key] < 1e-5, (name, key, diffs)
