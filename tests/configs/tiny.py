"""A tiny mnist5k run for end-to-end tests (14x14 inputs, a few steps)."""
from tl_jax import config as config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, steps=8, seed=0, model="cnn")
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = a.model
    if a.model != "cnn":
        c.model.kwargs = {"base_width": 4, "stem": "cifar"}
    c.data.name = "mnist5k"
    pp = [{"op": "rescale", "in_max": 255.0}, {"op": "resize", "size": 14}]
    c.data.train_pp = pp
    c.data.eval_pp = list(pp)
    c.data.batch_size = 16
    c.data.eval_batch_size = 200
    c.train.steps = a.steps
    c.train.log_every = 2
    c.train.eval_every = 4
    c.train.checkpoint_every = 4
    c.train.keep_checkpoints = 5
    c.train.progress = False
    return c
