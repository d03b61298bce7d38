"""LoRA (low-rank adaptation) for linen models, as a wrapper around the run's model (docs/peft.md).

For a targeted layer with kernel ``W`` the adapted layer computes::

    y = layer(x) + s · (x ⋆ A) · B          s = alpha / rank   (rsLoRA: alpha / sqrt(rank))

* ``Dense``: ``W [d_in, d_out]``, ``A [d_in, r]``, ``B [r, d_out]``; ``x ⋆ A = x @ A``.
* ``DenseGeneral`` (attention q/k/v ``[d, heads, head_dim]``, out ``[heads, head_dim, d]``): ``A`` has the
  kernel's input dims, ``B`` its output dims: ``A [*in, r]``, ``B [r, *out]``; ``x ⋆ A`` contracts x's
  trailing input axes with A's (the layer's ``axis`` must be those trailing axes, ``batch_dims`` empty).
* ``Conv`` ("LoRA for CNNs"): ``W [kh, kw, c_in, c_out]``, ``A [kh, kw, c_in, r]`` is a conv with the layer's
  own strides, padding and dilations to ``r`` channels, ``B [r, c_out]`` a 1x1 conv (a matmul on channels).

In every case ``A`` has the kernel's shape with the output dims replaced by ``r``, ``B`` is ``[r, *out]``, and
``x ⋆ A · B`` is linear in ``A·B = tensordot(A, B, 1)``, which has the kernel's shape. So the adapted layer is
the plain layer with ``W' = W + s·tensordot(A, B, 1)`` (:func:`merge_lora`: exact, no PEFT left after a merge).
Parameters per layer: ``r·(prod(in) + prod(out))``, e.g. ``r·(d_in + d_out)`` for a Dense.

Init: ``A`` He-uniform over its fan-in, ``B = 0``, so ``A·B = 0`` and the adapted model's output equals the
base model's bit for bit at init (the delta is an exact zero added to ``y``).

Dropout (``dropout`` > 0) drops the LoRA branch's input ``x`` (inverted dropout, the base path untouched) in
calls with ``train=True`` given by keyword and a ``'dropout'`` rng; otherwise the branch is deterministic.

The LoRA params live under their own top-level path ``params['lora']``, nested by the layer's module path
(``lora/backbone/Conv_0/a``, ``.../b``), so ``param_rules`` can train them with the base frozen, ``init_from``
loads the base as it is, and removing the subtree leaves the base model's params. How it runs: :class:`LoraModel`
wraps a linen module; its ``apply`` takes ``lora`` out of the params and applies the module under a
``flax.linen.intercept_methods`` interceptor that adds the delta to each targeted layer's output.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models.im2col import Conv3x3

log = logging.getLogger("tl_jax")
PyTree = Any
LORA = "lora"  # the top-level params key of the LoRA params
KINDS = (nn.Dense, nn.DenseGeneral, nn.Conv, Conv3x3)  # the layer classes LoRA adapts (Conv3x3: the zoo CNN's
# im2col conv, nn.Conv(features, (3, 3), padding='SAME')'s params and maths)


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The LoRA scale ``s``: ``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)`` (Kalajdzievski, 2023)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _input_dims(module: nn.Module, kernel_ndim: int, path: str) -> int:
    """How many leading kernel dims are input dims (1 for Dense, the conv's window + c_in for Conv)."""
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            raise ValueError(f"LoRA: conv {path} has feature_group_count={module.feature_group_count}; only "
                             f"ungrouped convs are supported (leave it out of config.peft.lora.targets)")
        return kernel_ndim - 1
    if isinstance(module, Conv3x3):
        return 3
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"LoRA: DenseGeneral {path} has batch_dims={module.batch_dims}; not supported "
                             f"(leave it out of config.peft.lora.targets)")
        n_in = len(module.axis) if isinstance(module.axis, tuple) else 1
        return n_in
    return 1


def find_targets(model: nn.Module, targets: str, *args: Any, **kwargs: Any) -> dict[str, tuple[type, int]]:
    """``{module path: (layer class, number of input dims of its kernel)}`` of the layers of ``model`` that
    LoRA adapts: instances of Dense, DenseGeneral or Conv called in ``model.init(*args, **kwargs)``
    (abstractly: no FLOPs) whose '/'-joined module path ``re.fullmatch``-es ``targets``.

    Raises one line when no layer matches (naming the layers there are)."""
    found: dict[str, nn.Module] = {}
    seen: list[str] = []

    def record(next_fun, a, kw, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, KINDS):
            path = "/".join(module.path)
            seen.append(path)
            if re.fullmatch(targets, path):
                found[path] = module
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    if not found:
        raise ValueError(f"config.peft.lora.targets={targets!r} matches none of the model's Dense/DenseGeneral/"
                         f"Conv layers {sorted(set(seen))}")
    params = shapes["params"]
    out = {}
    for path, module in sorted(found.items()):
        kernel = _subtree(params, path)["kernel"]
        out[path] = (type(module), _input_dims(module, kernel.ndim, path))
    return out


def _subtree(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def init_lora(rng: jax.Array, params: PyTree, targets: Mapping[str, tuple[type, int]], rank: int) -> dict:
    """The LoRA params ``{module path nested: {'a', 'b'}}`` for the base ``params``: ``A`` He-uniform over its
    fan-in (the kernel's input dims), ``B`` zeros (module doc). One key per layer, by its sorted position."""
    out: dict = {}
    for i, (path, (_, n_in)) in enumerate(sorted(targets.items())):
        kernel = _subtree(params, path)["kernel"]
        a_shape = (*kernel.shape[:n_in], rank)
        fan_in = int(np.prod(kernel.shape[:n_in]))
        bound = math.sqrt(6.0 / fan_in)  # He-uniform: Var = 2 / fan_in
        a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, kernel.dtype, -bound, bound)
        b = jnp.zeros((rank, *kernel.shape[n_in:]), kernel.dtype)
        _set(out, path, {"a": a, "b": b})
    return out


def delta(module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """``s · (x ⋆ A) · B`` for the layer ``module`` (module doc): ``[..., *out]``."""
    if isinstance(module, (nn.Conv, Conv3x3)):
        if isinstance(module, nn.Conv):
            down = module.clone(features=a.shape[-1], use_bias=False, parent=None, name=None)
        else:  # Conv3x3: nn.Conv(features, (3, 3), padding='SAME') maths
            down = nn.Conv(a.shape[-1], (3, 3), padding="SAME", use_bias=False, dtype=module.dtype)
        xa = down.apply({"params": {"kernel": a}}, x)
    else:
        n_in = a.ndim - 1
        axes = module.axis if isinstance(module, nn.DenseGeneral) else -1
        axes = tuple(ax % x.ndim for ax in (axes if isinstance(axes, tuple) else (axes,)))
        if axes != tuple(range(x.ndim - n_in, x.ndim)):
            raise ValueError(f"LoRA: layer {'/'.join(module.path)} contracts axes {axes} of a rank-{x.ndim} input; "
                             f"only its trailing axes are supported (leave it out of config.peft.lora.targets)")
        return s * low_rank(x, a.astype(x.dtype), b.astype(x.dtype), n_in)
    return s * jnp.tensordot(xa, b.astype(xa.dtype), axes=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int) -> jax.Array:
    """``(x ⋆ A) · B`` for a Dense/DenseGeneral: x's trailing ``n_in`` axes contracted with A's input axes.

    Its own backward pass (:func:`_low_rank_bwd`) only to pick the fast layout of ``dA`` on XLA:CPU; the maths
    is autodiff's (tested equal)."""
    return jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1)


def _low_rank_fwd(x, a, b, n_in):
    xa = jnp.tensordot(x, a, axes=n_in)
    return jnp.tensordot(xa, b, axes=1), (x, a, b, xa)


def _low_rank_bwd(n_in, res, dy):
    """With ``x [N, in]``, ``xa = x·A [N, r]``, ``dy [N, out]`` (flattened): ``dxa = dy·Bᵀ``, ``dB = xaᵀ·dy``,
    ``dA = xᵀ·dxa``, ``dx = dxa·Aᵀ``. ``dA`` is computed as ``(dxaᵀ·x)ᵀ`` behind an optimisation barrier: XLA:CPU
    runs the ``[in, r]``-shaped product about 10x slower than the ``[r, in]`` one (a ViT-S's LoRA step cost
    more than its full fine-tuning step; BENCHMARKS.md), and without the barrier it folds the transpose back."""
    x, a, b, xa = res
    r = b.shape[0]
    x2, xa2 = x.reshape(-1, int(np.prod(a.shape[:-1]))), xa.reshape(-1, r)
    dy2, b2 = dy.reshape(-1, int(np.prod(b.shape[1:]))), b.reshape(r, -1)
    dxa = dy2 @ b2.T
    da = jax.lax.optimization_barrier(dxa.T @ x2).T
    dx = dxa @ a.reshape(-1, r).T
    return dx.reshape(x.shape), da.reshape(a.shape), (xa2.T @ dy2).reshape(b.shape)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def dropout_keys(lora: PyTree, rng: jax.Array | None) -> dict[str, jax.Array]:
    """One dropout key per adapted layer (by module path, folded in by its sorted position); ``{}`` when
    ``rng`` is None (no dropout)."""
    if rng is None:
        return {}
    return {path: jax.random.fold_in(rng, i) for i, path in enumerate(sorted(lora_pairs(lora)))}


def _dropped(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of the LoRA branch's input: ``x · m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)`` per element
    (unbiased: ``E[x ⋆ A · B]`` is the undropped delta); ``x`` itself without a key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def interceptor(lora: PyTree, s: float, rate: float = 0.0, keys: Mapping[str, jax.Array] | None = None):
    """A ``nn.intercept_methods`` interceptor adding :func:`delta` to each layer that has LoRA params in
    ``lora`` (by its module path), its input dropped out at ``rate`` with ``keys[path]`` when given; other
    calls run as they are."""
    keys = keys or {}

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(module, KINDS):
            return y
        node = lora
        for key in module.path:
            node = node.get(key) if isinstance(node, Mapping) else None
            if node is None:
                return y
        if not (isinstance(node, Mapping) and "a" in node and "b" in node and not isinstance(node["a"], Mapping)):
            return y
        x = _dropped(args[0], rate, keys.get("/".join(module.path)))
        return y + delta(module, x, node["a"], node["b"], s).astype(y.dtype)

    return intercept


def merge_lora(params: PyTree, s: float) -> PyTree:
    """The base params with each LoRA pair folded in, ``W' = W + s·tensordot(A, B, 1)``, and no ``lora``
    subtree: params of the plain model that computes what the adapted one does (module doc)."""
    if LORA not in params:
        raise ValueError(f"the params have no {LORA!r} subtree: nothing to merge (was config.peft.lora.rank > 0?)")
    base = jax.tree.map(np.asarray, {k: v for k, v in params.items() if k != LORA})
    flat = lora_pairs(params[LORA])
    for path, (a, b) in flat.items():
        node = _subtree(base, path)
        w = node["kernel"]
        update = s * np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), axes=1)
        if update.shape != w.shape:
            raise ValueError(f"LoRA at {path}: A·B has shape {update.shape}, the kernel {w.shape}")
        node["kernel"] = (w.astype(np.float64) + update).astype(w.dtype)
    return base


def lora_pairs(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{module path: (A, B)}`` of a nested ``lora`` subtree."""
    if "a" in tree and "b" in tree and not isinstance(tree["a"], Mapping):
        return {prefix: (tree["a"], tree["b"])}
    out = {}
    for key, sub in tree.items():
        out.update(lora_pairs(sub, f"{prefix}/{key}" if prefix else key))
    return out


def count(lora: PyTree) -> int:
    """Number of LoRA parameters (``sum r·(prod(in) + prod(out))`` over the adapted layers)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(lora)))


class LoraModel:
    """``module`` (a linen model) with LoRA on the layers ``targets`` names (module doc).

    ``init`` is the module's, plus ``params['lora']``; ``apply`` runs the module with the LoRA deltas added;
    ``clone(**changes)`` clones the module and keeps the LoRA; any other attribute (``frozen_norms``,
    ``norm_module_paths``, ``num_classes``, ...) is the module's. ``module`` is the wrapped model, as in
    :class:`tl_jax.models.precision.MixedPrecision`.
    """

    adapts_backbone = True  # the backbone's output changes in training (no cached backbone features)
    wraps_module = True  # tl_jax.models.precision.unwrap sees through it (the backbone/head split, module_class)
    HOW = ""  # how the log line names the variant (NNX: ', NNX: in weight space')

    def __init__(self, module: nn.Module, *, rank: int, alpha: float, targets: str, rslora: bool = False,
                 dropout: float = 0.0):
        if not isinstance(module, nn.Module):
            raise ValueError(f"LoraModel needs a linen model, got {type(module).__name__} (NNX models: "
                             f"tl_jax.peft.lora_nnx.NnxLoraModel; tl_jax.peft.lora_model picks the right one)")
        self.module = module
        self.rank, self.alpha, self.targets, self.rslora = int(rank), float(alpha), targets, bool(rslora)
        self.scale = scale(alpha, rank, rslora)
        self.dropout = float(dropout)

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> PyTree:
        variables = dict(self.module.init(rngs, *args, **kwargs))
        params = dict(variables["params"])
        if LORA in params:
            raise ValueError(f"the model already has a top-level {LORA!r} params subtree; LoRA cannot add its own")
        rng = rngs["params"] if isinstance(rngs, Mapping) else rngs
        targets = self.find_targets(*args, **kwargs)
        params[LORA] = init_lora(jax.random.fold_in(rng, 0x10A), params, targets, self.rank)
        log.info("LoRA (config.peft.lora%s): rank %d, scale %g on %d layers, %s params (the param-groups table "
                 "counts them in their group): %s", self.HOW, self.rank, self.scale, len(targets),
                 f"{count(params[LORA]):,}", ", ".join(list(targets)[:4]) + (", ..." if len(targets) > 4 else ""))
        variables["params"] = params
        return variables

    def find_targets(self, *args: Any, **kwargs: Any) -> dict[str, tuple[type, int]]:
        """The adapted layers (:func:`find_targets`): ``{module path: (class, input dims of its kernel)}``."""
        return find_targets(self.module, self.targets, *args, **kwargs)

    @staticmethod
    def split_lora(variables: Mapping[str, PyTree]) -> tuple[dict, PyTree]:
        """``(base params, lora subtree)`` of ``variables['params']``; one line when there is no ``lora``."""
        params = dict(variables["params"])
        if LORA not in params:
            raise ValueError(f"LoRA model applied to params without a {LORA!r} subtree (merged params load into "
                             f"the model without config.peft)")
        return params, params.pop(LORA)

    def apply(self, variables: Mapping[str, PyTree], *args: Any, **kwargs: Any) -> Any:
        params, lora = self.split_lora(variables)
        rngs = kwargs.get("rngs")
        rng = rngs.get("dropout") if isinstance(rngs, Mapping) and kwargs.get("train") is True else None
        keys = dropout_keys(lora, rng) if self.dropout > 0 else {}
        with nn.intercept_methods(interceptor(lora, self.scale, self.dropout, keys)):
            return self.module.apply({**variables, "params": params}, *args, **kwargs)

    def clone(self, **changes: Any) -> "LoraModel":
        return LoraModel(self.module.clone(**changes), rank=self.rank, alpha=self.alpha, targets=self.targets,
                         rslora=self.rslora, dropout=self.dropout)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "module":  # copy/pickle probes; `module` unset while unpickling
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"LoraModel({self.module!r}, rank={self.rank}, alpha={self.alpha}, targets={self.targets!r})"
