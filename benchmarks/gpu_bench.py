"""Goal 7, GPU: ResNet-50 at 224x224 in bfloat16, train-step time and model FLOP utilisation (MFU).

Runs only where ``jax.default_backend()`` is ``'gpu'`` (e.g. the ``device``
tool's H100); elsewhere it returns ``{"skipped": reason}``. The step is tl_jax's
own (``make_train_step`` of the classification objective, SGD + momentum,
``ResNet50(dtype=bfloat16)``, params float32), on synthetic data already on the
device. Model FLOPs per step come from XLA's cost analysis of the compiled
step (falling back to the textbook 3 x 4.1 GMAC x 2 per image); MFU is
``flops / step_time / peak`` with the dense bf16 peak of the device kind.
Run it alone with ``python -m benchmarks.gpu_bench --worker``.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import emit, run_worker

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by substring of jax's device_kind.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
TEXTBOOK_FLOPS_PER_IMAGE = 3 * 2 * 4.1e9  # forward 4.1 GMAC; backward ~2x forward


def worker(batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    if jax.default_backend() != "gpu":
        return {"skipped": f"no GPU (jax.default_backend() == {jax.default_backend()!r})"}
    from tl_jax import config as config_lib
    from tl_jax.models import get_model
    from tl_jax.objectives import Objective
    from tl_jax.train.state import TrainState
    from tl_jax.train.step import make_train_step

    model = get_model("resnet50", 1000, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    batch_data = {"image": jnp.asarray(rng.standard_normal((batch, 224, 224, 3), np.float32)),
                  "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)}
    variables = jax.jit(lambda r: model.init(r, batch_data["image"][:1], train=False))(jax.random.PRNGKey(0))
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
                       rng=jax.random.PRNGKey(1), skipped=jnp.zeros((), jnp.int32), aux={})
    objective = Objective(config_lib.base_config(), model)
    compiled = jax.jit(make_train_step(objective.loss, tx), donate_argnums=0).lower(state, batch_data).compile()
    flops, source = None, "xla cost analysis"
    try:
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        flops = float(analysis.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001  (cost analysis is best-effort)
        flops = None
    if flops is None:
        flops, source = TEXTBOOK_FLOPS_PER_IMAGE * batch, "textbook 24.6 GFLOP/image"
    for _ in range(3):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    kind = jax.devices()[0].device_kind
    peak = next((p for k, p in PEAK_BF16.items() if k in kind), None)
    return {"device": kind, "batch": batch, "step_ms": 1000 * step_s, "images_per_s": batch / step_s,
            "flops_per_step": flops, "flops_source": source, "achieved_tflops": flops / step_s / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops / step_s / peak if peak else None}


def run(quick: bool = False, platforms: str | None = None) -> dict:
    """The worker in a process with ``JAX_PLATFORMS=platforms`` (None: jax picks, a GPU if there is one)."""
    if platforms == "cpu":
        return {"skipped": "JAX_PLATFORMS=cpu"}
    return run_worker("benchmarks.gpu_bench", ["--worker", "--steps", "10" if quick else "30"],
                      env={"JAX_PLATFORMS": platforms}, timeout=900)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    if args.worker:
        emit(worker(args.batch, args.steps))
    else:
        print(run())


if __name__ == "__main__":
    main()
