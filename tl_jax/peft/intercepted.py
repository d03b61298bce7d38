"""The shared wrapper of the PEFT transforms that add their params under one top-level key and change the
wrapped model's calls with a ``flax.linen.intercept_methods`` interceptor (adapters, prompts; docs/peft.md).

A subclass names its params key (``KEY``), records the sites it adapts while the wrapped model is initialised
(:meth:`InterceptedModel.recorder`), draws its params for them (:meth:`InterceptedModel.init_own`) and gives
the interceptor that applies them (:meth:`InterceptedModel.interceptor`). So the base model's code is not
forked: the transform is a link of the model chain (``tl_jax/train/build.py`` BEFORE_INIT) like LoRA, and the
base params keep their paths (``init_from`` loads a base run as it is).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

log = logging.getLogger("tl_jax")
PyTree = Any
Interceptor = Callable[..., Any]


class InterceptedModel:
    """``module`` (a linen model, or another PEFT wrapper around one) with this transform's params under
    ``params[KEY]``: ``init`` is the module's plus those params; ``apply`` takes them out and runs the module
    under :meth:`interceptor`; ``clone(**changes)`` clones the module and keeps the transform; any other
    attribute (``frozen_norms``, ``num_classes``, ...) is the module's."""

    KEY = ""  # the top-level params key (subclasses)
    CONFIG = ""  # the config key named in errors, e.g. 'config.peft.adapter'
    adapts_backbone = True  # the backbone's output changes in training (no cached backbone features)
    wraps_module = True  # tl_jax.models.precision.unwrap sees through it (the backbone/head split, module_class)

    def __init__(self, module: Any):
        inner = module
        while getattr(type(inner), "wraps_module", False):
            inner = inner.module
        if not isinstance(inner, nn.Module):
            raise ValueError(f"{self.CONFIG} needs a linen model, got {type(inner).__name__} (NNX models are not "
                             f"supported: docs/peft.md)")
        self.module = module

    # --- what a subclass provides --------------------------------------------------------------------------
    def recorder(self, sites: dict) -> Interceptor:
        """An interceptor that fills ``sites`` (``{path: what init_own needs}``) while the module initialises."""
        raise NotImplementedError

    def init_own(self, rng: jax.Array, sites: dict) -> dict:
        """This transform's params for the recorded ``sites`` (raises one line naming :attr:`CONFIG` if none)."""
        raise NotImplementedError

    def interceptor(self, own: PyTree) -> Interceptor:
        """The interceptor that applies the params ``own`` to the module's calls."""
        raise NotImplementedError

    def rewrap(self, module: Any) -> "InterceptedModel":
        """This transform around another ``module`` (same options)."""
        raise NotImplementedError

    # --- the model interface -------------------------------------------------------------------------------
    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> PyTree:
        sites: dict = {}
        with nn.intercept_methods(self.recorder(sites)):
            variables = dict(self.module.init(rngs, *args, **kwargs))
        params = dict(variables["params"])
        if self.KEY in params:
            raise ValueError(f"the model already has a top-level {self.KEY!r} params subtree; {self.CONFIG} "
                             f"cannot add its own")
        rng = rngs["params"] if isinstance(rngs, Mapping) else rngs
        params[self.KEY] = self.init_own(jax.random.fold_in(rng, sum(map(ord, self.KEY))), sites)
        variables["params"] = params
        return variables

    def apply(self, variables: Mapping[str, PyTree], *args: Any, **kwargs: Any) -> Any:
        params = dict(variables["params"])
        if self.KEY not in params:
            raise ValueError(f"{self.CONFIG}: the model is applied to params without a {self.KEY!r} subtree (a "
                             f"plain checkpoint loads into the model without {self.CONFIG})")
        own = params.pop(self.KEY)
        with nn.intercept_methods(self.interceptor(own)):
            return self.module.apply({**variables, "params": params}, *args, **kwargs)

    def clone(self, **changes: Any) -> "InterceptedModel":
        return self.rewrap(self.module.clone(**changes))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "module":  # copy/pickle probes; `module` unset while unpickling
            raise AttributeError(name)
        return getattr(self.module, name)


def subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``, or None where a key is missing."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """``{('a', 'b'): v}`` -> ``{'a': {'b': v}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
