"""The model registry: names and references -> models (``config.model.name``).

* :data:`MODELS` maps a name to a factory; :func:`register` adds one.
* :func:`get_model` builds ``factory(num_classes=N, **kwargs)``: a linen module, or an
  NNX module (the factory takes ``rngs``) behind :class:`~tl_jax.models.nnx.bridge.NNXModel`,
  so both look alike to the rest of tl_jax; :func:`model_from_config` does so from a
  config's ``model`` group.
* :func:`check_logits` checks, abstractly, that a model maps a batch to logits ``[B, C]``.
* :func:`norm_paths`, :func:`has_batch_stats`: BatchNorm paths of a ``batch_stats`` tree.

A name is a key of :data:`MODELS` or an import reference (``package.module:factory`` /
``path/to/file.py:factory``, :mod:`tl_jax.util.references`). The own-model contract
(what a model must accept and return for each feature) is in docs/models.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from tl_jax.models.bert import Bert
from tl_jax.models.cnn import CNN
from tl_jax.models.heads import head_kwargs
from tl_jax.models.inputs import model_inputs
from tl_jax.models.nnx.bridge import NNXModel
from tl_jax.models.nnx.cnn import CNNNNX
from tl_jax.models.nnx.resnet import ResNet18NNX
from tl_jax.models.resnet import ResNet18, ResNet50
from tl_jax.models.vit import ViT
from tl_jax.util import references

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vit": ViT,
    "bert": Bert,
    "cnn_nnx": CNNNNX,  # Flax NNX twins (factories taking rngs: wrapped in nnx_bridge.NNXModel)
    "resnet18_nnx": ResNet18NNX,
}

_RESERVED = {"parent", "name", "num_classes"}


def accepted(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``factory`` accepts besides ``num_classes`` (``None``: any, it takes ``**kwargs``).

    Linen classes: their init fields; functions and NNX classes: their (``__init__``'s) parameters
    less ``rngs`` (:func:`tl_jax.util.references.parameters`).
    """
    fixed: set[str] = set()
    if isinstance(factory, functools.partial):
        fixed = set(factory.keywords)
        factory = factory.func
    if dataclasses.is_dataclass(factory):
        names = {f.name for f in dataclasses.fields(factory) if f.init}
    else:
        names, takes_any = references.parameters(factory)
        if takes_any:
            return None
    return names - _RESERVED - {"rngs", "self"} - fixed


def accepted_kwargs(name: str) -> list[str]:
    """Keyword arguments ``get_model(name, ...)`` accepts (besides num_classes)."""
    return sorted(accepted(_factory(name)) or [])


def register(name: str, *, overwrite: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a model factory selectable as ``config.model.name = name``.

    The factory is called as ``factory(num_classes=N, **config.model.kwargs)``
    and returns a linen module, or, when it accepts ``rngs``, builds a Flax NNX
    module (``factory(num_classes=N, rngs=nnx.Rngs(...), **kwargs)``)::

        @tl_jax.models.register("my_cnn")
        def my_cnn(num_classes: int, width: int = 1) -> nn.Module: ...

    A name registered in your own module is known where that module is
    imported; the CLI and other processes rebuild it only if they import it
    too, so for them prefer a reference (``config.model.name='my_models.py:my_cnn'``).

    Raises:
        ValueError: ``name`` is already taken (unless ``overwrite``) or looks like a reference.
    """
    if not isinstance(name, str) or not name or references.is_reference(name):
        raise ValueError(f"model name must be a non-empty string without ':', got {name!r}")

    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in MODELS and not overwrite and MODELS[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered ({MODELS[name]!r}); "
                             f"pick another name or pass overwrite=True")
        MODELS[name] = factory
        return factory

    return add


# Keyword arguments every run passes; a factory that does not accept one gets it only when it is not the default.
_RUN_DEFAULTS = {"dropout_rate": 0.0}


def _factory(name: str) -> Callable[..., Any]:
    if references.is_reference(name):
        return references.resolve(name, "config.model.name")
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r} (config.model.name); known models: {sorted(MODELS)}, "
            f"or a reference 'package.module:factory' / 'path/to/file.py:factory'"
        )
    return MODELS[name]


def get_model(name: str, num_classes: int, **kwargs: Any) -> Any:
    """Build model ``name`` with ``num_classes`` logits.

    ``name`` is a key of :data:`MODELS` (see :func:`register`) or an import
    reference ``package.module:factory`` / ``path/to/file.py:factory``
    (:mod:`tl_jax.util.references`). A factory that accepts ``rngs`` builds a
    Flax NNX module, returned wrapped in :class:`tl_jax.models.nnx.bridge.NNXModel`
    (linen's ``init``/``apply`` on path-keyed pytrees, so param rules,
    ``merge_params``, checkpoints and sharding treat both forms alike).

    Raises:
        ValueError: unknown ``name`` or reference, a keyword argument the model
            does not accept, a factory that raised (its message included) or
            that returned something that is not a Flax module.
    """
    factory = _factory(name)
    known = accepted(factory)
    for key, default in _RUN_DEFAULTS.items():
        if known is not None and key not in known and kwargs.get(key, default) == default:
            kwargs.pop(key, None)
    if known is not None:
        bad = sorted(set(kwargs) - known)
        if any(k.startswith("head_") for k in bad):
            raise ValueError(f"config.model.head: model {name!r} has no configurable head (its factory takes no "
                             f"{', '.join(k for k in bad if k.startswith('head_'))}); leave config.model.head.hidden "
                             f"empty")
        if bad:
            raise ValueError(
                f"model {name!r} got unknown keyword argument(s) {bad} (config.model.kwargs); "
                f"accepted: {sorted(known)}"
            )
    if "frozen_norms" in kwargs:
        kwargs["frozen_norms"] = tuple(kwargs["frozen_norms"])
    if references.takes_rngs(factory):  # Flax NNX
        return NNXModel(lambda rngs: factory(num_classes=num_classes, rngs=rngs, **kwargs), num_classes=num_classes,
                        name=name)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except Exception as e:  # noqa: BLE001 - the factory is user code: its message, one line
        raise ValueError(f"config.model.name={name!r}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        hint = (" (an NNX module: its factory must accept an `rngs` argument)"
                if type(model).__module__.startswith("flax.nnx") or _is_nnx(model) else "")
        raise ValueError(f"config.model.name={name!r}: the factory returned an object of type {type(model).__name__}, "
                         f"not a Flax module{hint}")
    return model


def model_from_config(model_cfg: Mapping[str, Any], num_classes: int | None = None, **overrides: Any) -> Any:
    """The model of a config's ``model`` group (a ConfigDict or a ``config.json`` dict).

    ``num_classes`` defaults to the group's; ``overrides`` win over its kwargs.
    """
    cfg = dict(model_cfg)
    n = num_classes if num_classes is not None else cfg.get("num_classes")
    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.get("dropout_rate"):
        kwargs["dropout_rate"] = cfg["dropout_rate"]
    if cfg.get("head"):
        kwargs.update(head_kwargs(cfg))
    kwargs.update(overrides)
    return get_model(cfg["name"], n, **kwargs)


def check_logits(model: Any, rng: Any, sample: Mapping[str, Any], num_classes: int, name: str) -> None:
    """Raise one line unless ``model`` maps a batch of one to float logits ``[1, num_classes]``.

    Abstract evaluation (``jax.eval_shape``): no params are allocated. ``sample`` is a batch of
    one (``{'image': [1, H, W, C], ...}``); ``name`` is the ``config.model.name`` to report.
    """
    args, kw = model_inputs(sample)

    def forward(r):
        variables = model.init(r, *args, train=False, **kw)
        return model.apply(variables, *args, train=False, **kw)

    try:
        out = jax.eval_shape(forward, rng)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed on the data: say so in one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"config.model.name={name!r}: the model failed on a batch of shape "
                         f"{ {k: tuple(v.shape) for k, v in sample.items()} }: {type(e).__name__}: {first}") from None
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != (1, num_classes) or not jnp.issubdtype(dtype, jnp.floating):
        got = f"shape {shape} {dtype}" if shape is not None else f"a {type(out).__name__}"
        raise ValueError(f"config.model.name={name!r}: the model must return float logits [B, num_classes] = "
                         f"[1, {num_classes}] for a batch of one; got {got}")


def _is_nnx(obj: Any) -> bool:
    return isinstance(obj, nnx.Module)


def norm_paths(batch_stats: Mapping[str, Any]) -> list[str]:
    """'/'-joined paths of the BatchNorm modules in a ``batch_stats`` tree.

    A BN module is a dict holding ``'mean'`` and ``'var'``; e.g. returns
    ``['backbone/bn1', 'backbone/layer1_0/bn1', ...]`` (tree order). A full
    variables dict (with a top-level ``'batch_stats'`` key) is also accepted.
    """
    if "batch_stats" in batch_stats and "mean" not in batch_stats:
        batch_stats = batch_stats["batch_stats"]
    out: list[str] = []

    def walk(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        if "mean" in tree and "var" in tree:
            out.append("/".join(prefix))
            return
        for key, sub in tree.items():
            if isinstance(sub, Mapping):
                walk(sub, prefix + (key,))

    walk(batch_stats, ())
    return out


def has_batch_stats(variables: Mapping[str, Any]) -> bool:
    """Whether ``variables`` holds a non-empty ``'batch_stats'`` collection."""
    return bool(variables.get("batch_stats"))
