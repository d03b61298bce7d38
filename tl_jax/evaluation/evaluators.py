"""Periodic evaluators of ``config.evals``: few-shot ridge regression on the model's frozen features.

big_vision's idea for judging a pretraining run while it trains: every
``every`` steps (and at the last step), the CURRENT model's features of a
dataset's examples (``layer``: ``'features'``, the backbone output the head
reads, or a linen submodule path; eval mode) are fitted by closed-form ridge
regression for every ``shots`` × ``seeds`` × L2 value
(:func:`tl_jax.evaluation.fewshot_ridge.fewshot_eval`: the L2 value picked on a
held-out part of the dataset's train split, the accuracy read on its test
split), and the mean accuracy over seeds is logged as
``fewshot/<name>/<k>shot`` in ``metrics.jsonl`` (and the trackers), next to the
run's own evals; the last step's values also go into ``summary.json``.

One entry of ``config.evals`` (keys not given take the defaults of
:data:`DEFAULTS`)::

    {"kind": "fewshot", "name": "digits", "every": 200, "dataset": "optdigits",
     "eval_pp": [...],          # null: config.data.eval_pp (the dataset must fit the model's input)
     "shots": [1, 5, 10, 25], "seeds": 3, "layer": "features"}

The dataset's splits are read and preprocessed once, when the run is built
(``eval_pp`` must be deterministic); each evaluation is one jitted forward over
them in ``batch_size`` chunks plus the ridge fits (milliseconds each, numpy).
The evaluation reads the weights only: training, its random streams and its
checkpoints are the same with or without evaluators, and a resumed run logs
the evaluations after its restored step again, as for every logged record.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax.data import build_preprocess, load_split
from tl_jax.evaluation.fewshot_ridge import L2_GRID, check_shots, fewshot_eval
from tl_jax.transferability.extract import Candidate, extract, split_arrays
from tl_jax.util import config_checks

log = logging.getLogger("tl_jax")
KINDS = ("fewshot",)
DEFAULTS = dict(kind="fewshot", name="", every=0, dataset="", data_dir=None, train_split="train", test_split="test",
                eval_pp=None, layer="features", shots=[1, 5, 10, 25], seeds=3, l2s=None, val_fraction=0.2,
                batch_size=None, max_mb=1024.0)
PREFIX = "fewshot"


def check_evals(evals: Any) -> list[dict]:
    """``config.evals`` with defaults filled in; one-line ValueErrors naming ``config.evals[i].<key>``."""
    if not isinstance(evals, (list, tuple)):
        raise ValueError(f"config.evals must be a list of evaluator dicts (e.g. [{{'kind': 'fewshot', ...}}]), "
                         f"got {type(evals).__name__}")
    out, names = [], set()
    for i, raw in enumerate(evals):
        where = f"config.evals[{i}]"
        if not isinstance(raw, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{where} must be a dict with 'kind', 'name', 'dataset'..., got {raw!r}")
        raw = dict(raw)
        unknown = sorted(set(raw) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
        e = {**DEFAULTS, **raw}
        if e["kind"] not in KINDS:
            raise ValueError(f"{where}.kind must be one of {KINDS}, got {e['kind']!r}")
        if not isinstance(e["dataset"], str) or not e["dataset"]:
            raise ValueError(f"{where}.dataset must name a dataset (e.g. 'optdigits'), got {e['dataset']!r}")
        e["name"] = e["name"] or e["dataset"]
        if not isinstance(e["name"], str) or "/" in e["name"]:
            raise ValueError(f"{where}.name must be a string without '/' (it names the metrics), got {e['name']!r}")
        if e["name"] in names:
            raise ValueError(f"{where}.name={e['name']!r} is used by another evaluator: give each its own name")
        names.add(e["name"])
        for key in ("every", "seeds"):
            v = e[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "every" else 1):
                raise ValueError(f"{where}.{key} must be an int >= {0 if key == 'every' else 1}"
                                 f"{' (0: the last step only)' if key == 'every' else ''}, got {v!r}")
        shots = e["shots"]
        if not isinstance(shots, (list, tuple)) or not shots or \
                not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in shots):
            raise ValueError(f"{where}.shots must be a non-empty list of ints >= 1, got {shots!r}")
        if not 0.0 < float(e["val_fraction"]) < 1.0:
            raise ValueError(f"{where}.val_fraction must be in (0, 1), got {e['val_fraction']!r}")
        if e["l2s"] is not None and (not isinstance(e["l2s"], (list, tuple)) or not e["l2s"]
                                     or not all(float(v) > 0 for v in e["l2s"])):
            raise ValueError(f"{where}.l2s must be a non-empty list of numbers > 0 (null: 2^-10..2^10), "
                             f"got {e['l2s']!r}")
        out.append(e)
    return out


def check_config(config: Any) -> None:
    """``config.evals`` (:func:`check_evals`); run by :func:`tl_jax.config.validate`."""
    check_evals(config.evals)


config_checks.register_check("evals", check_config)


@dataclasses.dataclass
class FewshotEvaluator:
    """One ``config.evals`` entry, its data preprocessed and held in memory."""

    spec: dict
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    batch_size: int

    @property
    def name(self) -> str:
        return self.spec["name"]

    def due(self, step: int, total: int) -> bool:
        every = self.spec["every"]
        return step == total or bool(every and step % every == 0)

    def __call__(self, model: Any, variables: dict) -> dict[str, float]:
        """``{'fewshot/<name>/<k>shot': mean test accuracy over seeds}`` of ``model`` with ``variables``."""
        cand = Candidate(f"config.evals ({self.name})", model, variables, num_classes=1)
        (xtr, _), (xte, _) = (extract(cand, arrays, self.spec["layer"], self.batch_size)
                              for arrays in (self.train, self.test))
        res = fewshot_eval(xtr, self.train["label"], xte, self.test["label"], shots=self.spec["shots"],
                           seeds=self.spec["seeds"], l2s=self.spec["l2s"] or L2_GRID,
                           val_fraction=float(self.spec["val_fraction"]),
                           name=f"config.evals ({self.name}): {self.spec['dataset']}:{self.spec['train_split']}")
        return {f"{PREFIX}/{self.name}/{k}shot": r["accuracy"] for k, r in res["shots"].items()}


def build(config: ml_collections.ConfigDict) -> list[FewshotEvaluator]:
    """The run's evaluators, their splits read and preprocessed (before the workdir is touched: a missing
    dataset or too few examples per class is a one-line error)."""
    out = []
    for i, e in enumerate(check_evals(config.evals)):
        where = f"config.evals[{i}]"
        pp_ops = config.data.eval_pp if e["eval_pp"] is None else e["eval_pp"]
        pp = build_preprocess(list(pp_ops), where=f"{where}.eval_pp")
        if pp.is_random:
            raise ValueError(f"{where}.eval_pp must be deterministic (features are compared across steps)")
        splits = {}
        for part in ("train", "test"):
            split = load_split(e["dataset"], e[f"{part}_split"], e["data_dir"])
            splits[part] = split_arrays(split, None, pp, float(e["max_mb"]))
        check_shots(splits["train"]["label"], e["shots"], float(e["val_fraction"]),
                    f"{e['dataset']}:{e['train_split']}", key=f"{where}.shots")
        bs = int(e["batch_size"] or config.data.eval_batch_size)
        out.append(FewshotEvaluator(e, splits["train"], splits["test"], bs))
    return out


def host_variables(state: Any, model_params, fetch) -> dict:
    """``{'params', 'batch_stats'?}`` of ``state`` as host arrays (``fetch``: the strategy's
    ``fetch_state``; several processes gather the global arrays first, every process holds all of them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        state = multihost_utils.process_allgather(state, tiled=True)
        fetch = jax.device_get
    variables = {"params": model_params(state.params)}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return fetch(variables)


def evaluate_due(evaluators: list[FewshotEvaluator], step: int, total: int, model: Any, variables_fn
                 ) -> dict[str, float]:
    """The metrics of every evaluator due at ``step`` (``{}`` when none is); ``variables_fn()`` gives the
    model's host variables (called only when one is due)."""
    due = [e for e in evaluators if e.due(step, total)]
    if not due:
        return {}
    variables = variables_fn()
    out: dict[str, float] = {}
    for e in due:
        res = e(model, variables)
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in res.items()))
        out.update(res)
    return out
