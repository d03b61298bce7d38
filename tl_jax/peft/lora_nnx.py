"""LoRA for Flax NNX models (:class:`~tl_jax.models.nnx.bridge.NNXModel`): the linen LoRA's params, in weight space.

The params are exactly those of :class:`tl_jax.peft.lora.LoraModel`: ``params['lora']``, nested by the layer's
module path, ``A [*in, r]`` (He-uniform) and ``B [r, *out]`` (zeros) for each targeted ``nnx.Linear``,
``nnx.LinearGeneral`` or ``nnx.Conv`` (or the zoo CNN's im2col conv; kernel ``[*in, *out]``; a conv's input dims are its window and
``c_in``). So the param rules, ``init_from``, checkpoints, ``tl-jax weights merge`` and WiSE-FT treat an NNX
LoRA run as they treat a linen one.

How it runs differs. NNX has no method interceptor, so instead of adding ``s·(x ⋆ A)·B`` to each layer's
output, :meth:`NnxLoraModel.apply` hands the module its kernels with the low-rank update folded in::

    W' = W + s · tensordot(A, B, 1)        s = alpha / rank   (rsLoRA: alpha / sqrt(rank))

which is the same function of ``x`` (the layer is linear in its kernel) and the same gradients for ``A`` and
``B`` (``∂L/∂A = s·∂L/∂W'·Bᵀ``, ``∂L/∂B = s·Aᵀ·∂L/∂W'``). With ``B = 0`` at init, ``W' = W + 0 = W`` exactly, so
the model's output equals the base model's bit for bit. The cost: the step forms ``∂L/∂W'`` for every
adapted layer (the full weight gradient, which linen LoRA never computes), so the step is not cheaper than a
full fine-tune; the optimizer state and the trainable params are LoRA's. Dropout on the LoRA branch's input
has no weight-space form: ``config.peft.lora.dropout`` must be 0 for NNX models (one-line error).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from tl_jax.models.nnx.bridge import NNXModel, path_str
from tl_jax.models.nnx.cnn import Conv3x3NNX
from tl_jax.peft.lora import LoraModel, lora_pairs, scale

PyTree = Any
NNX_KINDS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, Conv3x3NNX)  # the NNX layer classes LoRA adapts (Conv3x3NNX:
# the zoo CNN twin's im2col conv, nnx.Conv(in, out, (3, 3), padding='SAME')'s params and maths)


def lora_model(module: Any, *, rank: int, alpha: float, targets: str, rslora: bool = False,
               dropout: float = 0.0) -> Any:
    """``module`` with LoRA: :class:`NnxLoraModel` for an NNX model, :class:`~tl_jax.peft.lora.LoraModel` else."""
    cls = NnxLoraModel if isinstance(module, NNXModel) else LoraModel
    return cls(module, rank=rank, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout)


def _input_dims(layer: nnx.Module, kernel_ndim: int, path: str) -> int:
    """How many leading kernel dims are input dims (1 for Linear, the window + c_in for Conv)."""
    if isinstance(layer, (nnx.Conv, Conv3x3NNX)):
        return kernel_ndim - 1
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise ValueError(f"LoRA: LinearGeneral {path} has batch_axis={dict(layer.batch_axis)}; not supported "
                             f"(leave it out of config.peft.lora.targets)")
        return len(layer.in_features)
    return 1


def find_nnx_targets(model: NNXModel, targets: str, *args: Any) -> dict[str, tuple[type, int]]:
    """``{module path: (layer class, number of input dims of its kernel)}`` of the Linear, LinearGeneral and
    Conv layers of ``model`` whose ``'/'``-joined path ``re.fullmatch``-es ``targets``; the module is built and
    run on ``args`` abstractly (no FLOPs), so layers created on the first call count. One line when none match."""

    def built(*inputs: Any) -> nnx.Module:
        module = model.build(nnx.Rngs(params=0, dropout=1))
        module(*inputs)  # layers whose size depends on the input exist after the first call
        return module

    module = nnx.eval_shape(built, *args)
    seen, out = [], {}
    for path, layer in nnx.iter_modules(module):
        if not isinstance(layer, NNX_KINDS):
            continue
        name = path_str(path)
        seen.append(name)
        if re.fullmatch(targets, name):
            out[name] = (type(layer), _input_dims(layer, jnp.ndim(layer.kernel.get_value()), name))
    if not out:
        raise ValueError(f"config.peft.lora.targets={targets!r} matches none of the NNX model's Linear/"
                         f"LinearGeneral/Conv layers {sorted(seen)}")
    return dict(sorted(out.items()))


def folded_kernels(params: PyTree, lora: PyTree, s: float) -> PyTree:
    """``params`` with each adapted layer's kernel replaced by ``W + s·tensordot(A, B, 1)`` (in ``W``'s dtype)."""
    out = dict(params)
    for path, (a, b) in lora_pairs(lora).items():
        *parents, last = path.split("/")
        node = out
        for key in parents:  # copies along the path: the caller's dicts are left as they are
            node[key] = dict(node[key])
            node = node[key]
        layer = dict(node[last])
        w = layer["kernel"]
        layer["kernel"] = w + (s * jnp.tensordot(a, b, axes=1)).astype(w.dtype)
        node[last] = layer
    return out


class NnxLoraModel(LoraModel):
    """An :class:`NNXModel` with LoRA on the layers ``targets`` names (module doc); :class:`LoraModel`'s surface
    (``init`` adds ``params['lora']``, ``clone``, the module's other attributes), its own ``apply``."""

    HOW = ", NNX: in weight space"

    def __init__(self, module: NNXModel, *, rank: int, alpha: float, targets: str, rslora: bool = False,
                 dropout: float = 0.0):
        if dropout:
            raise ValueError(f"config.peft.lora.dropout must be 0 for NNX models (got {dropout}): NNX LoRA runs "
                             f"in weight space, where the branch's input cannot be dropped (docs/peft.md)")
        self.module = module
        self.rank, self.alpha, self.targets, self.rslora = int(rank), float(alpha), targets, bool(rslora)
        self.scale = scale(alpha, rank, rslora)
        self.dropout = 0.0

    def find_targets(self, *args: Any, **kwargs: Any) -> dict[str, tuple[type, int]]:
        return find_nnx_targets(self.module, self.targets, *args)

    def apply(self, variables: Mapping[str, PyTree], *args: Any, **kwargs: Any) -> Any:
        params, lora = self.split_lora(variables)
        return self.module.apply({**variables, "params": folded_kernels(params, lora, self.scale)}, *args, **kwargs)

    def clone(self, **changes: Any) -> "NnxLoraModel":
        return NnxLoraModel(self.module.clone(**changes), rank=self.rank, alpha=self.alpha, targets=self.targets,
                            rslora=self.rslora)

    def __repr__(self) -> str:
        return f"NnxLoraModel({self.module!r}, rank={self.rank}, alpha={self.alpha}, targets={self.targets!r})"
