"""Goal 6, memory: optimizer-state bytes of a linear probe vs full fine-tuning, and the demo's peak RSS.

Optimizer state is counted from ``jax.eval_shape(tx.init, params)`` of the
optimizer ``tl_jax.params.build_optimizer`` builds (Adam; frozen params get
``set_to_zero`` and hold no state). The peak RSS is ``ru_maxrss`` of a child
process running the demo study (``experiments/mnist_to_digits.py``: source
pretraining, then the target points) with fewer points than ``make demo``.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT

PROBE = [["backbone/.*", None], [".*", 1.0]]
FINETUNE = [[".*", 1.0]]
SWEEP = "shots=10,seeds=1,methods=linear_probe;finetune"


def optimizer_bytes(model_name: str, shape: tuple[int, int, int], **kwargs) -> dict:
    """Bytes of params and of Adam's state for the probe and the full fine-tune rules."""
    import jax
    import jax.numpy as jnp
    import optax

    from tl_jax.models import get_model
    from tl_jax.params import param_rules as rules_lib

    model = get_model(model_name, 10, **kwargs)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
    params = variables["params"]

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    out = {"params": nbytes(params)}
    for name, rules in (("finetune", FINETUNE), ("linear_probe", PROBE)):
        tx = rules_lib.build_optimizer(params, rules, lambda m: optax.adam(1e-3 * m))
        out[name] = nbytes(jax.eval_shape(tx.init, params))
    out["ratio"] = out["linear_probe"] / out["finetune"]
    return out


_WRAPPER = """
import resource, subprocess, sys, json, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "s": time.perf_counter() - t0, "err": proc.stderr[-800:]}))
"""


def demo_peak_rss(data_dir: str) -> dict:
    """Peak RSS (MiB) of the demo study with the points of :data:`SWEEP`, in a child process."""
    workdir = tempfile.mkdtemp(prefix="tl_jax_bench_demo_")
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, str(ROOT / "experiments" / "mnist_to_digits.py"),
           "--workdir", workdir, "--sweep", SWEEP]
    env = {**__import__("os").environ, "TFDS_DATA_DIR": data_dir, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        return {"error": res["err"]}
    points = len(list(pathlib.Path(workdir).glob("*/summary.json")))
    return {"peak_rss_mib": res["maxrss_kib"] / 1024, "seconds": res["s"], "sweep": SWEEP, "runs": points}


def run(data_dir: str, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    out = {"cnn_28x28x1": optimizer_bytes("cnn", (28, 28, 1)),
           "resnet50_224x224x3": optimizer_bytes("resnet50", (224, 224, 3))}
    out["demo"] = demo_peak_rss(data_dir)
    out["seconds"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], quick=True), indent=1))
