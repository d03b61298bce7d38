"""Mixed precision at the model-apply boundary (``config.precision``; docs/precision.md).

Policy (jmp's "params float32, compute half, output float32"), for any model
kind: the zoo's linen models, a user's linen module, NNX models behind
:class:`tl_jax.models.nnx.bridge.NNXModel`. :class:`MixedPrecision` wraps the
run's model once (``tl_jax.train.build.build_model_and_state``) and every
``apply`` then

* casts the floating leaves of ``variables['params']`` and of the inputs
  (images, float masks; token ids stay integers) to the compute dtype ``c``;
* passes BatchNorm statistics in as they are (float32: a running average
  ``m <- 0.9 m + 0.1 mean_batch`` kept in bfloat16 would round to 8
  significant bits at every step, and it is what eval normalises with);
* casts every floating leaf it returns (logits, features, intermediates, the
  updated ``batch_stats``) to float32, so losses, metrics and statistics are
  computed in float32.

``state.params`` therefore stay float32, and since ``d cast(p)/dp`` is the
identity, the gradient of a float32 loss w.r.t. the float32 params arrives in
float32: the optimizer update ``p <- p - lr * u`` accumulates in float32,
where an update of relative size < 2^-9 would be lost in bfloat16 params.

Layers that pin their computation dtype (flax's ``dtype=jnp.float32``, as the
zoo's models do by default) would promote the cast params back to float32, so
a model whose factory takes ``dtype`` is also built with ``dtype=c``
(:func:`model_kwargs`; ``config.model.kwargs.dtype`` wins). A user's module
whose layers leave ``dtype=None`` (flax's default) computes in the dtype of its
inputs and params, i.e. in ``c``.

float16 has bfloat16's mantissa plus 3 bits but a range of 6e-8 .. 65504, and no
loss scaling is applied: small gradients inside the model may flush to zero.
Prefer bfloat16 (GPUs from Ampere on, TPUs). CPUs have no bfloat16 arithmetic:
XLA emulates it there (slower than float32); the setting is for accelerators.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models.registry import accepted_kwargs

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COMPUTE = ("float32", "bfloat16", "float16")
MOMENTS = ("float32", "bfloat16")


def check(precision: Mapping[str, Any]) -> None:
    """Raise one line (naming the key) unless ``precision`` (``config.precision``) holds known dtypes."""
    for key, allowed in (("compute", COMPUTE), ("moments", MOMENTS)):
        value = precision[key]
        if value not in allowed:
            raise ValueError(f"config.precision.{key} must be one of {allowed}, got {value!r}")


def compute_dtype(precision: Mapping[str, Any]) -> Any:
    """The compute dtype of ``config.precision`` (``jnp.float32`` when off)."""
    check(precision)
    return DTYPES[precision["compute"]]


def moments_dtype(precision: Mapping[str, Any]) -> Any:
    """Dtype of the optimizer's first moments (Adam's ``mu``, SGD's momentum); ``None`` = the params' (float32)."""
    check(precision)
    return None if precision["moments"] == "float32" else DTYPES[precision["moments"]]


def model_kwargs(model_cfg: Mapping[str, Any], precision: Mapping[str, Any]) -> dict:
    """``{'dtype': c}`` for :func:`tl_jax.models.model_from_config` when the model computes in ``c`` != float32
    and its factory takes ``dtype`` (not given in ``config.model.kwargs``); else ``{}``."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32 or "dtype" in dict(model_cfg.get("kwargs") or {}):
        return {}
    return {"dtype": dtype} if "dtype" in accepted_kwargs(model_cfg["name"]) else {}


def _cast(tree: PyTree, dtype: Any) -> PyTree:
    """``tree`` with its floating array leaves cast to ``dtype`` (other leaves, e.g. ints, keys, flags, as they are)."""

    def one(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


class MixedPrecision:
    """``module`` (linen or :class:`~tl_jax.models.nnx.bridge.NNXModel`) applied under the policy above.

    ``init`` is the module's own (float32 params); ``apply`` casts as described in
    the module docstring; ``clone(**changes)`` clones the module and keeps the
    policy; any other attribute (``frozen_norms``, ``num_classes``,
    ``norm_module_paths``, ...) is the module's.
    """

    wraps_module = True  # unwrap() sees through it

    def __init__(self, module: Any, dtype: Any):
        self.module = module
        self.dtype = jnp.dtype(dtype)

    def init(self, *args: Any, **kwargs: Any) -> PyTree:
        return self.module.init(*args, **kwargs)

    def apply(self, variables: Mapping[str, PyTree], *args: Any, rngs: Any = None, **kwargs: Any) -> Any:
        variables = {**variables, "params": _cast(variables["params"], self.dtype)}
        args, kwargs = _cast((args, kwargs), self.dtype)
        out = self.module.apply(variables, *args, rngs=rngs, **kwargs)
        return _cast(out, jnp.float32)

    def clone(self, **changes: Any) -> "MixedPrecision":
        return MixedPrecision(self.module.clone(**changes), self.dtype)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "module":  # copy/pickle probes; `module` unset while unpickling
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"MixedPrecision({self.module!r}, compute={self.dtype.name})"


def wrap(model: Any, precision: Mapping[str, Any]) -> Any:
    """``model`` under ``config.precision``'s policy: itself for float32 compute, else :class:`MixedPrecision`."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return model
    return MixedPrecision(model.module if isinstance(model, MixedPrecision) else model, dtype)


def unwrap(model: Any) -> Any:
    """The linen/NNX module inside the run's model wrappers: :class:`MixedPrecision` and the other classes with
    ``wraps_module = True`` holding it as ``.module`` (LoRA: :class:`tl_jax.peft.lora.LoraModel`); ``model``
    itself otherwise."""
    while getattr(type(model), "wraps_module", False):
        model = model.module
    return model
