"""A BERT-style text encoder with a classification head (Hugging Face ``BertModel`` maths).

Inputs: ``input_ids`` int ``[B, L]`` and ``attention_mask`` ``[B, L]`` (1 =
token, 0 = padding; None = all tokens). Token type ids are all 0.

Layout of the param tree (``i`` = layer index; all Dense kernels are
``[in, out]``, i.e. the transpose of a torch ``Linear.weight``)::

    backbone/embeddings/{word,position,token_type}_embeddings/embedding
    backbone/embeddings/layer_norm/{scale,bias}
    backbone/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    backbone/layer_{i}/attention_norm/{scale,bias}
    backbone/layer_{i}/intermediate/{kernel,bias}      D -> intermediate_size, GELU (erf)
    backbone/layer_{i}/output/{kernel,bias}            intermediate_size -> D
    backbone/layer_{i}/output_norm/{scale,bias}
    backbone/pooler/{kernel,bias}                      pooling='pooler' only
    head/{kernel,bias}

Post-LayerNorm blocks as in BERT: ``h = LN(h + Attn(h))``, ``h = LN(h + FFN(h))``.
Features fed to the head, ``[B, D]``: ``'mean'`` = mean of the last hidden
states over real tokens (sentence-transformers' mean pooling), ``'cls'`` =
the first token's state, ``'pooler'`` = ``tanh(Dense(cls))`` (BERT's pooler).
Defaults are the shape of all-MiniLM-L6-v2 (6 layers, D=384, 12 heads).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.layers import Classifier, Dtype

POOLINGS = ("mean", "cls", "pooler")


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(stddev=0.02), name=name)


class BertEmbeddings(nn.Module):
    """word + position + token-type(0) embeddings -> LayerNorm -> dropout: ``[B, L]`` -> ``[B, L, D]``."""

    vocab_size: int
    hidden_size: int
    max_position: int
    type_vocab_size: int
    eps: float
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, train: bool = False) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.max_position:
            raise ValueError(f"BERT: sequence length {length} > max_position={self.max_position}")
        embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype,  # noqa: E731
                                         embedding_init=nn.initializers.normal(stddev=0.02), name=name)
        x = embed(self.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(self.max_position, "position_embeddings")(jnp.arange(length))[None]
        x = x + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros((1, length), jnp.int32))
        x = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention + output projection: ``[B, L, D]`` -> ``[B, L, D]`` (before add & norm)."""

    num_heads: int
    dropout: float
    attention_dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, *, train: bool = False) -> jax.Array:
        b, length, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        split = lambda t: t.reshape(b, length, h, dh)  # noqa: E731
        q = split(_dense(d, "query", self.dtype)(x))
        k = split(_dense(d, "key", self.dtype)(x))
        v = split(_dense(d, "value", self.dtype)(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(dh, x.dtype)) + bias
        probs = nn.Dropout(self.attention_dropout)(jax.nn.softmax(scores, axis=-1), deterministic=not train)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, d)
        return nn.Dropout(self.dropout)(_dense(d, "output", self.dtype)(ctx), deterministic=not train)


class BertLayer(nn.Module):
    """Self-attention + FFN, post-LN: ``[B, L, D]`` -> ``[B, L, D]``."""

    num_heads: int
    intermediate_size: int
    eps: float
    dropout: float
    attention_dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, *, train: bool = False) -> jax.Array:
        """``bias``: float ``[B, 1, 1, L]``, 0 for tokens and a large negative for padding."""
        attn = BertSelfAttention(self.num_heads, self.dropout, self.attention_dropout, self.dtype,
                                 name="attention")(x, bias, train=train)
        x = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="attention_norm")(x + attn)
        y = nn.gelu(_dense(self.intermediate_size, "intermediate", self.dtype)(x), approximate=False)
        y = nn.Dropout(self.dropout)(_dense(x.shape[-1], "output", self.dtype)(y), deterministic=not train)
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="output_norm")(x + y)


class BertEncoder(nn.Module):
    """Embeddings -> ``num_layers`` layers -> pooling: ``[B, L]`` ids -> ``[B, D]`` features."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int
    eps: float
    pooling: str
    dropout: float
    attention_dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"BERT: input_ids must be [B, L] token ids, got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position, self.type_vocab_size, self.eps,
                           self.dropout, self.dtype, name="embeddings")(input_ids.astype(jnp.int32), train=train)
        bias = (1.0 - attention_mask[:, None, None, :].astype(x.dtype)) * jnp.finfo(x.dtype).min
        for i in range(self.num_layers):
            x = BertLayer(self.num_heads, self.intermediate_size, self.eps, self.dropout, self.attention_dropout,
                          self.dtype, name=f"layer_{i}")(x, bias, train=train)  # [B, L, D]
        if self.pooling == "mean":
            m = attention_mask.astype(x.dtype)[..., None]  # [B, L, 1]
            return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        if self.pooling == "cls":
            return x[:, 0]
        return jnp.tanh(_dense(self.hidden_size, "pooler", self.dtype)(x[:, 0]))


class Bert(Classifier):
    """BERT-style text classifier: ``(input_ids [B, L], attention_mask [B, L])`` -> logits ``[B, C]``.

    Attributes (besides :class:`Classifier`'s; defaults = all-MiniLM-L6-v2):
        vocab_size, hidden_size (D), num_layers, num_heads, intermediate_size,
        max_position, type_vocab_size, layer_norm_eps: the architecture
            (Hugging Face ``BertConfig`` names: num_hidden_layers,
            num_attention_heads, max_position_embeddings).
        pooling: ``'mean'``, ``'cls'`` or ``'pooler'`` (see module doc).
        hidden_dropout, attention_dropout: dropout inside the encoder (train only).
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def make_backbone(self, frozen: tuple[str, ...]) -> nn.Module:
        del frozen  # no BatchNorm
        if self.pooling not in POOLINGS:
            raise ValueError(f"BERT: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BERT: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        return BertEncoder(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads,
                           self.intermediate_size, self.max_position, self.type_vocab_size, self.layer_norm_eps,
                           self.pooling, self.hidden_dropout, self.attention_dropout, self.dtype)

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
              train: bool = False) -> jax.Array:
        """Pooled features ``[B, D]`` float32 (the sentence embedding for ``pooling='mean'``)."""
        return self.backbone(input_ids, attention_mask, train=train).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits float32 ``[B, num_classes]`` (and features ``[B, D]`` if ``return_features``)."""
        feats = self.backbone(input_ids, attention_mask, train=train)
        logits = self.head_logits(feats, train=train)
        return (logits, feats.astype(jnp.float32)) if return_features else logits
