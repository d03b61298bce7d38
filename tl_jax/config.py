"""Configs: ml_collections files with ``get_config(arg)``, a locked schema, overrides.

An experiment file ``experiments/X.py`` defines ``get_config(arg: str | None)``
and starts from :func:`base_config`, so every key a run can have is declared
here with its type; the returned config is locked, so ``--config.trian.steps``
is an error, not a silently new key.

Command line::

    tl-jax train --config experiments/X.py:stage=target,shots=10 \\
        --config.optimizer.learning_rate=3e-4 \\
        --config.param_rules='[["backbone/.*", null], [".*", 1.0]]'

Override values are parsed as JSON (``null``, lists, numbers), then as a Python
literal, else kept as a string; the schema's type is then enforced. :func:`validate`
runs the schema's checks, then the checks that the modules owning a group register
(:mod:`tl_jax.util.config_checks`: ``config.recipe`` by tl_jax/train/lp_ft.py, ...).
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from tl_jax.util.config_checks import register_check, registered_checks, run_checks  # noqa: F401 (public here)
from tl_jax.util.config_errors import all_keys, did_you_mean, file_error, quoting_hint


# groups whose keys are not fixed by the schema (model kwargs, checked by the model)
FREE_GROUPS = frozenset({"model.kwargs", "objective.distill.teacher_kwargs",
                         "objective.feature_distill.teacher_kwargs"})


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def base_config() -> ml_collections.ConfigDict:
    """Every key of a training run, with defaults and types (the schema)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # head: hidden layer widths ([] = one Dense layer), their activation and dropout (tl_jax/models/heads.py).
    c.model = dict(name="cnn", num_classes=10, dropout_rate=0.0, kwargs={},
                   head=dict(hidden=[], activation="relu", dropout=0.0))
    c.data = dict(
        name="mnist5k", data_dir=config_dict.placeholder(str), train_split="train", test_split="test",
        shots=config_dict.placeholder(int), shots_seed=0, data_seed=config_dict.placeholder(int),
        train_pp=[{"op": "rescale", "in_max": 255.0}], eval_pp=[{"op": "rescale", "in_max": 255.0}],
        batch_size=64, eval_batch_size=250,
        # Keep the deterministic prefix of train_pp (ops before the first random op) in memory
        # (tl_jax/data/cache.py): 'auto' (when it fits in cache_max_mb) | true | false. Same batches.
        cache=config_dict.FieldReference("auto", field_type=object), cache_max_mb=1024.0,
        # Device batches a background thread makes ahead (tl_jax/train/prefetch.py); 0 = in the loop's
        # thread. 'auto': 2 on machines of more than 2 cores, else 0 (faster there: BENCHMARKS.md, goal 1).
        prefetch=config_dict.FieldReference("auto", field_type=object),
        # Keep those cached rows on the devices and make each batch inside the compiled step from row
        # indices and draws (tl_jax/data/device_batches.py): false (default: no loop speed-up measured on
        # CPUs) | 'auto' (when eligible and the table fits device_cache_max_mb) | true. Same batches.
        device_cache=config_dict.FieldReference(False, field_type=object), device_cache_max_mb=256.0,
        # Validation set for model selection and early stopping (tl_jax/data/validation.py), one of: val_fraction
        # (a stratified subset of train_split, seeded by val_seed, carved out before `shots` are drawn) or
        # val_split (a split spec such as 'validation' or 'train[90%:]'); null = none. Evaluated with eval_pp.
        val_fraction=config_dict.placeholder(float), val_split=config_dict.placeholder(str), val_seed=0,
        # N: a tfds catalogue dataset (mnist, cifar10, ...) is replaced by N random examples of its real features
        # and shapes (tfds.testing.mock_data), to check a config's shapes, freezing and compile without its data
        # (`tl-jax train --mock-data N`); recorded in config.json and summary.json. null = the real data.
        mock_examples=config_dict.placeholder(int),
        # Batch-level mixup/cutmix with soft labels (tl_jax/data/mixing.py): alpha / cutmix_alpha the Beta
        # parameters (0 = off), switch_prob the chance of cutmix when both are on, prob the chance to mix at all.
        mixup=dict(alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0))
    c.optimizer = dict(name="adam", learning_rate=1e-3, momentum=0.9, weight_decay=0.0, schedule="constant",
                       warmup_steps=0, grad_clip_norm=config_dict.placeholder(float),
                       # Gradient accumulation: each step averages the gradients of accum_steps micro-batches of
                       # batch_size/accum_steps examples, then updates once (tl_jax/train/step.py: accumulate).
                       accum_steps=1)
    # (regex over '/'-joined param paths, lr multiplier or None = frozen); first match wins.
    c.param_rules = [[".*", 1.0]]
    c.init_from = ""  # workdir or checkpoint dir of a pretrained run; '' = from scratch
    c.dont_load = ["head/.*"]  # params kept at their fresh init when loading init_from
    # [regex, replacement | null] pairs renaming (null: dropping) init_from's param paths before they are
    # matched (tl_jax/params/merge.py; layer_subset([0, 2, 4]) loads teacher layers 0,2,4 as layers 0,1,2).
    c.init_map = []
    # '' = one run as configured | 'lp_ft': a linear probe of lp_steps (only lp_trainable trains, lr
    # lp_learning_rate, null = the optimizer's) in WORKDIR/lp, then this config fine-tuned from ALL of the
    # probe's params (tl_jax/train/lp_ft.py).
    c.recipe = dict(name="", lp_steps=100, lp_learning_rate=config_dict.placeholder(float), lp_trainable=["head/.*"])
    # Periodic evaluators logged like any metric (tl_jax/evaluation/evaluators.py), e.g. few-shot ridge
    # regression on the model's frozen features: [{"kind": "fewshot", "name": "digits", "every": 200,
    # "dataset": "optdigits", "eval_pp": [...], "shots": [1, 5, 10, 25], "seeds": 3}].
    c.evals = []
    # Regularisers of the trainable params (tl_jax/objectives/regularizers.py): weights, 0 = off.
    c.loss = dict(label_smoothing=0.0, l1=0.0, l2=0.0, l2_sp=0.0)
    # The objective (tl_jax/objectives/): its name, and one config group per objective that has options.
    # Deferred: the objectives import JAX, which loading the CLI or a sweep spec does not need.
    from tl_jax.objectives import default_configs

    c.objective = dict(name="classification", **default_configs())
    c.train = dict(steps=500, log_every=50, eval_every=0, checkpoint_every=250, keep_checkpoints=2,
                   # Retention keeps the newest keep_checkpoints steps and the best by best_metric
                   # ('max': highest, 'min': lowest, e.g. for val/loss). 'auto': val/accuracy with a validation
                   # set (config.data.val_*), else no best tracking; '' = none; test/* is refused with validation.
                   best_metric="auto", best_mode="max", nan_policy="error", progress=True,
                   # Stop when `metric` (a val/* metric; '' = off) has not improved by more than min_delta for
                   # `patience` evals (every eval_every steps); mode 'max' | 'min' (tl_jax/train/early_stopping.py).
                   early_stopping=dict(metric="", patience=5, min_delta=0.0, mode="max"),
                   # Exponential moving average of the weights, ema <- d*ema + (1-d)*params after each update, kept
                   # in the checkpoints and evaluated beside them as test/ema/* (val/ema/*): d in [0, 1), 0 = off.
                   ema_decay=0.0,
                   # Frozen backbone + deterministic train_pp: compute the backbone features once and train
                   # the head on them (tl_jax/train/feature_cache.py): 'auto' (when eligible) | true | false.
                   feature_cache=config_dict.FieldReference("auto", field_type=object),
                   # Orbax saves in background threads (true) or before the loop goes on (false). 'auto':
                   # synchronous when the devices are CPUs and the state is < 256 MiB, where the writer threads
                   # would take XLA's cores (tl_jax/train/checkpoint.py: use_async_save; BENCHMARKS.md goal 1).
                   checkpoint_async=config_dict.FieldReference("auto", field_type=object),
                   # zstd-compress the saved arrays (float32 weights compress poorly, for more CPU per save;
                   # tl_jax/train/checkpoint.py). Either kind restores whatever this says.
                   checkpoint_compression=False,
                   # train/grad_norm on the logged steps: 'separate' compiles the step twice, with and without
                   # the norm, and runs the first on those steps (one more compile, no lax.cond in the step)
                   # | 'cond': one program, the norm inside a lax.cond.
                   grad_norm_program="separate")
    # Mixed precision (tl_jax/models/precision.py, docs/precision.md): the model computes in `compute` (float32 |
    # bfloat16 | float16) while params, gradients, BatchNorm statistics, losses and metrics stay float32; `moments`:
    # the optimizer's first moments (Adam's mu, SGD's momentum) in float32 | bfloat16 (Adam's nu stays float32).
    # For GPUs/TPUs: CPUs emulate bfloat16 (slower than float32). Part of the run's identity (it changes results).
    c.precision = dict(compute="float32", moments="float32")
    # Parameter-efficient fine-tuning (tl_jax/peft/, docs/peft.md), a link of the model chain: LoRA on the linen
    # Dense/DenseGeneral/Conv layers whose module path re.fullmatch-es `targets`, delta (alpha/rank)·x·A·B
    # (rslora: alpha/sqrt(rank)), dropout on the LoRA branch's input; rank 0 = off. freeze_base: lora/.*, head/.*
    # (+ the objective's params) train, the rest is frozen (config.param_rules left at its default); false:
    # config.param_rules alone decides. adapter: bottleneck adapters of width `dim` (0 = off) in the ViT/BERT blocks,
    # 'houlsby' (after attention and MLP) | 'pfeiffer' (after the MLP); prompt: VPT tokens for tl_jax ViTs
    # (num_tokens 0 = off; deep: fresh tokens at every block). Their params (adapter/.*, prompt/.*) train like lora/.*.
    c.peft = dict(lora=dict(rank=0, alpha=8.0, targets=".*", rslora=False, dropout=0.0),
                  adapter=dict(dim=0, placement="houlsby", act="relu"), prompt=dict(num_tokens=0, deep=False),
                  freeze_base=True)
    c.compile_cache_dir = config_dict.placeholder(str)  # None: ~/.cache/tl_jax/jax
    # Where metrics go besides metrics.jsonl (tl_jax/train/trackers.py); not part of a run's identity.
    c.tracking = dict(tensorboard=True, wandb=False, wandb_project="tl_jax", wandb_mode="offline", mlflow=False,
                      mlflow_tracking_uri="")
    # Devices and hosts (tl_jax/parallel/, README "Multi-device and multi-host").
    c.parallel = dict(
        mode="jit",  # 'jit': one program sharded over the mesh | 'pmap': jax.pmap with lax.pmean
        mesh={"data": -1, "model": 1},  # axis sizes, -1 = all remaining devices; 'model' > 1 shards big params
        fsdp_min_size=2**18,  # with model > 1: state leaves of >= this many elements are sharded over 'model'
        data_sharding="batch",  # 'batch': same batches for any process count | 'examples': strided per process
        # Multi-host (not recorded in the workdir's config.json): 'auto' | true | false; unset values are read
        # from $TL_JAX_COORDINATOR_ADDRESS / $JAX_COORDINATOR_ADDRESS, $TL_JAX_NUM_PROCESSES, $TL_JAX_PROCESS_ID
        # or detected by jax (TPU pod, SLURM, Open MPI).
        distributed=config_dict.FieldReference("auto", field_type=object),
        coordinator_address=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int), heartbeat_timeout_s=100, initialization_timeout_s=300)
    c.lock()
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """``'stage=target,shots=10'`` -> ConfigDict typed like ``defaults``; unknown keys are errors."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} must look like key=value (known: {sorted(defaults)})")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                value: Any = {"true": True, "false": False, "1": True, "0": False}[raw.lower()]
            elif default is None:
                value = _parse_value(raw)
            else:
                value = type(default)(raw)
        except (KeyError, ValueError):
            raise ConfigError(f"config argument {key}={raw!r}: expected {type(default).__name__}") from None
        out[key] = value
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:arg]`` by calling its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file {path!r}")
    if file.suffix != ".py":
        raise ConfigError(f"--config: {path} is not a Python file: a config is a .py file defining "
                          f"get_config(arg) (a run's config.json is read by tl-jax eval --workdir)")
    mod_spec = importlib.util.spec_from_file_location(f"tl_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config: {path} defines no get_config(arg)")
        config = module.get_config(arg or None)
    except SyntaxError as e:
        raise ConfigError(f"--config: {path} has a syntax error at line {e.lineno}: {e.msg}") from None
    except (AttributeError, KeyError, TypeError) as e:  # a typo in the file's own code: one line, if it is one
        msg = file_error(e, path)
        if msg is None:
            raise
        raise ConfigError(f"--config: {msg}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config must return an ml_collections.ConfigDict")
    config.lock()
    return normalize(config)


def normalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Spellings with one meaning made one: ``config.data.shots=0`` -> ``None`` (all examples).

    Applied to loaded configs, after overrides and before a run records its config, so a run with
    ``shots=0`` and one with ``shots=null`` are the same run (same ``config.json``, same batches).
    """
    if "data" in config and "shots" in config.data and config.data.shots == 0 \
            and not isinstance(config.data.shots, bool):
        config.data.shots = None
    return config


def _parse_value(raw: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError):
            continue
    return raw


def set_value(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``config.a.b = value`` with schema errors turned into one clear line."""
    *parents, leaf = dotted.split(".")
    group = ".".join(parents)
    if group in FREE_GROUPS:  # model-specific kwargs: any key, checked by the model
        node = config
        for part in parents:
            node = node[part]
        with node.unlocked():
            node[leaf] = value
        return
    if dotted in FREE_GROUPS:
        if not isinstance(value, dict):
            raise ConfigError(f"config.{dotted} must be a dict, got {value!r}{quoting_hint(dotted, value, 'dict')}")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
        return
    node = config
    for i, part in enumerate(parents + [leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key config.{dotted}{did_you_mean(dotted, all_keys(config))}")
        if i < len(parents):
            node = node[part]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise ConfigError(f"config.{dotted} is a group; set its fields (config.{dotted}.KEY=...)")
        for k, v in value.items():
            set_value(config, f"{dotted}.{k}", v)
        return
    if isinstance(current, (list, tuple)) and isinstance(value, tuple):
        value = list(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        with node.ignore_type() if (current is None and not _is_placeholder(node, leaf)) else contextlib.nullcontext():
            node[leaf] = value
    except TypeError:
        expected = _field_type(node, leaf)
        raise ConfigError(f"config.{dotted}: expected {expected}, got {value!r} ({type(value).__name__})"
                          f"{quoting_hint(dotted, value, expected)}") from None


def _is_placeholder(node: ml_collections.ConfigDict, leaf: str) -> bool:
    field = node._fields.get(leaf)  # noqa: SLF001 (ml_collections keeps FieldReferences here)
    return isinstance(field, config_dict.FieldReference)


def _field_type(node: ml_collections.ConfigDict, leaf: str) -> str:
    field = node._fields.get(leaf)  # noqa: SLF001
    if isinstance(field, config_dict.FieldReference):
        return f"{field.get_type().__name__} or None"
    return type(field).__name__


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``['a.b=value', ...]`` (the part after ``--config.``) to a locked config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override --config.{item} needs a value: --config.{item}=VALUE")
        key, raw = item.split("=", 1)
        set_value(config, key, _parse_value(raw))
    return normalize(config)


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(config.to_json())


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a locked config from :func:`to_dict` output (e.g. a workdir's config.json)."""
    config = base_config()
    for k, v in d.items():
        set_value(config, k, v)
    return config


_CHOICES = {
    "train.nan_policy": ("error", "skip"),
    "train.best_mode": ("max", "min"),
    "train.grad_norm_program": ("separate", "cond"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "optimizer.schedule": ("constant", "cosine", "warmup_cosine"),
    "tracking.wandb_mode": ("offline", "online", "disabled"),
    "precision.compute": ("float32", "bfloat16", "float16"),  # tl_jax.models.precision.COMPUTE
    "precision.moments": ("float32", "bfloat16"),  # tl_jax.models.precision.MOMENTS
}
_POSITIVE_INTS = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "data.batch_size", "data.eval_batch_size")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Semantic checks run before a run touches the disk (one clear line each).

    The schema's own checks (choices, positive integers, ranges), then the checks registered
    (:func:`tl_jax.util.config_checks.register_check`) by the modules owning a group: ``config.recipe``,
    ``config.evals``, the head, ``config.train.ema_decay``, ``config.init_map``, the validation set...
    """
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"config.{key} must be one of {choices}, got {_get(config, key)!r}")
    for key in _POSITIVE_INTS:
        value = _get(config, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")
    if config.train.eval_every < 0:
        raise ConfigError(f"config.train.eval_every must be >= 0 (0 = at the end only), got {config.train.eval_every}")
    lr = config.optimizer.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"config.optimizer.learning_rate must be a finite number > 0, got {lr!r}")
    shots = config.data.shots
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise ConfigError(f"config.data.shots must be an int >= 1 per class, or 0 or null for all examples, "
                          f"got {shots!r}")
    mock = config.data.mock_examples
    if mock is not None and (isinstance(mock, bool) or not isinstance(mock, int) or mock < 1):
        raise ConfigError(f"config.data.mock_examples (--mock-data) must be a positive integer, or null for the "
                          f"real data, got {mock!r}")
    if not 0.0 <= config.loss.label_smoothing < 1.0:
        raise ConfigError(f"config.loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    if not 0.0 <= config.model.dropout_rate < 1.0:
        raise ConfigError(f"config.model.dropout_rate must be in [0, 1), got {config.model.dropout_rate}")
    for key in ("data.cache", "data.device_cache", "train.feature_cache", "train.checkpoint_async"):
        if _get(config, key) not in ("auto", True, False) or isinstance(_get(config, key), int) and \
                not isinstance(_get(config, key), bool):
            raise ConfigError(f"config.{key} must be 'auto', true or false, got {_get(config, key)!r}")
    prefetch = config.data.prefetch
    if prefetch != "auto" and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0):
        raise ConfigError(f"config.data.prefetch must be 'auto' or an int >= 0, got {prefetch!r}")
    for key in ("data.cache_max_mb", "data.device_cache_max_mb"):
        if not _get(config, key) > 0:
            raise ConfigError(f"config.{key} must be > 0, got {_get(config, key)}")
    k = config.optimizer.accum_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"config.optimizer.accum_steps must be an int >= 1, got {k!r}")
    if config.data.batch_size % k:
        raise ConfigError(f"config.optimizer.accum_steps={k} must divide config.data.batch_size="
                          f"{config.data.batch_size} (each step splits the batch into {k} equal micro-batches)")
    try:
        run_checks(config)  # the groups' own checks (tl_jax/util/config_checks.py)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
