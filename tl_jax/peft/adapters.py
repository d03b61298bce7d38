"""Bottleneck adapters in transformer blocks (Houlsby et al. 2019; Pfeiffer et al. 2020), ``config.peft.adapter``
(docs/peft.md).

An adapter maps a sublayer's output ``h [..., d]`` to::

    h + act(h · W_down + b_down) · W_up + b_up      W_down [d, m], W_up [m, d]   (m = ``dim``, the bottleneck)

right after the sublayer and before its residual add (and LayerScale / dropout / post-LN, where the block has
them). ``W_up`` and ``b_up`` start at zero, so at init the adapter adds an exact zero and the adapted model's
output is the base model's bit for bit; ``W_down`` starts LeCun-normal (a fresh Dense's init), ``b_down`` at 0.
Parameters per adapter: ``2·d·m + d + m``.

Placement (``placement``):

* ``'houlsby'``: two adapters per block, after the attention sublayer and after the MLP (FFN) sublayer;
* ``'pfeiffer'``: one adapter per block, after the MLP sublayer.

The blocks adapted, by the sublayer calls seen inside them (no fork of the models' code):

* tl_jax's ViT (:class:`tl_jax.models.vit.EncoderBlock`, also the converted DeiT/DINOv2/CLIP/SigLIP towers):
  ``MultiHeadDotProductAttention_0`` (attention) and ``MlpBlock_0`` (MLP) called by an ``EncoderBlock``
  (a MAP pooling head's attention and MLP are not adapted);
* the BERT encoder (:class:`tl_jax.models.bert.BertLayer`, e.g. MiniLM): ``attention`` (self-attention with
  its output projection) and ``output`` (the FFN's second Dense, before its dropout) called by a ``BertLayer``.

The params live under the top-level key ``adapter``, nested by the adapted sublayer's module path:
``adapter/backbone/encoderblock_0/MlpBlock_0/{down,up}/{kernel,bias}``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.bert import BertLayer, BertSelfAttention
from tl_jax.models.vit import EncoderBlock, MlpBlock
from tl_jax.peft.intercepted import InterceptedModel, nest, subtree

log = logging.getLogger("tl_jax")
PyTree = Any
ADAPTER = "adapter"  # the top-level params key of the adapter params
PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "swish": jax.nn.silu,  # Houlsby et al.'s choice
}


def sublayer_kind(module: nn.Module) -> str | None:
    """``'attention'`` or ``'mlp'`` when ``module`` is an adaptable sublayer of a transformer block (module doc),
    else None."""
    parent = getattr(module, "parent", None)
    if isinstance(parent, EncoderBlock):
        if isinstance(module, nn.MultiHeadDotProductAttention):
            return "attention"
        if isinstance(module, MlpBlock):
            return "mlp"
    if isinstance(parent, BertLayer):
        if isinstance(module, BertSelfAttention):
            return "attention"
        if isinstance(module, nn.Dense) and module.name == "output":
            return "mlp"
    return None


def placed(kind: str | None, placement: str) -> bool:
    """Whether ``placement`` puts an adapter after a sublayer of ``kind``."""
    return kind == "mlp" or (kind == "attention" and placement == "houlsby")


def adapter_out(h: jax.Array, node: Mapping[str, Any], act: str) -> jax.Array:
    """``h + act(h·W_down + b_down)·W_up + b_up`` (module doc), in ``h``'s dtype."""
    down, up = node["down"], node["up"]
    z = ACTIVATIONS[act](h @ down["kernel"].astype(h.dtype) + down["bias"].astype(h.dtype))
    return h + (z @ up["kernel"].astype(h.dtype) + up["bias"].astype(h.dtype))


def init_adapter(rng: jax.Array, d: int, m: int) -> dict:
    """One adapter's params: ``down`` LeCun-normal kernel ``[d, m]`` and zero bias, ``up`` zeros ``[m, d]``, ``[d]``."""
    kernel = nn.initializers.lecun_normal()(rng, (d, m), jnp.float32)
    return {"down": {"kernel": kernel, "bias": jnp.zeros((m,), jnp.float32)},
            "up": {"kernel": jnp.zeros((m, d), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}}


def count_formula(d: int, m: int) -> int:
    """Parameters of one adapter: ``2·d·m + d + m`` (Houlsby et al. 2019, section 2.1)."""
    return 2 * d * m + d + m


class AdapterModel(InterceptedModel):
    """``module`` with bottleneck adapters of width ``dim`` after its transformer blocks' sublayers (module doc)."""

    KEY = ADAPTER
    CONFIG = "config.peft.adapter"

    def __init__(self, module: Any, *, dim: int, placement: str = "houlsby", act: str = "relu"):
        super().__init__(module)
        if placement not in PLACEMENTS:
            raise ValueError(f"config.peft.adapter.placement must be one of {PLACEMENTS}, got {placement!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"config.peft.adapter.act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        self.dim, self.placement, self.act = int(dim), placement, act

    def recorder(self, sites: dict):
        def record(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and placed(sublayer_kind(context.module), self.placement):
                sites[tuple(context.module.path)] = int(y.shape[-1])
            return y

        return record

    def init_own(self, rng: jax.Array, sites: dict) -> dict:
        if not sites:
            raise ValueError(f"config.peft.adapter: model {type(self.module).__name__} has no transformer blocks "
                             f"it can adapt (tl_jax's ViT EncoderBlock or BERT BertLayer)")
        own = {path: init_adapter(jax.random.fold_in(rng, i), d, self.dim)
               for i, (path, d) in enumerate(sorted(sites.items()))}
        log.info("adapters (config.peft.adapter): %s, width %d, %d adapters, %s params", self.placement, self.dim,
                 len(own), f"{sum(count_formula(d, self.dim) for d in sites.values()):,}")
        return nest(own)

    def interceptor(self, own: PyTree):
        def intercept(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name != "__call__" or not placed(sublayer_kind(context.module), self.placement):
                return y
            node = subtree(own, tuple(context.module.path))
            if node is None:
                raise ValueError(f"config.peft.adapter: no adapter params at {ADAPTER}/{'/'.join(context.module.path)}"
                                 f" (params of another placement or model?)")
            return adapter_out(y, node, self.act)

        return intercept

    def rewrap(self, module: Any) -> "AdapterModel":
        return AdapterModel(module, dim=self.dim, placement=self.placement, act=self.act)

    def __repr__(self) -> str:
        return f"AdapterModel({self.module!r}, dim={self.dim}, placement={self.placement!r}, act={self.act!r})"
