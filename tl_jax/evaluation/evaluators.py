"""Periodic evaluators of ``config.evals`` on the model's frozen features: few-shot ridge, kNN, linear.

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

Kinds (``KINDS``; the keys common to all are in :data:`COMMON`, each kind's own in
:data:`KIND_KEYS`):

* ``fewshot``: as above, ``fewshot/<name>/<k>shot``.
* ``knn``: DINO's weighted kNN (:mod:`tl_jax.evaluation.knn`): cosine similarity of
  each test feature to every train feature, votes ``exp(s/T)`` of the ``k`` nearest
  (``k`` default 20, ``temperature`` 0.07); ``knn/<name>/accuracy``.
* ``linear``: multinomial logistic regression on the standardised features
  (:mod:`tl_jax.evaluation.linear_probe`), its L2 picked from ``l2s`` (default
  1 ... 1e-5) on a ``val_fraction`` carve-out of the train split, refitted on all of
  it; ``linear/<name>/accuracy`` and ``linear/<name>/l2`` (the chosen value).
  A fit takes seconds (scikit-learn's L-BFGS), so give it a sparse ``every``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax.data import build_preprocess, load_split
from tl_jax.evaluation import knn, linear_probe
from tl_jax.evaluation.fewshot_ridge import L2_GRID, check_shots, fewshot_eval
from tl_jax.transferability.extract import Candidate, extract, split_arrays
from tl_jax.util import config_checks

log = logging.getLogger("tl_jax")
COMMON = dict(kind="fewshot", name="", every=0, dataset="", data_dir=None, train_split="train", test_split="test",
              eval_pp=None, layer="features", batch_size=None, max_mb=1024.0)
KIND_KEYS = {
    "fewshot": dict(shots=[1, 5, 10, 25], seeds=3, l2s=None, val_fraction=0.2),
    "knn": dict(k=knn.DEFAULT_K, temperature=knn.DEFAULT_TEMPERATURE),
    "linear": dict(l2s=None, val_fraction=0.2, seed=0, max_iter=linear_probe.MAX_ITER),
}
KINDS = tuple(KIND_KEYS)
DEFAULTS = {**COMMON, **KIND_KEYS["fewshot"]}  # the few-shot entry's defaults (the first kind)
PREFIX = "fewshot"


def _int_at_least(e: dict, key: str, low: int, where: str, hint: str = "") -> None:
    v = e[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{where}.{key} must be an int >= {low}{hint}, got {v!r}")


def _check_kind_keys(e: dict, where: str) -> None:
    """The checks of the keys of ``e['kind']`` (see :data:`KIND_KEYS`)."""
    kind = e["kind"]
    if kind == "fewshot":
        _int_at_least(e, "seeds", 1, where)
        shots = e["shots"]
        if not isinstance(shots, (list, tuple)) or not shots or \
                not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in shots):
            raise ValueError(f"{where}.shots must be a non-empty list of ints >= 1, got {shots!r}")
    if kind == "knn":
        _int_at_least(e, "k", 1, where)
        t = e["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{where}.temperature must be a number > 0 (DINO: 0.07), got {t!r}")
    if kind == "linear":
        _int_at_least(e, "seed", 0, where)
        _int_at_least(e, "max_iter", 1, where)
    if kind in ("fewshot", "linear"):
        if isinstance(e["val_fraction"], bool) or not isinstance(e["val_fraction"], (int, float)) \
                or not 0.0 < float(e["val_fraction"]) < 1.0:
            raise ValueError(f"{where}.val_fraction must be in (0, 1), got {e['val_fraction']!r}")
        default = "2^-10..2^10" if kind == "fewshot" else "1..1e-5"
        if e["l2s"] is not None and (not isinstance(e["l2s"], (list, tuple)) or not e["l2s"] or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in e["l2s"])):
            raise ValueError(f"{where}.l2s must be a non-empty list of numbers > 0 (null: {default}), "
                             f"got {e['l2s']!r}")


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
        kind = raw.get("kind", COMMON["kind"])
        if kind not in KINDS:
            raise ValueError(f"{where}.kind must be one of {KINDS}, got {kind!r}")
        known = {**COMMON, **KIND_KEYS[kind]}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for kind {kind!r}; known: {sorted(known)}")
        e = {**known, **raw}
        if not isinstance(e["dataset"], str) or not e["dataset"]:
            raise ValueError(f"{where}.dataset must name a dataset (e.g. 'optdigits'), got {e['dataset']!r}")
        e["name"] = e["name"] or e["dataset"]
        if not isinstance(e["name"], str) or "/" in e["name"]:
            raise ValueError(f"{where}.name must be a string without '/' (it names the metrics), got {e['name']!r}")
        if (kind, e["name"]) in names:
            raise ValueError(f"{where}.name={e['name']!r} is used by another evaluator of kind {kind!r}: give "
                             f"each its own name")
        names.add((kind, e["name"]))
        _int_at_least(e, "every", 0, where, " (0: the last step only)")
        _check_kind_keys(e, where)
        out.append(e)
    return out


def check_config(config: Any) -> None:
    """``config.evals`` (:func:`check_evals`); run by :func:`tl_jax.config.validate`."""
    check_evals(config.evals)


config_checks.register_check("evals", check_config)


@dataclasses.dataclass
class Evaluator:
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
        """The metrics (``<kind>/<name>/...``) of ``model`` with ``variables`` (see module doc)."""
        cand = Candidate(f"config.evals ({self.name})", model, variables, num_classes=1)
        (xtr, _), (xte, _) = (extract(cand, arrays, self.spec["layer"], self.batch_size)
                              for arrays in (self.train, self.test))
        return score(self.spec, xtr, self.train["label"], xte, self.test["label"])


def score(spec: dict, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> dict[str, float]:
    """The metrics of evaluator ``spec`` (filled by :func:`check_evals`) on extracted train/test features."""
    kind, name = spec["kind"], spec["name"]
    where = f"config.evals ({name}): {spec['dataset']}:{spec['train_split']}"
    if kind == "knn":
        acc = knn.knn_accuracy(xtr, ytr, xte, yte, k=spec["k"], temperature=float(spec["temperature"]))
        return {f"knn/{name}/accuracy": acc}
    if kind == "linear":
        res = linear_probe.linear_eval(xtr, ytr, xte, yte, l2s=spec["l2s"] or linear_probe.L2_GRID,
                                       val_fraction=float(spec["val_fraction"]), seed=spec["seed"],
                                       max_iter=spec["max_iter"], name=where)
        return {f"linear/{name}/accuracy": res["accuracy"], f"linear/{name}/l2": res["l2"]}
    res = fewshot_eval(xtr, ytr, xte, yte, shots=spec["shots"], seeds=spec["seeds"], l2s=spec["l2s"] or L2_GRID,
                       val_fraction=float(spec["val_fraction"]), name=where)
    return {f"{PREFIX}/{name}/{k}shot": r["accuracy"] for k, r in res["shots"].items()}


def build(config: ml_collections.ConfigDict) -> list[Evaluator]:
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
        if e["kind"] == "fewshot":
            check_shots(splits["train"]["label"], e["shots"], float(e["val_fraction"]),
                        f"{e['dataset']}:{e['train_split']}", key=f"{where}.shots")
        bs = int(e["batch_size"] or config.data.eval_batch_size)
        out.append(Evaluator(e, splits["train"], splits["test"], bs))
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


def evaluate_due(evaluators: list[Evaluator], step: int, total: int, model: Any, variables_fn
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
