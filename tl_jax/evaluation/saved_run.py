"""A saved run, evaluated again or asked for predictions: ``load_run``, ``evaluate_run``, ``predict``.

A workdir (``config.json`` + ``checkpoints/``, see :mod:`tl_jax.train.workdir`) is rebuilt
with the machinery of training: the config from ``config.json``
(:func:`tl_jax.config.from_dict`), the objective, model and initial state from
:func:`tl_jax.train.build.build_model_and_state` (with ``init_from`` cleared: the
checkpoint replaces every leaf), then the chosen step (``latest`` | ``best`` |
``STEP``, :func:`tl_jax.train.checkpoint.select_step`) restored into that
state, ``aux`` included, so the restored state is exactly the saved one.

* :func:`evaluate_run`: the objective's ``eval_sums`` over a whole split
  (:func:`tl_jax.evaluation.during_training.evaluate`: last batch padded and masked). Without
  ``dataset``/``split`` it is the run's own test evaluation (through the
  objective's ``eval_data``, as in training), so it reproduces ``summary.json``.
* :func:`predict`: per-example ``probs = softmax(z)`` ``[N, C]`` and
  ``pred = argmax z`` of the model's eval-mode logits ``z``, for a split, an
  image folder or a CSV of texts (:mod:`tl_jax.evaluation.predict_inputs`).

Everything runs on ONE device (the first): predictions are not a training
workload, and any saved layout (FSDP-sharded or not) restores into it. Nothing
in the workdir is written here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from tl_jax import config as config_lib
from tl_jax.data import build_preprocess, eval_batches, load_split
from tl_jax.data.sources import DataSplit
from tl_jax.data.validation import train_and_val_indices, validation_split
from tl_jax.evaluation import predict_inputs as inputs
from tl_jax.evaluation.during_training import evaluate
from tl_jax.objectives.base import apply_model
from tl_jax.parallel import mesh as mesh_lib
from tl_jax.train import ema as ema_lib
from tl_jax.train import checkpoint as ckpt_lib
from tl_jax.train.build import build_model_and_state
from tl_jax.train.step import make_eval_step

INPUT_KEYS = ("image", "input_ids", "attention_mask")  # what the model reads of a batch
RUN_VAL = "val"  # --split val: the run's own validation set (config.data.val_fraction / val_split)


@dataclasses.dataclass
class LoadedRun:
    """A restored run: its config, objective (with ``model``), state at ``step``, and what it was built for."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    objective: Any
    state: Any
    step: int
    num_classes: int
    input_shapes: dict[str, tuple[int, ...]]  # per-example shapes of the model inputs after train_pp
    mesh: Any


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The run's config from ``workdir/config.json`` (one-line errors for a missing run)."""
    wd = pathlib.Path(workdir).expanduser().absolute()
    if not wd.is_dir():
        raise FileNotFoundError(f"--workdir {wd} does not exist (or is not a directory)")
    f = wd / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"--workdir {wd} has no config.json: not a tl-jax run")
    return config_lib.from_dict(json.loads(f.read_text()))


def _build_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``init_from`` cleared (the checkpoint gives every leaf). A residual-output
    objective whose source is ``init_from`` keeps it as its source (its frozen model is built from it)."""
    c = config_lib.from_dict(config_lib.to_dict(config))
    if c.objective.name == "residual_output" and not c.objective.residual_output.source:
        c.objective.residual_output.source = c.init_from
    c.init_from = ""
    return c


def load(workdir: str | pathlib.Path, checkpoint: str | int = "latest") -> LoadedRun:
    """Rebuild the run in ``workdir`` and restore its ``checkpoint`` step (see module doc)."""
    config = read_config(workdir)
    wd = pathlib.Path(workdir).expanduser().absolute()
    step_dir = ckpt_lib.select_step(wd, checkpoint, where="--checkpoint")
    dc = config.data
    train_split = load_split(dc.name, dc.train_split, dc.data_dir)
    train_pp = build_preprocess(list(dc.train_pp), where="config.data.train_pp")
    example = train_pp(train_split.source[0], np.random.default_rng(0))
    sample = {k: np.asarray(v)[None] for k, v in example.items()}
    num_classes = config.model.num_classes or train_split.num_classes
    mesh = mesh_lib.build_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
    objective, _, target = build_model_and_state(_build_config(config), num_classes, sample, mesh,
                                                 groups_log_level=logging.DEBUG)  # a training matter
    target = ema_lib.attach(target, config.train.ema_decay)  # runs trained with EMA hold its weights too
    state = ckpt_lib.restore_state(step_dir, target)
    shapes = {k: tuple(np.shape(v)) for k, v in example.items() if k in INPUT_KEYS}
    return LoadedRun(wd, config, objective, state, int(step_dir.name), num_classes, shapes, mesh)


def load_run(workdir: str | pathlib.Path, checkpoint: str | int = "latest") -> tuple:
    """``(config, objective, state)`` of the run in ``workdir`` at ``checkpoint`` (``state.step`` is the step)."""
    run = load(workdir, checkpoint)
    return run.config, run.objective, run.state


def parse_eval_pp(value: Any, where: str = "--config.data.eval_pp") -> list | None:
    """A preprocessing op list from JSON text (or a list already); None stays None."""
    if value is None or isinstance(value, list):
        return value
    try:
        ops = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} must be a JSON list of ops, got {value!r} ({e})") from None
    if not isinstance(ops, list):
        raise ValueError(f"{where} must be a JSON list of ops, got {value!r}")
    return ops


def check_inputs(run: LoadedRun, split: DataSplit, pp: Any, what: str) -> None:
    """One-line errors when ``split`` (after ``pp``) does not fit the run's model: input shapes, classes."""
    got = {k: tuple(np.shape(v)) for k, v in pp(split.source[0]).items() if k in INPUT_KEYS}
    for key, want in run.input_shapes.items():
        if key not in got:
            raise ValueError(f"{what} has no {key!r} input (it gives {sorted(got)}); the run was trained on "
                             f"{key!r} {want}")
        if got[key] != want:
            raise ValueError(f"{what} gives {key} of shape {got[key]} after the eval preprocessing but the run was "
                             f"trained on {want}; pass --config.data.eval_pp='[...]' ops that make {want}")
    if split.num_classes > run.num_classes:
        raise ValueError(f"{what} has {split.num_classes} classes but the run's model has {run.num_classes}")


def eval_split(run: LoadedRun, dataset: str | None = None, split: str | None = None,
               data_dir: str | None = None, eval_pp: Any = None) -> tuple[DataSplit, Any]:
    """``(split, preprocess)`` to evaluate: the run's test data (via the objective) or the given one."""
    dc = run.config.data
    ops = parse_eval_pp(eval_pp)
    pp = build_preprocess(list(dc.eval_pp) if ops is None else ops, where="--config.data.eval_pp")
    name, split_name = dataset or dc.name, split or dc.test_split
    if dataset is None and split == RUN_VAL and (dc.val_fraction is not None or dc.val_split is not None):
        data = run_validation(dc, data_dir)  # the very examples the run validated on
        check_inputs(run, data, pp, f"the run's validation set ({data.split})")
        return data, pp
    data = load_split(name, split_name, data_dir or dc.data_dir)
    if dataset is None and split is None:  # the run's own test evaluation, exactly as the loop makes it
        data, pp = run.objective.eval_data(data, pp)
    check_inputs(run, data, pp, f"dataset {name}:{split_name}")
    return data, pp


def run_validation(dc: ml_collections.ConfigDict, data_dir: str | None = None) -> DataSplit:
    """The validation split of a run with ``config.data`` = ``dc``: ``val_split``, or the stratified
    ``val_fraction`` of its train split (seeded by ``val_seed``), exactly as training carved it."""
    train = load_split(dc.name, dc.train_split, data_dir or dc.data_dir)
    val_idx = None
    if dc.val_fraction is not None:
        _, val_idx = train_and_val_indices(train.labels(), val_fraction=dc.val_fraction, val_seed=dc.val_seed,
                                           shots=dc.shots, shots_seed=dc.shots_seed, name=f"{dc.name}:{dc.train_split}")
    return validation_split(dc, train, val_idx)


def evaluate_run(workdir: str | pathlib.Path, checkpoint: str | int = "latest", dataset: str | None = None,
                 split: str | None = None, data_dir: str | None = None, eval_pp: Any = None,
                 run: LoadedRun | None = None) -> dict:
    """Metrics of the run's ``checkpoint`` over a whole split.

    Returns ``{"workdir", "checkpoint", "step", "dataset", "split", "count", "metrics": {name: value}}``
    where ``metrics`` are the objective's ``Σ eval_sums / Σ count`` (``accuracy``, ``loss``, ...;
    the run's ``summary.json`` holds them as ``test/<name>``).
    """
    run = run or load(workdir, checkpoint)
    data, pp = eval_split(run, dataset, split, data_dir, eval_pp)
    res = evaluate(jax.jit(make_eval_step(run.objective)), run.state, data, pp,
                   int(run.config.data.eval_batch_size), run.mesh)
    count = res.pop("count")
    return {"workdir": str(run.workdir), "checkpoint": str(checkpoint), "step": run.step, "dataset": data.name,
            "split": data.split, "count": count, "metrics": res}


def logits_fn(objective: Any):
    """``(state, batch) -> z [B, C]``: the eval-mode logits the objective's test metrics score.

    The model's output (``apply_model`` on ``model_params``), or, for objectives that
    combine it with more (a residual source: ``objective.logits``; a parameter delta:
    ``objective.adapted_params``), what their ``eval_sums`` use.
    """

    def fn(state, batch):
        if hasattr(objective, "logits"):
            return objective.logits(state.params, state.batch_stats, state.aux, batch, train=False)[0]
        params = (objective.adapted_params(state.params, state.aux) if hasattr(objective, "adapted_params")
                  else objective.model_params(state.params))
        return apply_model(objective.model, params, state.batch_stats, batch, train=False)[0]

    return fn


def predict_split(run: LoadedRun, data: DataSplit, pp: Any) -> dict[str, np.ndarray]:
    """``{"logits", "probs", "pred"}`` for every example of ``data`` in order (padding rows dropped)."""
    fn = logits_fn(run.objective)

    @jax.jit
    def step(state, batch):
        z = fn(state, {k: v for k, v in batch.items() if k in INPUT_KEYS})
        return z, jax.nn.softmax(z.astype(np.float32), axis=-1)

    zs, ps = [], []
    for batch in eval_batches(data, pp, batch_size=int(run.config.data.eval_batch_size)):
        z, p = jax.device_get(step(run.state, mesh_lib.shard_batch(batch, run.mesh)))
        if np.ndim(z) != 2:
            raise ValueError(f"objective {run.config.objective.name!r} gives outputs of shape {np.shape(z)}, not "
                             f"logits [B, C]: predict supports single-head classifiers")
        real = batch["mask"] > 0
        zs.append(np.asarray(z)[real])
        ps.append(np.asarray(p)[real])
    logits = np.concatenate(zs)
    return {"logits": logits, "probs": np.concatenate(ps), "pred": logits.argmax(-1).astype(np.int64)}


def predict(workdir: str | pathlib.Path, checkpoint: str | int = "latest", *, split: str | None = None,
            dataset: str | None = None, data_dir: str | None = None, image_folder: str | None = None,
            csv: str | None = None, tokenizer: str | None = None, text_column: str = "text",
            label_column: str = "label", eval_pp: Any = None, run: LoadedRun | None = None) -> dict:
    """Predictions of the run's ``checkpoint`` for ONE input: a ``split`` (of ``dataset``, default the
    run's), an ``image_folder`` or a ``csv`` of texts (:mod:`tl_jax.evaluation.predict_inputs`).

    Returns ``{"pred": int [N], "probs": f32 [N, C], "logits": f32 [N, C], "label": int [N] or None
    (-1 = unknown), "index": int [N] or "path": str [N], "class_names": list or None, "step": int}``.
    """
    given = [x for x in (split, image_folder, csv) if x is not None]
    if len(given) != 1:
        raise ValueError("predict needs exactly one input: --split (with optional --dataset), --image-folder or --csv")
    run = run or load(workdir, checkpoint)
    dc = run.config.data
    names = inputs.class_names(dc.name, dc.data_dir)
    ops = parse_eval_pp(eval_pp)
    pp = build_preprocess(list(dc.eval_pp) if ops is None else ops, where="--config.data.eval_pp")
    out: dict[str, Any] = {}
    if split is not None:
        name = dataset or dc.name
        data = load_split(name, split, data_dir or dc.data_dir)
        what = f"dataset {name}:{split}"
        out["index"] = np.arange(len(data), dtype=np.int64)
        labels = data.labels()
        names = inputs.class_names(name, data_dir or dc.data_dir) if dataset else names
    elif image_folder is not None:
        data, paths, labels = inputs.image_folder_split(image_folder, run.config, names)
        what = f"--image-folder {image_folder}"
        out["path"] = np.asarray(paths)
    else:
        data, paths, labels = inputs.csv_split(csv, run.config, names, tokenizer, text_column, label_column)
        what = f"--csv {csv}"
        out["index"] = np.arange(len(data), dtype=np.int64)
    check_inputs(run, data, pp, what)
    out.update(predict_split(run, data, pp))
    out["label"] = None if labels is None else np.asarray(labels, np.int64)
    out["class_names"] = names
    out["step"] = run.step
    return out
