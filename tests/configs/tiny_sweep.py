"""Sweeps over tests/configs/tiny.py for tests/test_sweep.py (a few steps per point)."""
import pathlib

from tl_jax import config as config_lib
from tl_jax.sweep import zip_

LRS = [1e-3, 3e-3, 2e-3]
L2 = [1e-4, 1e-3, 3e-4]
RULES = [[["backbone/conv1/.*", None], ["backbone/.*", m], [".*", 1.0]] for m in (0.5, 0.1, 2.0)]  # conv1 frozen


TINY = pathlib.Path(__file__).with_name("tiny.py")


def get_config(arg=None):
    return config_lib.load_config(f"{TINY}:{arg}" if arg else str(TINY))


def get_sweep(arg=None):
    """``n`` points differing in learning rate, L2 weight, backbone lr multiplier and seed (conv1 frozen)."""
    a = config_lib.parse_arg(arg, steps=4, n=2)
    return zip_(**{"config.optimizer.learning_rate": LRS[:a.n], "config.loss.l2": L2[:a.n],
                   "config.param_rules": RULES[:a.n]}, seed=list(range(a.n)), steps=[a.steps] * a.n,
                _name=[f"p{i}" for i in range(a.n)])
