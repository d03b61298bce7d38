"""A learning-rate search over tests/configs/tiny.py for tests/test_search.py.

``get_search("metric=val/accuracy,key=config.optimizer.learning_rate")``: the key and metric can be
changed to test the refusals.
"""
import pathlib

from tl_jax import config as config_lib
from tl_jax.sweep.search import loguniform


TINY = pathlib.Path(__file__).with_name("tiny.py")


def get_config(arg=None):
    return config_lib.load_config(f"{TINY}:{arg}" if arg else str(TINY))


def get_search(arg=None):
    a = config_lib.parse_arg(arg, metric="val/accuracy", key="config.optimizer.learning_rate", steps=4)
    return {"space": {a.key: loguniform(1e-4, 1e-1)}, "metric": a.metric, "direction": "maximize",
            "fixed": {"steps": a.steps}, "startup_trials": 2}
