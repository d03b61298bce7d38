"""Shared by the LoRA end-to-end tests: a LoRA run's logits next to those of its merged plain checkpoint."""
from __future__ import annotations

import jax
import numpy as np

from tl_jax import config as config_lib
from tl_jax.evaluation.saved_run import load
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.build import build_model_and_state


def lora_and_merged_logits(run_dir, merged_dir, n: int):
    """``(y_lora, y_plain, plain_params)``: the LoRA run's logits on ``n`` uniform images, and those of the model
    built without ``config.peft`` from ``merged_dir`` (``tl-jax weights merge``'s output) on the same images."""
    run = load(run_dir)
    x = np.random.default_rng(0).uniform(size=(n, *run.input_shapes["image"])).astype(np.float32)
    variables = {"params": run.objective.model_params(run.state.params), "batch_stats": run.state.batch_stats}
    y_lora = np.asarray(run.objective.model.apply(variables, x, train=False))
    plain = config_lib.from_dict(config_lib.to_dict(run.config))
    plain.peft.lora.rank, plain.init_from, plain.dont_load = 0, str(merged_dir), []
    mesh = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    objective, _, state = build_model_and_state(plain, run.num_classes, {"image": x[:1], "label": np.zeros(1)}, mesh)
    y_plain = np.asarray(objective.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                               train=False))
    return y_lora, y_plain, state.params
