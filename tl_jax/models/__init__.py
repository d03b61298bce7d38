"""Models: the zoo, the registry and the helpers, under one name.

``from tl_jax.models import get_model, model_from_config, register, ...`` —
this module only re-exports; the code lives in

* :mod:`tl_jax.models.registry`: :data:`MODELS`, :func:`register`, :func:`get_model`,
  :func:`model_from_config`, :func:`check_logits`, :func:`norm_paths`, ...;
* :mod:`tl_jax.models.contract`: what an own model must provide for each feature
  (``return_features``, a ``backbone``/``head`` split; docs/models.md);
* the zoo: :mod:`~tl_jax.models.cnn`, :mod:`~tl_jax.models.resnet`, :mod:`~tl_jax.models.vit`,
  :mod:`~tl_jax.models.convnext`,
  :mod:`~tl_jax.models.bert` (linen, on :class:`tl_jax.models.layers.Classifier`) and
  :mod:`tl_jax.models.nnx` (the NNX bridge and the NNX twins).

Every image model maps float ``[B, H, W, C]`` inputs to float32 logits
``[B, num_classes]``; ``bert`` maps ``input_ids`` ``[B, L]`` and ``attention_mask=[B, L]``.
"""
from __future__ import annotations

from tl_jax.models.bert import Bert, BertEncoder
from tl_jax.models.cnn import CNN, CNNBackbone, cnn_param_count
from tl_jax.models.convnext import ConvNeXt, ConvNeXtBackbone  # registers convnext, convnext_tiny/_small/_base
from tl_jax.models.inputs import model_inputs
from tl_jax.models.layers import Classifier
from tl_jax.models.registry import (
    MODELS,
    accepted,
    accepted_kwargs,
    check_logits,
    get_model,
    has_batch_stats,
    model_from_config,
    norm_paths,
    register,
)
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

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bert",
    "BertEncoder",
    "Bottleneck",
    "CNN",
    "CNNBackbone",
    "Classifier",
    "ConvNeXt",
    "ConvNeXtBackbone",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNetBackbone",
    "ViT",
    "ViTBackbone",
    "accepted",
    "accepted_kwargs",
    "check_logits",
    "cnn_param_count",
    "get_model",
    "has_batch_stats",
    "model_from_config",
    "model_inputs",
    "norm_paths",
    "register",
]
