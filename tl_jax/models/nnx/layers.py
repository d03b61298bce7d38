"""The NNX twin of :class:`tl_jax.models.layers.Classifier`: ``backbone`` -> dropout -> ``head`` (Linear).

Subclasses build their backbone and call :meth:`ClassifierNNX.attach`; the param
paths (``backbone/...``, ``head/{kernel,bias}``) are the linen Classifier's, so
checkpoints of either form load into the other.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class ClassifierNNX(nnx.Module):
    """``__call__(x, return_features=False)`` and ``embed(x)`` over ``self.backbone`` (``[B, ...] -> [B, D]``)."""

    def attach(self, backbone: nnx.Module, features: int, num_classes: int, *, dropout_rate: float, dtype: Any,
               rngs: nnx.Rngs) -> None:
        """Set ``backbone``, the dropout before the head and the head ``Linear(features, num_classes)``."""
        self.num_classes = num_classes
        self.backbone = backbone
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(features, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        """Backbone features: ``x`` -> float32 ``[B, D]``."""
        return self.backbone(x).astype(jnp.float32)

    def __call__(self, x: jax.Array, return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits float32 ``[B, num_classes]``, or ``(logits, features)`` (features before dropout)."""
        feats = self.backbone(x)
        logits = self.head(self.dropout(feats)).astype(jnp.float32)
        if return_features:
            return logits, feats.astype(jnp.float32)
        return logits
