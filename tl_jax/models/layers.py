"""Shared building blocks for the classifier models.

Every model in :mod:`tl_jax.models` derives from :class:`Classifier`, which fixes
the public contract:

* two submodules created in ``setup()``: ``backbone`` (all feature layers) and
  ``head`` (``nn.Dense(num_classes)``, params ``head/{kernel,bias}``; or, with
  ``head_hidden``, an MLP with params ``head/hidden_<i>/...`` and
  ``head/logits/...``: :mod:`tl_jax.models.heads`), so every param lives under
  ``backbone/...`` or ``head/...``;
* ``__call__(x, *, train=False, return_features=False)`` maps ``x`` float
  ``[B, H, W, C]`` to float32 logits ``[B, num_classes]`` (optionally also the
  float32 features ``[B, D]`` that were fed to the head);
* ``embed(x, *, train=False)`` runs the backbone only;
* ``head_logits(features, *, train)`` runs what follows the backbone
  (dropout -> head), the one place that does so;
* dropout (rng stream ``'dropout'``) sits between backbone and head (and after
  each hidden layer of an MLP head) and is active only when ``train=True``;
* ``frozen_norms`` names BatchNorm layers (``'/'``-joined paths such as
  ``'backbone/layer1_0/bn2'``) that stay in inference mode when ``train=True``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models.heads import call_head, make_head

Dtype = Any

BACKBONE = "backbone"


def sub_paths(paths: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """Paths below ``prefix`` with ``prefix + '/'`` stripped.

    Example: ``sub_paths(('layer1_0/bn1', 'bn1'), 'layer1_0') == ('bn1',)``.
    """
    head = prefix + "/"
    return tuple(p[len(head):] for p in paths if p.startswith(head))


def batch_norm(
    name: str,
    *,
    train: bool,
    frozen: tuple[str, ...],
    dtype: Dtype,
    zero_scale: bool = False,
    axis_name: str | None = None,
) -> nn.BatchNorm:
    """A torchvision-compatible BatchNorm (momentum 0.9, eps 1e-5).

    Runs with batch statistics only if ``train`` and ``name`` is not in
    ``frozen`` (a frozen norm uses, and never updates, its running averages).
    ``zero_scale`` initialises gamma to zero (zero-init residual trick).
    ``axis_name``: a mapped axis (``jax.pmap``) to compute batch statistics over.
    Params (scale, bias) are float32; computation is in ``dtype``.
    """
    return nn.BatchNorm(
        use_running_average=(not train) or (name in frozen),
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        axis_name=axis_name,
        name=name,
    )


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): per example, zero ``x`` or scale it by ``1/(1-rate)``.

    ``x`` ``[B, ...]``; one draw per example, ``keep_b ~ Bernoulli(1 - rate)`` from
    ``rng``, so ``E[out] = x``: ``out_b = keep_b * x_b / (1 - rate)``. Applied to a
    residual branch it drops the whole block for that example.
    """
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """timm's linear schedule: block ``i`` of ``n`` gets ``rate * i / (n - 1)`` (``[0.0]`` for one block).

    Raises:
        ValueError: ``rate`` is outside ``[0, 1)`` (``config.model.kwargs.drop_path_rate``).
    """
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"config.model.kwargs.drop_path_rate must be in [0, 1), got {rate!r}")
    return np.linspace(0.0, float(rate), n).tolist()


class DropPath(nn.Module):
    """:func:`drop_path` of a residual branch when ``train`` and ``rate > 0`` (rng stream ``'dropout'``); else identity."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        return drop_path(x, self.rate, self.make_rng("dropout"))


class Classifier(nn.Module):
    """Base class: ``backbone`` -> dropout -> ``head`` (Dense, or an MLP with ``head_hidden``).

    Subclasses implement :meth:`make_backbone` (returning a module whose
    ``__call__(x, *, train)`` maps ``[B, H, W, C]`` to ``[B, D]`` and which
    accepts the frozen norm paths relative to itself) and, if they have
    BatchNorm layers, :meth:`norm_module_paths`.

    Attributes:
        num_classes: number of output logits.
        dropout_rate: dropout probability applied to the features before the head.
        frozen_norms: full module paths (``'backbone/...'``) of BatchNorm layers
            kept in inference mode even when ``train=True``.
        dtype: computation dtype (params are always float32). Logits and
            returned features are cast to float32.
        norm_axis_name: under ``jax.pmap``, the axis name over which
            BatchNorm layers compute batch statistics (set by
            ``config.parallel.mode='pmap'``); ``None`` = this device's batch.
        head_hidden: hidden layer widths of the head; ``()`` = one Dense layer
            (``config.model.head.hidden``, see :mod:`tl_jax.models.heads`).
        head_activation: activation after each hidden layer (a name of
            :data:`tl_jax.models.heads.ACTIVATIONS`).
        head_dropout: dropout after each hidden activation (train mode only).
    """

    num_classes: int
    dropout_rate: float = 0.0
    frozen_norms: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    norm_axis_name: str | None = None
    head_hidden: tuple[int, ...] = ()
    head_activation: str = "relu"
    head_dropout: float = 0.0

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        """Build the backbone; ``frozen`` are norm paths relative to it."""
        raise NotImplementedError

    def norm_module_paths(self) -> tuple[str, ...]:
        """All BatchNorm module paths of this model (static, no init needed)."""
        return ()

    def setup(self) -> None:
        if isinstance(self.frozen_norms, str):
            raise TypeError(
                f"frozen_norms must be a tuple of paths, got the string {self.frozen_norms!r}"
            )
        frozen = tuple(self.frozen_norms)
        known = set(self.norm_module_paths())
        unknown = [p for p in frozen if p not in known]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown BatchNorm path(s) in frozen_norms: "
                f"{unknown}. Known norm paths: {sorted(known) or 'none (model has no BatchNorm)'}"
            )
        self.backbone = self.make_backbone(sub_paths(frozen, BACKBONE))
        self.dropout = nn.Dropout(rate=self.dropout_rate)
        self.head = make_head(self.num_classes, self.head_hidden, self.head_activation, self.head_dropout,
                              dtype=self.dtype)

    def head_logits(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """What follows the backbone: features ``[B, D]`` -> dropout -> head -> float32 logits ``[B, C]``.

        Dropout (between backbone and head, and inside an MLP head) is active
        only when ``train``. :mod:`tl_jax.train.feature_cache` calls this on
        cached features, so it must stay the only code path after the backbone.
        """
        x = self.dropout(features, deterministic=not train)
        return call_head(self.head, x, train=train).astype(jnp.float32)

    def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Backbone features: ``x`` [B, H, W, C] -> float32 ``[B, D]``."""
        return self.backbone(x, train=train).astype(jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        return_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Classify ``x`` [B, H, W, C].

        Returns:
            float32 logits ``[B, num_classes]``, or ``(logits, features)`` with
            float32 features ``[B, D]`` (the backbone output, before dropout)
            when ``return_features``. With dropout off and a linear head,
            ``logits == features @ head.kernel + head.bias`` (up to ``dtype``).
        """
        feats = self.backbone(x, train=train)
        logits = self.head_logits(feats, train=train)
        if return_features:
            return logits, feats.astype(jnp.float32)
        return logits
