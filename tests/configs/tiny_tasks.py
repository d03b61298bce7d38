"""A 6-point sweep over tests/configs/tiny.py for tests/test_sweep_tasks.py (a few steps per point).

``get_sweep("n=6,steps=4,phased=0")``: points ``t0..t{n-1}`` differ in seed and learning rate; with
``phased=1`` point t0 is phase 0 and the others phase 1.
"""
import pathlib

from tl_jax import config as config_lib
from tl_jax.sweep import zip_


TINY = pathlib.Path(__file__).with_name("tiny.py")


def get_config(arg=None):
    return config_lib.load_config(f"{TINY}:{arg}" if arg else str(TINY))


def get_sweep(arg=None):
    a = config_lib.parse_arg(arg, steps=4, n=6, phased=0)
    return zip_(**{"config.optimizer.learning_rate": [1e-3 * (1 + i) for i in range(a.n)]},
                seed=list(range(a.n)), steps=[a.steps] * a.n, _name=[f"t{i}" for i in range(a.n)],
                _phase=[0 if (i == 0 or not a.phased) else 1 for i in range(a.n)])
