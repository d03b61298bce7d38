"""Model zoo: ``get_model(name, num_classes, **kwargs)`` and tree helpers.

Every image model (``cnn``, ``resnet*``, ``vit``) maps float ``[B, H, W, C]``
inputs to float32 logits ``[B, num_classes]``; ``bert`` maps ``input_ids``
``[B, L]`` and ``attention_mask=[B, L]``. See
:class:`tl_jax.models.layers.Classifier` for the shared contract
(``backbone`` / ``head`` submodules, ``embed``, ``return_features``,
``dropout_rate``, ``frozen_norms``, ``dtype``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn

from tl_jax.models.bert import Bert, BertEncoder
from tl_jax.models.cnn import CNN, CNNBackbone, cnn_param_count
from tl_jax.models.layers import Classifier
from tl_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNetBackbone,
)
from tl_jax.models.vit import ViT, ViTBackbone

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vit": ViT,
    "bert": Bert,
}

_RESERVED = {"parent", "name", "num_classes"}


def accepted_kwargs(name: str) -> list[str]:
    """Keyword arguments ``get_model(name, ...)`` accepts (besides num_classes)."""
    factory = MODELS[name]
    fixed: set[str] = set()
    if isinstance(factory, functools.partial):
        fixed = set(factory.keywords)
        factory = factory.func
    fields = {f.name for f in dataclasses.fields(factory) if f.init}
    return sorted(fields - _RESERVED - fixed)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) with ``num_classes`` logits.

    Raises:
        ValueError: unknown ``name`` (the ``config.model.name`` value) or a
            keyword argument the model does not accept.
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r} (config.model.name); known models: {sorted(MODELS)}"
        )
    accepted = accepted_kwargs(name)
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise ValueError(
            f"model {name!r} got unknown keyword argument(s) {bad}; accepted: {accepted}"
        )
    if "frozen_norms" in kwargs:
        kwargs["frozen_norms"] = tuple(kwargs["frozen_norms"])
    return MODELS[name](num_classes=num_classes, **kwargs)


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


__all__ = [
    "MODELS",
    "BasicBlock",
    "Bert",
    "BertEncoder",
    "Bottleneck",
    "CNN",
    "CNNBackbone",
    "Classifier",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNetBackbone",
    "ViT",
    "ViTBackbone",
    "accepted_kwargs",
    "cnn_param_count",
    "get_model",
    "has_batch_stats",
    "norm_paths",
]
