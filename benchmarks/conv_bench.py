"""Goal 2, the CPU convolution gap: the demo CNN's train step, JAX variants vs PyTorch eager.

The CNN is conv3x3(32)-relu-pool2-conv3x3(64)-relu-pool2-dense512-dense10 with
SGD + momentum at batch 128 on 32x32x3 and 28x28x1. XLA flags are read when
jax starts, so each flag set runs in its own worker process
(``python -m benchmarks.conv_bench --worker``), which also times PyTorch eager
interleaved with it: every JAX figure is reported as *torch time / JAX time*
measured in the same process (> 1: JAX is faster). Workers start with
``XLA_FLAGS`` unset, so tl_jax's own XLA:CPU defaults apply unless a flag set
says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks.common import emit, interleaved, run_worker

SHAPES = {"32x32x3": (32, 3), "28x28x1": (28, 1)}
# Variants of the JAX step (functional re-implementations of the CNN, same params and maths).
VARIANTS = {
    "tl_jax": "tl_jax's CNN + make_train_step as shipped (conv1 im2col + max_pool_2x2)",
    "reduce_window_pool": "nn.max_pool (reduce_window; select_and_scatter grads): tl_jax before",
    "pool2x2": "max_pool_2x2 (reshape-max, first-max custom JVP; bit-identical grads)",
    "nchw": "NCHW layout (lax.conv NCHW/OIHW) + reduce_window pool",
    "im2col_conv1": "pool2x2 + conv1 as im2col matmul (9*C columns): tl_jax's CNN, minimal step",
    "im2col_all": "pool2x2 + both convs as im2col matmuls",
    "bf16": "pool2x2 + bfloat16 compute (params f32)",
    "matmul_precision_bf16": "pool2x2 + jax_default_matmul_precision='bfloat16'",
    "torch_channels_last": "PyTorch eager, channels_last memory format",
}
# label -> environment of the worker. tl_jax's import adds its XLA:CPU defaults (tl_jax/util/xla_flags.py: YNNPACK
# fusions off) unless XLA_FLAGS names the flag or TL_JAX_XLA_CPU_DEFAULTS=0; every other set is on top of them.
FLAG_SETS = {
    "jaxlib default (YNNPACK fusions on)": {"TL_JAX_XLA_CPU_DEFAULTS": "0"},
    "XNNPACK on": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
    "oneDNN on": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    "oneDNN custom call": {"XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=true"},
    "Eigen single-thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "thunk runtime off": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
    "fast math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "2 CPU devices, batch sharded": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
}


def _jax_variant(name: str, hw: int, c: int, batch: int):
    """``(step_fn, sync)`` for one JAX variant: ``step_fn()`` runs one train step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax import lax

    from tl_jax.models.pooling import max_pool_2x2

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, hw, hw, c), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch))
    tx = optax.sgd(0.01, momentum=0.9)
    if name == "tl_jax":
        return _tl_jax_step(hw, c, x, y, tx)
    layout = "NCHW" if name == "nchw" else "NHWC"
    dtype = jnp.bfloat16 if name == "bf16" else jnp.float32
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    flat = (hw // 4) ** 2 * 64
    params = {"c1": jax.random.normal(k[0], (3, 3, c, 32)) * 0.1, "b1": jnp.zeros(32),
              "c2": jax.random.normal(k[1], (3, 3, 32, 64)) * 0.05, "b2": jnp.zeros(64),
              "fc": jax.random.normal(k[2], (flat, 512)) * 0.01, "bf": jnp.zeros(512),
              "hd": jax.random.normal(k[3], (512, 10)) * 0.05, "bh": jnp.zeros(10)}

    def conv(h, w, first):
        if name == "im2col_all" or (name == "im2col_conv1" and first):
            b, hh, ww, cin = h.shape
            hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
            cols = jnp.concatenate([hp[:, i:i + hh, j:j + ww, :] for i in range(3) for j in range(3)], axis=-1)
            return (cols.reshape(-1, 9 * cin) @ w.reshape(9 * cin, -1)).reshape(b, hh, ww, -1)
        if layout == "NCHW":
            return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))
        return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def pool(h):
        if name in ("reduce_window_pool", "nchw"):
            window = (1, 1, 2, 2) if layout == "NCHW" else (1, 2, 2, 1)
            return lax.reduce_window(h, -jnp.inf, lax.max, window, window, "VALID")
        return max_pool_2x2(h)

    def forward(p, h):
        h = h.astype(dtype)
        for w, b, first in ((p["c1"], p["b1"], True), (p["c2"], p["b2"], False)):
            h = conv(h, w.astype(dtype), first)
            bias = b.astype(dtype)
            h = pool(jax.nn.relu(h + (bias[:, None, None] if layout == "NCHW" else bias)))
        if layout == "NCHW":
            h = h.transpose(0, 2, 3, 1)
        h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["fc"].astype(dtype) + p["bf"].astype(dtype))
        return (h @ p["hd"].astype(dtype) + p["bh"].astype(dtype)).astype(jnp.float32)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()

    def step(p, o, xb, yb):
        value, grads = jax.value_and_grad(loss)(p, xb, yb)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    xin = x.transpose(0, 3, 1, 2) if layout == "NCHW" else x
    if name == "matmul_precision_bf16":
        with jax.default_matmul_precision("bfloat16"):
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), xin, y).compile()
    else:
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), xin, y).compile()
    state = [params, tx.init(params)]

    def run():
        state[0], state[1], value = compiled(state[0], state[1], xin, y)
        return value

    return run


def _tl_jax_step(hw: int, c: int, x: Any, y: Any, tx: Any):
    """tl_jax's own model, objective and train step (metrics included, the gradient norm every 50 steps as the
    loop logs it), SGD momentum. With several devices (a flag set), the batch is sharded over all of them
    (data-parallel jit, state replicated), as ``tl_jax.parallel`` runs it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tl_jax import config as config_lib
    from tl_jax.models import get_model
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step

    model = get_model("cnn", 10)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    objective = Objective(config_lib.base_config(), model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32), aux={})
    batch = {"image": x, "label": y}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state, repl)
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    step = make_train_step(objective.loss, tx, grad_norm=False)  # the loop's program of the unlogged steps
    compiled = jax.jit(step, donate_argnums=0, out_shardings=(repl, repl)).lower(state, batch).compile()
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batch)
        return metrics["train/loss"]

    return run


def _torch_step(hw: int, c: int, batch: int, channels_last: bool):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(c, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
            self.fc, self.head = nn.Linear((hw // 4) ** 2 * 64, 512), nn.Linear(512, 10)

        def forward(self, h):
            h = F.max_pool2d(F.relu(self.c1(h)), 2)
            h = F.max_pool2d(F.relu(self.c2(h)), 2)
            return self.head(F.relu(self.fc(h.flatten(1))))

    net = Net()
    x, y = torch.rand(batch, c, hw, hw), torch.randint(0, 10, (batch,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


def worker(variants: list[str], shapes: list[str], batches: list[int], rounds: int) -> dict:
    """Times every (shape, batch, variant) against PyTorch eager in this process."""
    import tl_jax  # noqa: F401  (its XLA:CPU defaults go into XLA_FLAGS before jax starts a backend)
    import jax

    try:
        import torch

        torch_ok = True
    except ImportError:
        torch_ok = False
    out: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "torch": torch_ok, "ms": {}}
    for shape in shapes:
        hw, c = SHAPES[shape]
        for batch in batches:
            fns = {}
            for v in variants:
                if v == "torch_channels_last":
                    if torch_ok:
                        fns[v] = _torch_step(hw, c, batch, channels_last=True)
                    continue
                try:
                    fns[v] = _jax_variant(v, hw, c, batch)
                except Exception as e:  # noqa: BLE001  (a flag or variant this jaxlib rejects)
                    out.setdefault("errors", {})[v] = f"{type(e).__name__}: {str(e)[:200]}"
            if torch_ok:
                fns["torch"] = _torch_step(hw, c, batch, channels_last=False)

            def sync(r):
                return r.item() if hasattr(r, "item") and not isinstance(r, jax.Array) else jax.block_until_ready(r)

            times = interleaved(fns, rounds=rounds, reps=3, sync=sync, settle_s=0.2)
            out["ms"][f"{shape}/b{batch}"] = {k: 1000 * t for k, t in times.items()}
    return out


def run(quick: bool = False) -> dict:
    """All conv figures: variants at default flags, flag sets, batch sizes (each a worker process)."""
    rounds = "2" if quick else "3"
    res: dict[str, Any] = {}
    res["variants"] = run_worker("benchmarks.conv_bench", ["--worker", "--variants", ",".join(VARIANTS),
                                                           "--shapes", ",".join(SHAPES), "--batches", "128",
                                                           "--rounds", rounds])
    res["flags"] = {}
    for label, env in FLAG_SETS.items():
        res["flags"][label] = run_worker("benchmarks.conv_bench", ["--worker", "--variants", "tl_jax", "--shapes",
                                                                   ",".join(SHAPES), "--batches", "128", "--rounds",
                                                                   rounds], env={"XLA_FLAGS": None, **env})
    res["batch"] = run_worker("benchmarks.conv_bench", ["--worker", "--variants", "tl_jax", "--shapes", "32x32x3",
                                                        "--batches", "32,64,256", "--rounds", rounds])
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--variants", default="tl_jax")
    p.add_argument("--shapes", default="32x32x3")
    p.add_argument("--batches", default="128")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        emit(worker(args.variants.split(","), args.shapes.split(","), [int(b) for b in args.batches.split(",")],
                    args.rounds))
    else:
        print(json.dumps(run(), indent=1))


if __name__ == "__main__":
    main()
