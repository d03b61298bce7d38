"""Classifier heads: a linear layer (the default) or a small MLP, chosen by config.

``config.model.head`` (declared in :func:`tl_jax.config.base_config`)::

    hidden: [1024]        # widths of the hidden layers; [] = linear head (default)
    activation: 'relu'    # after each hidden layer: a name of ACTIVATIONS
    dropout: 0.0          # dropout after each hidden activation (train mode only)

is turned into :class:`~tl_jax.models.layers.Classifier` keyword arguments by
:func:`head_kwargs` (``head_hidden``, ``head_activation``, ``head_dropout``) and
built by :func:`make_head`:

* ``hidden=[]``: ``nn.Dense(num_classes)``, params ``head/{kernel,bias}``
  (the layout of every checkpoint written before heads were configurable);
* ``hidden=[h_0, ..., h_{k-1}]``: :class:`MLPHead`, for features ``f`` ``[B, D]``::

      a_0 = dropout(act(f @ W_0 + b_0))          W_0: [D, h_0]
      a_i = dropout(act(a_{i-1} @ W_i + b_i))    W_i: [h_{i-1}, h_i]
      logits = a_{k-1} @ W_L + b_L               W_L: [h_{k-1}, num_classes]

  with params ``head/hidden_<i>/{kernel,bias}`` and ``head/logits/{kernel,bias}``
  (e.g. Keras' ``GlobalAveragePooling -> Dense(1024, relu) -> Dense(n)`` on a
  ResNet-50 is ``hidden=[1024]``).

:func:`logits_layer` finds the last layer's ``{kernel, bias}`` in either layout
(zero-initialising a residual head), :func:`head_dims` a head's feature size
and class count.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.util import config_checks

KEY = "config.model.head"
LOGITS = "logits"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact erf GELU (PyTorch / Keras default)
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,  # slope 0.01
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name``; one-line ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{KEY}.activation: unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_head_options(hidden: Any, activation: Any, dropout: Any) -> tuple[int, ...]:
    """Validate head options (one-line ValueError naming ``config.model.head.*``); returns ``hidden`` as a tuple."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"{KEY}.hidden must be a list of positive ints (layer widths; [] = linear head), "
                         f"got {hidden!r}")
    for i, width in enumerate(hidden):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{KEY}.hidden[{i}] must be a positive int (a layer width), got {width!r}")
    get_activation(activation)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not math.isfinite(dropout) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{KEY}.dropout must be a number in [0, 1), got {dropout!r}")
    return tuple(int(w) for w in hidden)


def check_config(config: Any) -> None:
    """``config.model.head`` (:func:`check_head_options`); run by :func:`tl_jax.config.validate`."""
    head = config.model.head
    check_head_options(head.hidden, head.activation, head.dropout)


config_checks.register_check("model.head", check_config)


class MLPHead(nn.Module):
    """Features ``[B, D]`` -> logits ``[B, num_classes]`` through ``len(hidden)`` hidden layers (module doc).

    Dropout (rng stream ``'dropout'``, rate ``dropout``) follows each hidden
    activation and is active only when ``deterministic=False``. Params are
    float32; computation is in ``dtype``.
    """

    hidden: tuple[int, ...]
    num_classes: int
    activation: str = "relu"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        act = get_activation(self.activation)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f"hidden_{i}")(x)
            x = nn.Dropout(rate=self.dropout, name=f"dropout_{i}")(act(x), deterministic=deterministic)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name=LOGITS)(x)


def make_head(num_classes: int, hidden: Sequence[int] = (), activation: str = "relu", dropout: float = 0.0,
              dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """``nn.Dense(num_classes)`` when ``hidden`` is empty, else an :class:`MLPHead` (options validated).

    Call the result through :func:`call_head` so that the MLP's dropout knows the mode.
    """
    hidden = check_head_options(hidden, activation, dropout)
    if not hidden:
        return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name=name)
    return MLPHead(hidden, num_classes, activation, float(dropout), dtype, name=name)


def call_head(head: nn.Module, x: jax.Array, *, train: bool) -> jax.Array:
    """``head(x)``, with the MLP head's dropout active only when ``train``."""
    if isinstance(head, MLPHead):
        return head(x, deterministic=not train)
    return head(x)


def head_kwargs(model_cfg: Mapping[str, Any]) -> dict:
    """Classifier kwargs of ``config.model``'s ``head`` group (``{}`` for the default linear head).

    ``{'head_hidden': (1024,), 'head_activation': 'relu', 'head_dropout': 0.0}``
    for ``hidden=[1024]``; a config without a ``head`` group (older
    ``config.json``) or with ``hidden=[]`` gives ``{}``, so the model kwargs of
    old configs are unchanged. Options are validated; setting the head both in
    ``config.model.head`` and as ``head_*`` entries of ``config.model.kwargs``
    is an error.
    """
    group = model_cfg.get("head") if hasattr(model_cfg, "get") else None
    if not group:
        return {}
    hidden = check_head_options(list(group.get("hidden", [])), group.get("activation", "relu"),
                                group.get("dropout", 0.0))
    if not hidden:
        return {}
    dup = sorted(k for k in (model_cfg.get("kwargs") or {}) if str(k).startswith("head_"))
    if dup:
        raise ValueError(f"{KEY}.hidden is set and config.model.kwargs also has {dup}: set the head in one place "
                         f"({KEY}.*)")
    return {"head_hidden": hidden, "head_activation": group.get("activation", "relu"),
            "head_dropout": float(group.get("dropout", 0.0))}


def logits_layer(head_params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``{kernel, bias}`` of a head's last layer: ``head`` itself (linear) or ``head['logits']`` (MLP).

    ``None`` when ``head_params`` has neither layout (e.g. multitask heads).
    """
    if not isinstance(head_params, Mapping):
        return None
    if "kernel" in head_params:
        return head_params
    last = head_params.get(LOGITS)
    return last if isinstance(last, Mapping) and "kernel" in last else None


def head_dims(head_params: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(D, C)``: the feature size a head reads and the number of classes it outputs (linear or MLP head).

    ``D`` is the input size of ``head/kernel`` or ``head/hidden_0/kernel``; ``C`` the
    output size of the last layer. ``None`` when ``head_params`` has neither layout.
    """
    last = logits_layer(head_params)
    if last is None:
        return None
    first = head_params.get("hidden_0", last)
    return int(first["kernel"].shape[0]), int(last["kernel"].shape[-1])
