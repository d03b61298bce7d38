"""Flax NNX modules behind linen's ``init`` / ``apply`` surface.

tl_jax trains on plain, path-keyed pytrees: ``{'params': {...}, 'batch_stats':
{...}}`` with paths such as ``backbone/conv1/kernel``. :class:`NNXModel` makes
an ``nnx.Module`` look like a linen module to all of that code (objectives,
param rules, ``merge_params``, checkpoints, sharding, sweeps): the module is
split into a static ``GraphDef`` and its variables at ``init``, and merged
back from the pure dicts at every ``apply``. Split and merge run while JAX
traces the step, so the compiled program is the module's forward pass alone:
the pure dicts are wrapped, never copied.

Trees. ``params`` holds every ``nnx.Param``, ``batch_stats`` every
``nnx.BatchStat``, each as a nested dict keyed by the module's attribute
names (integer keys of ``nnx.List`` become strings), exactly the paths of the
linen twin: ``nnx.BatchNorm`` has params ``scale``/``bias`` and statistics
``mean``/``var`` like ``nn.BatchNorm``. A linen checkpoint of the same
architecture therefore loads into the NNX twin unchanged and back (no key
renaming: there is no ``linen_to_nnx``). The RNG streams NNX keeps
(``RngKey``/``RngCount``) are never returned: ``apply`` rebuilds them from
its ``rngs`` (stream ``s`` of the ``k``-th RNG variable gets
``fold_in(rngs[s], k)``), so dropout masks are a pure function of the key.
Any other variable type (``nnx.Cache``, ``nnx.Intermediate``, ...) is refused
at ``init``: it would be neither trained nor saved.

Modes. ``apply(train=...)`` sets ``deterministic = not train`` and
``use_running_average = not train`` on every submodule that has them (NNX's
``Module.train()``/``eval()`` convention), keeps the norm modules named in
``frozen_norms`` in inference mode, sets ``axis_name = norm_axis_name`` on
the norm modules (``jax.pmap``), and ``rate = dropout_rate`` on every
``nnx.Dropout`` when that override is given.

Layers whose size depends on the input (the first conv, a dense layer after a
flatten) may be created on the module's first call (the zoo twins do): ``init``
runs one forward pass on the sample before splitting, and ``apply`` without a
prior ``init`` builds the definition abstractly from its arguments.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any
Path = tuple[Any, ...]
T = TypeVar("T", bound=type)


def expose_signature(cls: T) -> T:
    """Class decorator: ``inspect.signature(cls)`` shows ``cls.__init__``'s parameters (without ``self``).

    ``nnx.Module``'s metaclass makes ``inspect.signature(cls)`` read ``(*args, **kwargs)``;
    :func:`tl_jax.models.get_model` recognises an NNX factory by its ``rngs``
    parameter and checks ``config.model.kwargs`` against the others.
    """
    sig = inspect.signature(cls.__init__)
    cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return cls


class _Template(NamedTuple):
    """One variable of the module, abstract: where it lives, its type and metadata, its shape."""

    path: Path
    var_type: type
    metadata: dict
    value: Any  # jax.ShapeDtypeStruct


class _Definition(NamedTuple):
    """What ``apply`` needs to rebuild the module from pure dicts (no arrays held)."""

    graphdef: Any
    params: tuple[_Template, ...]
    batch_stats: tuple[_Template, ...]
    rng_state: tuple[_Template, ...]
    norm_paths: tuple[str, ...]
    dropout_rates: tuple[float, ...]


def path_str(path: Path) -> str:
    """``('backbone', 'conv1')`` -> ``'backbone/conv1'`` (integer keys as digits)."""
    return "/".join(str(k) for k in path)


def to_pure(state: Any) -> dict:
    """An ``nnx.State`` as a plain nested dict of arrays with string keys (linen's layout)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = var.get_value() if isinstance(var, nnx.Variable) else var
    return out


def _templates(state: Any) -> tuple[_Template, ...]:
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        out.append(_Template(tuple(path), type(var), var.get_metadata(), jax.ShapeDtypeStruct(value.shape,
                                                                                              value.dtype)))
    return tuple(out)


def _lookup(tree: Mapping, path: Path, collection: str) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or str(key) not in node:
            raise ValueError(f"variables[{collection!r}] has no {path_str(path)!r}, which the NNX model has")
        node = node[str(key)]
    return node


def _state(templates: tuple[_Template, ...], tree: Mapping, collection: str) -> Any:
    """The ``nnx.State`` of ``templates`` holding the arrays of the pure dict ``tree`` (not copied)."""
    flat = [(t.path, t.var_type.from_metadata(_lookup(tree, t.path, collection), dict(t.metadata)))
            for t in templates]
    return nnx.from_flat_state(flat)


def _as_key(key: Any) -> jax.Array:
    """A typed PRNG key from a raw ``uint32[2]`` key (``jax.random.PRNGKey``) or a typed one."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _rng_state(templates: tuple[_Template, ...], rngs: Mapping[str, Any]) -> Any:
    """Fresh RNG variables: ``RngKey`` of stream ``s`` (k-th in tree order) = ``fold_in(rngs[s], k)``
    (a constant key for streams not in ``rngs``), every ``RngCount`` zero."""
    flat = []
    for k, t in enumerate(templates):
        shape = t.value.shape
        if issubclass(t.var_type, nnx.RngKey):
            tag = t.metadata.get("tag")
            base = _as_key(rngs[tag]) if tag in rngs else jax.random.key(0)
            key = jax.random.fold_in(base, k)
            value = jax.random.split(key, shape) if shape else key
        else:
            value = jnp.zeros(shape, t.value.dtype)
        flat.append((t.path, t.var_type.from_metadata(value, dict(t.metadata))))
    return nnx.from_flat_state(flat)


def _is_norm(module: Any) -> bool:
    return hasattr(module, "use_running_average")


def _module_info(module: nnx.Module) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(norm module paths, dropout rates)`` of a built module."""
    norms, rates = [], []
    for path, sub in nnx.iter_modules(module):
        if _is_norm(sub):
            norms.append(path_str(path))
        if isinstance(sub, nnx.Dropout):
            rates.append(float(sub.rate))
    return tuple(sorted(norms)), tuple(rates)


def _signature(params: Mapping) -> tuple:
    """Hashable ``(path, shape)`` of every leaf of a pure params dict: which definition it fits."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return tuple(sorted((jax.tree_util.keystr(p), tuple(jnp.shape(v))) for p, v in leaves))


def _first_difference(params: Mapping, definition: _Definition) -> str:
    """The first param path whose presence or shape differs between ``params`` and ``definition``."""
    got = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(jnp.shape(v))
           for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {path_str(t.path): tuple(t.value.shape) for t in definition.params}
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            return f"{path!r} is {got.get(path, 'missing')} in the params, {want.get(path, 'absent')} in the module"
    return "same paths and shapes"


def _wants_batch_stats(mutable: Any) -> bool:
    if mutable is True:
        return True
    if isinstance(mutable, str):
        return mutable == "batch_stats"
    return bool(mutable) and "batch_stats" in mutable


class NNXModel:
    """An ``nnx.Module`` with linen's ``init`` / ``apply`` / ``clone`` on path-keyed pure dicts.

    Args:
        build: ``build(rngs) -> nnx.Module``; called with ``nnx.Rngs(params=..., dropout=...)``
            at ``init`` (and abstractly, for the module's structure).
        num_classes: logits the module must return (``[B, num_classes]``, checked at
            ``init``); ``None`` skips the check.
        name: how errors name the model (e.g. the ``config.model.name``).
        frozen_norms: ``'/'``-joined paths of norm modules kept in inference mode
            when ``train=True`` (their statistics neither used from the batch nor updated).
        norm_axis_name: mapped axis the norm modules average batch statistics over (``jax.pmap``).
        dropout_rate: overrides the rate of every ``nnx.Dropout``; ``None`` keeps the module's.
    """

    def __init__(self, build: Callable[[nnx.Rngs], nnx.Module], num_classes: int | None = None, *,
                 name: str | None = None, frozen_norms: tuple[str, ...] = (), norm_axis_name: str | None = None,
                 dropout_rate: float | None = None, _cache: dict | None = None):
        if isinstance(frozen_norms, str):
            raise ValueError(f"frozen_norms must be a tuple of paths, got the string {frozen_norms!r}")
        self.build = build
        self.num_classes = num_classes
        self.name = name
        self.frozen_norms = tuple(frozen_norms)
        self.norm_axis_name = norm_axis_name
        self._dropout_rate = dropout_rate
        self._cache = {} if _cache is None else _cache  # shared with clones: definitions do not depend on modes
        if self.frozen_norms:
            known = set(self.norm_module_paths())
            unknown = [p for p in self.frozen_norms if p not in known]
            if unknown:
                raise ValueError(f"{self._label()}: unknown BatchNorm path(s) in frozen_norms: {unknown}. "
                                 f"Known norm paths: {sorted(known) or 'none (model has no BatchNorm)'}")

    # -- linen's surface ----------------------------------------------------------------------
    def init(self, rng: Any, *args: Any, train: bool = False, method: Any = None, **kwargs: Any) -> dict:
        """Build the module, run it once on ``args``; ``{'params', 'batch_stats' (if any)}`` as pure dicts.

        ``rng``: a PRNG key (or linen's ``{'params': key, ...}`` dict). Works under ``jax.jit``
        and ``jax.eval_shape``. Raises ValueError (one line) when ``build`` does not return an
        ``nnx.Module``, the module holds variables other than Param/BatchStat/RNG state, or its
        output is not float logits ``[B, num_classes]``.
        """
        if isinstance(rng, Mapping):
            rngs = dict(rng)
            params_key = rngs.pop("params")
        else:
            params_key, rngs = rng, {}
        rngs.setdefault("dropout", jax.random.fold_in(params_key, 1))
        module = self.build(nnx.Rngs(params=params_key, **rngs))
        if not isinstance(module, nnx.Module):
            raise ValueError(f"{self._label()}: build returned a {type(module).__name__}, not an nnx.Module")
        rates = _module_info(module)[1]  # the module's own dropout rates, before any override
        self._configure(module, train)
        out = self._call(module, method, args, kwargs, False)
        if method is None:
            self._check_logits(out, args)
        graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        others = [(p, type(v).__name__) for p, v in nnx.to_flat_state(rest) if not isinstance(v, nnx.RngState)]
        if others:
            raise ValueError(f"{self._label()}: variable {path_str(others[0][0])!r} is an nnx.{others[0][1]}; "
                             "only nnx.Param, nnx.BatchStat and RNG state can be trained and saved")
        norms = _module_info(module)[0]  # after the forward pass: lazily built layers included
        definition = _Definition(graphdef, _templates(params), _templates(batch_stats), _templates(rest), norms,
                                 rates)
        pure_params = to_pure(params)
        self._cache[_signature(pure_params)] = definition
        self._cache["last"] = definition
        variables = {"params": pure_params}
        if definition.batch_stats:
            variables["batch_stats"] = to_pure(batch_stats)
        return variables

    def apply(self, variables: Mapping[str, PyTree], *args: Any, train: bool = False,
              rngs: Mapping[str, Any] | None = None, mutable: Any = False, return_features: bool = False,
              method: Callable | str | None = None, **kwargs: Any) -> Any:
        """Run the module on ``args`` with ``variables`` (linen's conventions).

        Returns ``out``, or ``(out, {'batch_stats': new})`` when ``mutable`` names
        ``'batch_stats'`` (``{}`` for a module without statistics). ``method``: ``fn(module,
        *args, **kwargs)`` or a method name; ``None`` calls the module (with
        ``return_features=True`` passed on only when asked). ``rngs['dropout']`` seeds dropout.
        """
        params = variables["params"]
        stats = variables.get("batch_stats") or {}
        rngs = dict(rngs or {})
        definition = self._definition(params, args, kwargs, method)
        rate = self._dropout_rate if self._dropout_rate is not None else max(definition.dropout_rates, default=0.0)
        if train and rate > 0 and "dropout" not in rngs:
            raise ValueError(f"{self._label()}: apply(train=True) with dropout (rate {rate}) needs "
                             "rngs={'dropout': key}")
        module = nnx.merge(definition.graphdef, _state(definition.params, params, "params"),
                           _state(definition.batch_stats, stats, "batch_stats"),
                           _rng_state(definition.rng_state, rngs), copy=True)
        self._configure(module, train)
        out = self._call(module, method, args, kwargs, return_features)
        if not _wants_batch_stats(mutable):
            return out
        if not definition.batch_stats:
            return out, {}
        return out, {"batch_stats": to_pure(nnx.state(module, nnx.BatchStat))}

    def clone(self, **changes: Any) -> "NNXModel":
        """A copy (same ``build``) with ``frozen_norms``, ``norm_axis_name``, ``dropout_rate`` or ``name`` changed."""
        fields = {"name": self.name, "frozen_norms": self.frozen_norms, "norm_axis_name": self.norm_axis_name,
                  "dropout_rate": self._dropout_rate}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"{self._label()}: clone() got unknown field(s) {unknown}; known: {sorted(fields)}")
        return NNXModel(self.build, self.num_classes, _cache=self._cache, **{**fields, **changes})

    def norm_module_paths(self) -> tuple[str, ...]:
        """Paths of the norm modules (those with ``use_running_average``), e.g. ``'backbone/bn1'``."""
        return self._info()[0]

    def module_type(self) -> type:
        """The class of the module ``build`` returns (built abstractly once: no arrays allocated)."""
        if "type" not in self._cache:
            self._cache["type"] = type(nnx.eval_shape(lambda: self.build(nnx.Rngs(params=0, dropout=1))))
        return self._cache["type"]

    @property
    def dropout_rate(self) -> float:
        """The override given, else the largest rate of the module's ``nnx.Dropout`` layers (0.0 if none)."""
        if self._dropout_rate is not None:
            return float(self._dropout_rate)
        return max(self._info()[1], default=0.0)

    def __repr__(self) -> str:
        return (f"NNXModel({self._label()}, num_classes={self.num_classes}, frozen_norms={self.frozen_norms}, "
                f"norm_axis_name={self.norm_axis_name!r}, dropout_rate={self._dropout_rate})")

    # -- internals ----------------------------------------------------------------------------
    def _label(self) -> str:
        return f"model {self.name!r}" if self.name else "NNX model"

    def _configure(self, module: nnx.Module, train: bool) -> None:
        """Set train/eval mode, frozen norms, the norm axis and the dropout override on ``module``."""
        frozen = set(self.frozen_norms)
        for path, sub in nnx.iter_modules(module):
            if hasattr(sub, "deterministic"):
                sub.deterministic = not train
            if _is_norm(sub):
                sub.use_running_average = (not train) or path_str(path) in frozen
                if self.norm_axis_name is not None and hasattr(sub, "axis_name"):
                    sub.axis_name = self.norm_axis_name
            if self._dropout_rate is not None and isinstance(sub, nnx.Dropout):
                sub.rate = float(self._dropout_rate)

    @staticmethod
    def _call(module: nnx.Module, method: Callable | str | None, args: tuple, kwargs: dict,
              return_features: bool) -> Any:
        if return_features:
            kwargs = {**kwargs, "return_features": True}
        if method is None:
            return module(*args, **kwargs)
        if isinstance(method, str):
            return getattr(module, method)(*args, **kwargs)
        return method(module, *args, **kwargs)

    def _check_logits(self, out: Any, args: tuple) -> None:
        if self.num_classes is None:
            return
        batch = jnp.shape(args[0])[0] if args and jnp.ndim(args[0]) else None
        want = (batch, self.num_classes)
        shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if shape != want or not jnp.issubdtype(dtype, jnp.floating):
            got = f"shape {tuple(shape)} {dtype}" if shape is not None else f"a {type(out).__name__}"
            raise ValueError(f"{self._label()}: the module must return float logits [B, num_classes] = "
                             f"{list(want)}; got {got}")

    def _definition(self, params: Mapping, args: tuple, kwargs: dict, method: Any) -> _Definition:
        """The definition that fits ``params`` (built abstractly from ``args`` the first time)."""
        sig = _signature(params)
        if sig not in self._cache:
            jax.eval_shape(lambda a, kw: self.init(jax.random.key(0), *a, train=False, method=method, **kw),
                           args, kwargs)
        if sig not in self._cache:
            shapes = [tuple(jnp.shape(a)) for a in args]
            raise ValueError(f"{self._label()}: variables['params'] do not fit the module built for inputs of "
                             f"shape {shapes}: {_first_difference(params, self._cache['last'])}")
        return self._cache[sig]

    def _info(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """``(norm paths, dropout rates)``: from the last ``init``, else from an abstract build."""
        if "last" in self._cache:
            d = self._cache["last"]
            return d.norm_paths, d.dropout_rates
        if "info" not in self._cache:
            module = nnx.eval_shape(lambda: self.build(nnx.Rngs(params=0, dropout=1)))
            if not isinstance(module, nnx.Module):
                raise ValueError(f"{self._label()}: build returned a {type(module).__name__}, not an nnx.Module")
            self._cache["info"] = _module_info(module)
        return self._cache["info"]
