"""The own-model contract: what a model must provide for each feature (docs/models.md#the-own-model-contract).

* Plain training, eval, predict: logits ``[B, num_classes]`` from the input
  (linen: ``__call__(x, *, train=False)``; NNX: ``__call__(x)``, its modes set by the bridge).
* Features (``tl-jax rank`` / ``fewshot`` ``--layer features``, the domain-adaptation and
  fine-tuning methods, distillation hints): either ``__call__`` accepts ``return_features``
  and returns ``(logits, features [B, D])`` (the zoo's :class:`~tl_jax.models.layers.Classifier`),
  or the model has a ``backbone``/``head`` split: submodules named ``backbone`` and ``head``
  (params ``backbone/...``, ``head/...``), the backbone called once per forward pass on
  the input; its output is then the features (:func:`apply_split` records it).
* The cached linear-probe path (:mod:`tl_jax.train.feature_cache`): the same split; the
  run's ``__call__`` is then applied with the backbone's output replaced by the cached
  features (:func:`apply_split` with ``features=``), so whatever the model does between
  backbone and head (pooling, dropout) still runs.

Recording works on linen modules (``nn.intercept_methods`` on the submodule at path
``('backbone',)``, defined in ``setup`` or inline in ``@nn.compact``) and on NNX modules
behind :class:`~tl_jax.models.nnx.bridge.NNXModel` (the ``backbone`` attribute of the
per-call copy of the module is swapped for a recorder during the call).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

from tl_jax.models.nnx.bridge import NNXModel
from tl_jax.models.precision import unwrap

CONTRACT = "docs/models.md#the-own-model-contract"
BACKBONE, HEAD = "backbone", "head"


def has_split(params: Mapping[str, Any]) -> bool:
    """Whether a params tree has top-level ``backbone`` and ``head`` subtrees (the split's param paths)."""
    return BACKBONE in params and HEAD in params


def module_class(model: Any) -> type:
    """The class whose ``__call__`` runs: a linen module's own, or the NNX module's behind the bridge."""
    model = unwrap(model)
    return model.module_type() if isinstance(model, NNXModel) else type(model)


def takes_return_features(model: Any) -> bool:
    """Whether the model's ``__call__`` accepts ``return_features`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(module_class(model).__call__).parameters
    return "return_features" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def no_features_message(name: str, flag_hint: str = "") -> str:
    """One line: model ``name`` gives no features, what the contract asks, and ``flag_hint`` (e.g. the other
    ``--layer`` choices of the command that needed them)."""
    hint = f"; {flag_hint}" if flag_hint else ""
    return (f"model {name} gives no features: its __call__ takes no `return_features` and it has no `backbone` "
            f"and `head` submodules (the own-model contract, {CONTRACT}){hint}")


class _Slot:
    """Where the backbone's output goes (``recorded``) or comes from (``replacement``), and how often it ran."""

    def __init__(self, replacement: Any = None):
        self.replacement = replacement
        self.recorded: Any = None
        self.calls = 0

    def run(self, call: Callable[[], Any]) -> Any:
        self.calls += 1
        if self.replacement is not None:
            return self.replacement
        self.recorded = call()
        return self.recorded


def _linen_interceptor(slot: _Slot):
    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == (BACKBONE,):
            return slot.run(lambda: next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    return intercept


def _nnx_method(slot: _Slot, method: Callable | None) -> Callable:
    """``fn(module, *args, **kwargs)`` for :meth:`NNXModel.apply`: the call with ``module.backbone`` routed
    through ``slot`` (the module is the bridge's per-call copy; the attribute is put back afterwards)."""

    def fn(module, *args, **kwargs):
        slot.calls, slot.recorded = 0, None  # the bridge may first run fn abstractly to build its definition
        real = getattr(module, BACKBONE, None)
        if real is None:
            raise ValueError(f"the NNX module {type(module).__name__} has no `backbone` attribute ({CONTRACT})")
        object.__setattr__(module, BACKBONE, lambda *a, **k: slot.run(lambda: real(*a, **k)))
        try:
            return module(*args, **kwargs) if method is None else method(module, *args, **kwargs)
        finally:
            object.__setattr__(module, BACKBONE, real)

    return fn


def apply_split(model: Any, variables: Mapping[str, Any], *args: Any, features: Any = None,
                **apply_kwargs: Any) -> tuple[Any, Any]:
    """``(model.apply(variables, *args, **apply_kwargs), backbone output)``.

    With ``features`` given, the backbone does not run: its output is ``features`` (``[B, D]``), and the
    returned second item is ``features``. Works under ``jax.jit``. ``model`` may be wrapped by
    :class:`tl_jax.models.precision.MixedPrecision` (its ``apply`` is the one called).

    Raises:
        ValueError: the model has no ``backbone`` submodule, or called it other than once (one line,
            naming the contract).
    """
    slot = _Slot(features)
    inner = unwrap(model)
    if isinstance(inner, NNXModel):
        method = apply_kwargs.pop("method", None)
        out = model.apply(variables, *args, method=_nnx_method(slot, method), **apply_kwargs)
    elif isinstance(inner, nn.Module):
        with nn.intercept_methods(_linen_interceptor(slot)):
            out = model.apply(variables, *args, **apply_kwargs)
    else:
        raise ValueError(f"a backbone/head split needs a linen or NNX model, got {type(inner).__name__}")
    if slot.calls != 1:
        raise ValueError(f"model {module_class(model).__name__}: "
                         f"its `backbone` submodule ran {slot.calls} times in one forward pass; the "
                         f"backbone/head split needs exactly one call ({CONTRACT})")
    return out, (features if features is not None else slot.recorded)


def logits_and_features(model: Any, variables: Mapping[str, Any], *args: Any, **apply_kwargs: Any
                        ) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, C], features [B, D])`` by ``return_features=True`` when ``__call__`` takes it, else the
    backbone's output through the split (:func:`apply_split`). No ``mutable``: eval-style calls only."""
    if takes_return_features(model):
        return model.apply(variables, *args, return_features=True, **apply_kwargs)
    return apply_split(model, variables, *args, **apply_kwargs)
