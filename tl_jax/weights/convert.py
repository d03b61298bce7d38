"""Convert a weights file into a tl_jax checkpoint usable as ``config.init_from``.

``convert_weights(source, mapping=..., model=..., out=...)``:

1. reads every tensor of ``source`` (:mod:`tl_jax.weights.readers`);
2. builds the target model ``get_model(model, num_classes, **kwargs)`` with
   ``kwargs`` read from the tensors by the mapping, overridden by
   ``model_kwargs``, and takes its variable shapes (``jax.eval_shape``, no init);
3. maps each source tensor to one ``params/...`` or ``batch_stats/...`` path
   (:mod:`tl_jax.weights.mappings`), transposing as needed;
4. refuses, with ONE error listing every problem, a source tensor left unused
   (no rule, or a path the model lacks), a shape mismatch, two tensors for one
   path, or a target variable left unfilled. ``head/*`` is a target only when
   the source has a classifier (then ``num_classes`` comes from it, and an
   MLP head, ``head_hidden`` in ``model_kwargs``, is refused: the classifier
   is one linear layer); without one the head, linear or MLP, is left to its
   fresh init. Buffers and names matched by ``ignore`` regexes are dropped on
   purpose;
5. writes ``out/state`` (orbax, ``{'params', 'batch_stats'}``), the layout
   :func:`tl_jax.train.checkpoint.load_variables` reads, and
   ``out/tl_jax_weights.json`` (model name, kwargs, what was dropped).

Sources recognised from the files themselves (``mapping=None``, no flags): each
format module registers ``(detect, convert)`` with :func:`register_source`
(issue 30: Hugging Face model folders in :mod:`tl_jax.weights.hf_vision` (H7);
Hugging Face ConvNeXt folders (:mod:`tl_jax.weights.convnext`), timm folders or files
(:mod:`tl_jax.weights.timm_source`), open_clip towers (:mod:`tl_jax.weights.open_clip_source`) and
big_vision ``.npz`` (:mod:`tl_jax.weights.big_vision_source`) register theirs the same way; the order of
registration is the order of the imports in :mod:`tl_jax.weights`, first match wins).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from tl_jax.models import get_model
from tl_jax.params.param_rules import flatten_paths
from tl_jax.weights.mappings import MAPPINGS, TRANSFORMS, Mapping, relayout
from tl_jax.weights.readers import detached, detect_format, read_tensors

META_FILE = "tl_jax_weights.json"
# name -> (detect(path) -> bool, convert(path, *, out, model_kwargs, num_classes, ignore, overwrite) -> Converted)
SOURCES: dict[str, tuple[Callable[[pathlib.Path], bool], Callable[..., "Converted"]]] = {}


def register_source(name: str, detect: Callable[[pathlib.Path], bool], convert: Callable[..., "Converted"]) -> None:
    """Make ``convert_weights(path, mapping=None)`` hand ``path`` to ``convert`` when ``detect(path)``."""
    SOURCES[name] = (detect, convert)


def detect_source(path: str | pathlib.Path) -> str | None:
    """The registered source format that recognises ``path`` (first in registration order), or None."""
    path = pathlib.Path(path)
    return next((name for name, (detect, _) in SOURCES.items() if detect(path)), None)


class WeightMappingError(ValueError):
    """Source tensors and target variables do not correspond one to one."""


@dataclasses.dataclass(frozen=True)
class Converted:
    """Result of :func:`convert_weights`: where it went and how to build the model for it."""

    out: pathlib.Path | None
    model: str
    num_classes: int
    model_kwargs: dict
    variables: dict
    dropped: tuple[str, ...]

    def summary(self) -> str:
        n = sum(int(np.prod(np.shape(v))) for v in flatten_paths(self.variables).values())
        where = f" -> {self.out}" if self.out else ""
        return (f"converted {len(flatten_paths(self.variables))} tensors ({n:,} values){where}; use "
                f"--config.model.name={self.model} --config.model.kwargs='{json.dumps(self.model_kwargs)}'"
                f"{' --config.init_from=' + str(self.out) if self.out else ''}"
                + (f"; dropped on purpose: {list(self.dropped)}" if self.dropped else ""))


REPEATED_BLOCK = {"vit": "/backbone/encoderblock_"}  # model -> the path part of its identical, numbered blocks


def target_shapes(model_name: str, num_classes: int, kwargs: dict, sample: tuple[tuple, dict]) -> dict:
    """``{'params/...': ShapeDtypeStruct, 'batch_stats/...': ...}`` of the model (no FLOPs spent).

    Tracing ``init`` costs time per layer (1.5 s of a ViT-B/16's conversion), so a model of
    :data:`REPEATED_BLOCK` with ``depth`` blocks of one shape is traced with ONE block and block 0's
    entries are repeated for blocks ``1 .. depth-1`` (the same shapes the full trace gives: tested).
    """
    block, depth = REPEATED_BLOCK.get(model_name), int(kwargs.get("depth") or 0)
    if block is None or depth <= 1:
        return _traced_shapes(model_name, num_classes, kwargs, sample)
    one = _traced_shapes(model_name, num_classes, {**kwargs, "depth": 1}, sample)
    out = {}
    for path, spec in one.items():
        out[path] = spec
        if f"{block}0/" in path:
            out.update({path.replace(f"{block}0/", f"{block}{i}/"): spec for i in range(1, depth)})
    return dict(sorted(out.items()))  # flatten_paths' order (sorted names), as the full trace gives


def _traced_shapes(model_name: str, num_classes: int, kwargs: dict, sample: tuple[tuple, dict]) -> dict:
    model = get_model(model_name, num_classes, **kwargs)
    args, kw = sample
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False, **kw))
    return flatten_paths({k: v for k, v in variables.items() if k in ("params", "batch_stats")})


def map_tensors(tensors: dict[str, np.ndarray], mapping: Mapping, targets: dict[str, Any],
                ignore: Sequence[str] = (), source: str = "source",
                layout: Callable[[str, np.ndarray], np.ndarray] | None = None
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps ``tensors`` onto ``targets``; returns ``(flat variables, dropped names)``.

    Each mapped tensor is brought to flax's layout by ``layout(rule.transform, x)`` (default:
    :data:`~tl_jax.weights.mappings.TRANSFORMS`), on every core (:func:`~tl_jax.weights.mappings.relayout`).

    Raises:
      WeightMappingError: listing unused source tensors, shape mismatches,
        duplicates, unfilled targets and ``ignore`` regexes matching nothing.
    """
    patterns = [re.compile(p) for p in ignore]
    problems, dropped = [], []
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    claimed: set[str] = set()  # target paths some source tensor went to (filled or mismatched)
    kept = [k for k in tensors if not mapping.is_buffer(k) and not any(rx.fullmatch(k) for rx in patterns)]
    has_head = any((t := mapping.target(k)) and t[0].startswith("params/head/") for k in kept)
    for rx in patterns:
        if not any(rx.fullmatch(k) for k in tensors):
            problems.append(f"ignore rule {rx.pattern!r} matches no source tensor")
    hits: dict[str, tuple[str, str]] = {}
    for name, value in tensors.items():
        shape = tuple(np.shape(value))
        if mapping.is_buffer(name) or any(rx.fullmatch(name) for rx in patterns):
            dropped.append(name)
            continue
        hit = mapping.target(name)
        if hit is None:
            problems.append(f"unused source tensor {name} {shape}: no rule of mapping {mapping.name!r}")
        elif hit[0] not in targets:
            problems.append(f"unused source tensor {name} {shape}: maps to {hit[0]}, which the model lacks")
        else:
            hits[name] = hit
    to_flax = layout or (lambda kind, x: TRANSFORMS[kind](x))
    arrays = relayout({name: tensors[name] for name in hits}, lambda name, x: to_flax(hits[name][1], np.asarray(x)))
    for name, array in arrays.items():
        path, shape = hits[name][0], tuple(np.shape(tensors[name]))
        want = tuple(targets[path].shape)
        claimed.add(path)
        if array.shape != want:
            problems.append(f"shape mismatch: {name} {shape} -> {path} {array.shape}, model expects {want}")
        elif path in out:
            problems.append(f"duplicate: {origin[path]} and {name} both map to {path}")
        else:
            out[path] = detached(array.astype(targets[path].dtype, copy=False))  # copied once at most
            origin[path] = name
    for path, spec in targets.items():
        if path not in claimed and (has_head or not path.startswith("params/head/")):
            problems.append(f"unfilled target {path} {tuple(spec.shape)}: no source tensor maps to it")
    if problems:
        hint = "; pass --ignore REGEX to drop source tensors on purpose" if any("unused" in p for p in problems) \
            else ""
        raise WeightMappingError(f"cannot map {source} with mapping {mapping.name!r} ({len(problems)} problem(s)"
                                 f"{hint}):\n  " + "\n  ".join(problems))
    return out, dropped


def convert_weights(
    source: str | pathlib.Path,
    *,
    mapping: str | None = None,
    model: str | None = None,
    out: str | pathlib.Path | None,
    fmt: str | None = None,
    model_kwargs: dict | None = None,
    num_classes: int | None = None,
    ignore: Sequence[str] = (),
    overwrite: bool = False,
) -> Converted:
    """Converts ``source`` for model ``model`` and writes it to ``out`` (see module doc; None: no write).

    ``mapping=None``: the source is recognised by a registered format (:data:`SOURCES`), which
    also picks the model (``model`` must then be None or the one it picks).

    Raises:
      WeightMappingError: the tensors and the model's variables do not correspond.
      ValueError / FileNotFoundError: unknown mapping or model, unreadable file, ``out`` exists.
    """
    if mapping is None:
        return _convert_detected(pathlib.Path(source), model=model, out=out, model_kwargs=model_kwargs,
                                 num_classes=num_classes, ignore=ignore, overwrite=overwrite)
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}; known: {sorted(MAPPINGS)}")
    m = MAPPINGS[mapping]
    if model not in m.models:
        raise ValueError(f"mapping {mapping!r} converts into models {list(m.models)}, not {model!r}")
    source = pathlib.Path(source)
    fmt = fmt or detect_format(source)
    tensors = read_tensors(source, fmt)
    kwargs = {**m.infer_kwargs(tensors, source), **(model_kwargs or {})}
    heads = [k for k in tensors if (t := m.target(k)) and t[0] == "params/head/bias"
             and not any(re.fullmatch(rx, k) for rx in ignore)]
    if heads:
        n_src = int(np.shape(tensors[heads[0]])[0])
        if num_classes is not None and num_classes != n_src:
            raise ValueError(f"num_classes={num_classes} but the classifier {heads[0]} of {source} has {n_src} "
                             "outputs; leave num_classes out, or --ignore the classifier tensors")
        num_classes = n_src
        if kwargs.get("head_hidden"):
            raise ValueError(f"the classifier {heads[0]} of {source} is a linear head (head/kernel) but "
                             f"head_hidden={list(kwargs['head_hidden'])} builds an MLP head: --ignore the "
                             "classifier tensors to keep the MLP head at its fresh init, or drop head_hidden")
    num_classes = num_classes or 1  # no head in the source: the head is not converted
    targets = target_shapes(model, num_classes, kwargs, m.sample_input(tensors, kwargs))
    flat, dropped = map_tensors(tensors, m, targets, ignore, source=str(source))
    variables = traverse_util.unflatten_dict(flat, sep="/")
    result = Converted(None, model, num_classes, kwargs, variables, tuple(dropped))
    if out is None:
        return result
    out = pathlib.Path(out).absolute()
    save_variables(out, variables, overwrite=overwrite)
    meta = {"source": str(source.absolute()), "format": fmt, "mapping": mapping, "model": model,
            "num_classes": num_classes, "has_head": bool(heads), "model_kwargs": kwargs, "dropped": dropped}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return dataclasses.replace(result, out=out)


def _convert_detected(source: pathlib.Path, *, model: str | None, **kwargs: Any) -> Converted:
    name = detect_source(source)
    if name is None:
        raise ValueError(f"cannot tell what {source} is (known sources: {list(SOURCES)}); pass --mapping "
                         f"{sorted(MAPPINGS)} and --model for a bare weights file, or --timm-name ARCH for a "
                         f"timm file without its config.json")
    convert = SOURCES[name][1]
    if model is not None:  # checked before anything is written (a dry run: model building is abstract)
        picked = convert(source, **{**kwargs, "out": None}).model
        if model != picked:
            raise ValueError(f"{source} is a {name} source converted into model {picked!r}, not --model {model!r}")
    return convert(source, **kwargs)


def save_variables(out: pathlib.Path, variables: dict, *, overwrite: bool = False) -> None:
    """Writes ``{'params', 'batch_stats'}`` as the orbax item ``out/state`` (what ``init_from`` reads)."""
    import orbax.checkpoint as ocp

    if out.exists():
        if not overwrite:
            raise ValueError(f"output {out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {k: variables[k] for k in ("params", "batch_stats") if variables.get(k)}
    # Synchronous, so the arrays need no defensive copy (orbax deep-copies host arrays by default: 0.9 s of a
    # ViT-B/16's save), and uncompressed (zstd finds ~8% in float weights and costs 2-3x the write).
    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               *((t, th.ScalarHandler()) for t in (int, float, np.number)))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(out / "state", args=ocp.args.PyTreeSave(state))
