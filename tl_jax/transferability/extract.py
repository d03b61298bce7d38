"""What the scores read of a candidate: its layer's features and its logits on the target's examples.

* :func:`target_arrays`: the target config's training examples (``config.data``:
  ``train_split``, ``val_fraction`` carved out first, then ``shots`` drawn with
  ``shots_seed``: exactly the examples a run of that config trains on) after its
  ``eval_pp`` (deterministic), as numpy arrays held in memory once for all candidates
  that read the same pipeline. A candidate from converted weights (or a run trained
  from them) reads it with the weights' normalisation appended when it has no
  ``normalize`` op (:func:`candidate_eval_pp`), as a training run does with ``init_from``.
* :func:`load_candidate`: a candidate = a finished run's workdir (or its
  ``checkpoints/`` dir or a step dir, ``PATH[:best|STEP]``) or a converted weights
  dir; its variables come from :func:`tl_jax.train.checkpoint.load_variables`, its
  architecture from the ``model`` group of its ``config.json`` (or the
  ``tl_jax_weights.json`` of ``tl-jax weights convert``), its classes from its head.
* :func:`extract`: one jitted eval-mode forward in fixed-size batches (the last one
  padded, the padding dropped) giving ``features [N, D]`` of the chosen layer and the
  ``logits [N, Z]`` of the candidate's own head.

Layers: ``'features'`` (the backbone output the head reads: ``return_features=True``),
``'logits'`` (the head output), or the ``'/'``-path of any linen submodule
(``backbone/conv2``), whose ``__call__`` output is captured
(``capture_intermediates``) and reduced to ``[N, D]``: spatial maps ``[B, H, W, C]``
and token maps ``[B, L, C]`` are averaged over positions, anything else flattened.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.data import build_preprocess, load_split
from tl_jax.data import cache as data_cache
from tl_jax.data.pipeline import _Subset
from tl_jax.data.validation import train_and_val_indices
from tl_jax.models import contract, model_from_config
from tl_jax.models.heads import head_dims
from tl_jax.models.inputs import model_inputs
from tl_jax.peft.merge_run import folded
from tl_jax.train.checkpoint import load_variables, parse_step_spec
from tl_jax.weights.run_preprocessing import weights_preprocessing, with_weights_normalisation

INPUT_KEYS = ("image", "input_ids", "attention_mask")
NAMED_LAYERS = ("features", "logits")
WEIGHTS_META = "tl_jax_weights.json"  # tl_jax.weights.convert.META_FILE


@dataclasses.dataclass
class Candidate:
    """A source model to score: where it came from, its module, variables and source classes (0: no head)."""

    path: str
    model: Any
    variables: dict
    num_classes: int
    where: str = ""  # how messages name it (default "--candidates PATH": tl-jax rank's flag)

    def __post_init__(self):
        self.where = self.where or f"--candidates {self.path}"


def split_arrays(split: Any, indices: np.ndarray | None, pp: Any, max_mb: float) -> dict[str, np.ndarray]:
    """``{input keys..., 'label'}`` of ``split`` (rows ``indices``, default all) after ``pp``, in memory."""
    source = split.source if indices is None else _Subset(split.source, np.asarray(indices))
    cached = data_cache.materialize(source, pp, max_bytes=int(max_mb * 2**20), required=True)
    return dict(cached.arrays)


def target_arrays(config: Any, eval_pp: Any = None) -> dict[str, np.ndarray]:
    """The training examples of target ``config`` after ``config.data.eval_pp`` (or ``eval_pp``: a candidate's
    :func:`candidate_eval_pp`) (see module doc)."""
    dc = config.data
    split = load_split(dc.name, dc.train_split, dc.data_dir)
    indices, _ = train_and_val_indices(split.labels(), val_fraction=dc.val_fraction, val_seed=dc.val_seed,
                                       shots=dc.shots, shots_seed=dc.shots_seed, name=f"{dc.name}:{dc.train_split}")
    pp = build_preprocess(list(dc.eval_pp if eval_pp is None else eval_pp), where="config.data.eval_pp")
    return split_arrays(split, indices, pp, dc.cache_max_mb)


def candidate_preprocessing(path: str) -> tuple[dict | None, str]:
    """``(preprocessing record, where it is from)`` candidate ``path`` expects its inputs normalised with: a
    converted weights dir's own (``tl_jax_weights.json``); for a run whose ``init_from`` names converted weights
    (when that folder is still there), the ``normalize`` op its recorded ``config.data.eval_pp`` ran with (the
    weights' own unless the run overrode it); ``(None, '')`` otherwise."""
    p = pathlib.Path(parse_step_spec(path)[0]).expanduser().absolute()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            pre = weights_preprocessing(str(cfg.get("init_from") or ""))
            own = [o for o in ((cfg.get("data") or {}).get("eval_pp") or [])
                   if isinstance(o, dict) and o.get("op") == "normalize"]
            if pre is not None and own:  # what the run trained and evaluated with
                pre = {**pre, "mean": own[-1]["mean"], "std": own[-1]["std"], "source": f"{d}/config.json"}
            return pre, str(d if own else cfg.get("init_from"))
        if (d / WEIGHTS_META).is_file():
            return weights_preprocessing(str(d)), str(d)
    return None, ""


def candidate_eval_pp(eval_pp: Any, path: str, where: str = "") -> list:
    """The target's ``eval_pp`` as candidate ``path`` (named ``where``, default ``--candidates PATH``) reads it:
    with the normalisation of its converted weights appended when the pipeline has no ``normalize`` op (logged
    once), else as given, with a warning once when its mean/std differ from the weights'
    (:func:`tl_jax.weights.run_preprocessing.with_weights_normalisation`, as a training run's ``init_from``)."""
    pre, weights = candidate_preprocessing(str(path))
    if pre is None:
        return [dict(o) for o in (eval_pp or [])]
    return with_weights_normalisation(eval_pp, pre, "config.data.eval_pp", weights,
                                      where or f"--candidates {path}")[0]


def candidate_model_config(path: str, where: str = "") -> dict:
    """The ``model`` group (``name``, ``kwargs``, ``num_classes``, head...) of candidate ``path`` (errors name it
    as ``where``, default ``--candidates PATH``)."""
    p = pathlib.Path(parse_step_spec(path)[0]).expanduser().absolute()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.json").is_file():
            return dict(json.loads((d / "config.json").read_text())["model"])
        if (d / WEIGHTS_META).is_file():
            meta = json.loads((d / WEIGHTS_META).read_text())
            return {"name": meta["model"], "kwargs": meta.get("model_kwargs") or {},
                    "num_classes": meta.get("num_classes")}
    raise ValueError(f"{where or '--candidates ' + path}: no config.json (a run) or {WEIGHTS_META} (converted "
                     f"weights) there or up to two levels above it: cannot tell its architecture")


def load_candidate(path: str, flag: str = "--candidates") -> Candidate:
    """Variables, model and source classes of candidate ``path`` (one-line errors name it as ``flag path``:
    ``--candidates`` for ``tl-jax rank``, ``--workdir`` for ``tl-jax fewshot``)."""
    where = f"{flag} {path}"
    variables = folded(load_variables(str(path), where=where), str(path), where)  # a LoRA run: folded in (exact)
    mc = candidate_model_config(str(path), where)
    dims = head_dims(variables["params"].get("head", {}))
    classes = dims[1] if dims is not None else int(mc.get("num_classes") or 0)
    try:
        model = model_from_config(mc, classes or 1)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return Candidate(str(path), model, variables, classes if dims is not None else 0, where)


def _reduce(x: jax.Array) -> jax.Array:
    """``[B, ...]`` -> ``[B, D]``: mean over the positions of ``[B, H, W, C]`` / ``[B, L, C]``, else flatten."""
    x = x.astype(jnp.float32)
    if x.ndim in (3, 4):
        return x.mean(axis=tuple(range(1, x.ndim - 1)))
    return x.reshape((x.shape[0], -1))


def _capture_at(layer: str):
    parts = tuple(layer.split("/"))
    return lambda module, method: method == "__call__" and tuple(module.path) == parts


def _find(tree: dict, parts: tuple[str, ...]) -> Any:
    for p in parts:
        tree = tree[p]
    return tree["__call__"][0]


def layer_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """``'/'``-paths of the modules whose ``__call__`` output is in a captured intermediates tree."""
    out = ["/".join(prefix)] if "__call__" in tree and prefix else []
    for k, v in tree.items():
        if k != "__call__" and isinstance(v, dict):
            out += layer_paths(v, prefix + (k,))
    return out


def forward_fn(cand: Candidate, layer: str):
    """``(variables, batch) -> (features [B, D], logits [B, Z] or None)`` in eval mode (not jitted)."""
    model = cand.model
    has_head = cand.num_classes > 0

    def fn(variables, batch):
        args, kw = model_inputs(batch)
        if layer in NAMED_LAYERS:
            if not has_head:
                return _reduce(model.apply(variables, *args, train=False, method="embed", **kw)), None
            if layer == "features":  # return_features=True, or the backbone's output (docs/models.md's contract)
                logits, feats = contract.logits_and_features(model, variables, *args, train=False, **kw)
            else:
                logits = feats = model.apply(variables, *args, train=False, **kw)
            return _reduce(feats), logits.astype(jnp.float32)
        out, state = model.apply(variables, *args, train=False, capture_intermediates=_capture_at(layer),
                                 mutable=["intermediates"], **kw)
        return _reduce(_find(state["intermediates"], tuple(layer.split("/")))), out.astype(jnp.float32)

    return fn


_JITTED: dict = {}


def _jitted(cand: Candidate, layer: str):
    """The jitted :func:`forward_fn`, shared by candidates of the same architecture (compiled once)."""
    key = (repr(cand.model), layer, cand.num_classes > 0)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(forward_fn(cand, layer))
    return _JITTED[key]


_CHECKED: set = set()  # (architecture, layer, head?, input shapes) already traced: the same answer for any weights


def check_layer(cand: Candidate, layer: str, sample: dict) -> None:
    """One-line errors unless ``cand`` runs on ``sample`` (a batch of one) and has ``layer`` (traced once per
    architecture, layer and input shapes: candidates of one architecture share the answer)."""
    key = (repr(cand.model), layer, cand.num_classes > 0, jax.tree.map(lambda v: (v.shape, str(v.dtype)), sample),
           jax.tree.map(lambda v: (tuple(v.shape), str(v.dtype)), cand.variables))
    key = repr(key)
    if key in _CHECKED:
        return
    _check_layer(cand, layer, sample)
    _CHECKED.add(key)


def _check_layer(cand: Candidate, layer: str, sample: dict) -> None:
    where = cand.where
    if layer not in NAMED_LAYERS and not hasattr(cand.model, "scope"):  # not a linen module (e.g. NNX)
        raise ValueError(f"{where} is a {type(cand.model).__name__}: --layer {layer!r} needs a linen model "
                         f"(use --layer features or logits)")
    if layer == "logits" and not cand.num_classes:
        raise ValueError(f"{where} has no head: --layer logits (and scores leep, nce) need one")
    if (layer == "features" and cand.num_classes and not contract.takes_return_features(cand.model)
            and not contract.has_split(cand.variables["params"])):
        other = "--layer logits" + (" or a module path (--layer backbone/...)" if hasattr(cand.model, "scope") else "")
        raise ValueError(f"{where}: {contract.no_features_message(contract.module_class(cand.model).__name__)}; "
                         f"or use {other}")
    args, kw = model_inputs(sample)
    try:
        if layer in NAMED_LAYERS:
            jax.eval_shape(forward_fn(cand, layer), cand.variables, sample)
            return
        _, state = jax.eval_shape(lambda v, a: cand.model.apply(v, *a, train=False, capture_intermediates=True,
                                                                mutable=["intermediates"], **kw),
                                  cand.variables, args)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not fit the target's inputs: one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        shapes = {k: tuple(v.shape[1:]) for k, v in sample.items()}
        raise ValueError(f"{where} does not run on the target's inputs {shapes} (after config.data.eval_pp): "
                         f"{type(e).__name__}: {first}") from None
    paths = layer_paths(state["intermediates"])
    if layer not in paths:
        raise ValueError(f"{where} has no layer {layer!r}; its layers: features, logits, {', '.join(paths)}")


def extract(cand: Candidate, arrays: dict[str, np.ndarray], layer: str, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features float32 [N, D], logits float32 [N, Z] or None)`` of every row of ``arrays``."""
    inputs = {k: v for k, v in arrays.items() if k in INPUT_KEYS}
    n = len(next(iter(inputs.values())))
    check_layer(cand, layer, {k: v[:1] for k, v in inputs.items()})
    fn = _jitted(cand, layer)
    variables = jax.device_put(cand.variables)
    feats, logits = [], []
    bs = max(1, min(int(batch_size), n))
    for start in range(0, n, bs):
        chunk = {k: v[start:start + bs] for k, v in inputs.items()}
        pad = bs - len(next(iter(chunk.values())))
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        f, z = jax.device_get(fn(variables, chunk))
        feats.append(np.asarray(f)[:bs - pad])
        if z is not None:
            logits.append(np.asarray(z)[:bs - pad])
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)
