"""Warnings about a run's settings print once per process; eval/predict keep the param-groups table quiet."""
from __future__ import annotations

import logging

import jax
import numpy as np

from tl_jax import config as config_lib
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.setup import warn_small_train_set
from tl_jax.util import log_once


def _messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def test_same_text_once_other_text_again(caplog):
    log = logging.getLogger("tl_jax")
    with caplog.at_level(logging.WARNING, logger="tl_jax"):
        assert log_once.warn_once(log, "x=%d is odd", 3)
        assert not log_once.warn_once(log, "x=%d is odd", 3)
        assert log_once.warn_once(log, "x=%d is odd", 5)  # other numbers: new information
    assert _messages(caplog, "is odd") == ["x=3 is odd (shown once per process)", "x=5 is odd (shown once per process)"]
    log_once.reset()
    with caplog.at_level(logging.WARNING, logger="tl_jax"):
        assert log_once.warn_once(log, "x=%d is odd", 3)


def test_small_train_set_warning_once_per_process(caplog):
    """The demo's 12 one-shot runs (batch 32, 10 examples) warn once; a 2-shot setting warns once more."""
    with caplog.at_level(logging.WARNING, logger="tl_jax"):
        for _ in range(12):
            warn_small_train_set(32, 10)
        warn_small_train_set(32, 20)
        warn_small_train_set(32, 320)  # no warning: a batch fits in the set
    found = _messages(caplog, "exceeds the")
    assert len(found) == 2, found
    assert found[0].startswith("config.data.batch_size=32 exceeds the 10 training examples")
    assert "exceeds the 20 training examples" in found[1]


def test_param_groups_table_level(caplog):
    """Training logs the param-groups table at INFO; ``groups_log_level=DEBUG`` (eval, predict) hides it."""
    c = config_lib.base_config()
    c.model.name = "cnn"
    sample = {"image": np.zeros((1, 14, 14, 1), np.float32), "label": np.zeros((1,), np.int32)}
    mesh = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        build_model_and_state(c, 10, sample, mesh)
    assert len(_messages(caplog, "param groups (config.param_rules)")) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tl_jax"):
        build_model_and_state(c, 10, sample, mesh, groups_log_level=logging.DEBUG)
    assert not _messages(caplog, "param groups")
