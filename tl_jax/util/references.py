"""Objects named by import reference: ``package.module:attr`` or ``path/to/file.py:attr``.

Used for the researcher's own code in a config: ``config.model.name`` (a model
factory, :mod:`tl_jax.models`) and ``config.data.name`` (a function returning
in-memory splits, :mod:`tl_jax.data.in_memory`) take a registered name or a
reference. A model factory is called as ``factory(num_classes=N, **kwargs)``;
one that takes an ``rngs`` argument builds a Flax NNX module.

A file reference is resolved against the working directory when relative
and recorded absolute (:func:`absolute_reference`), so a resumed run, an
``init_from``, ``tl-jax eval`` or a sweep process rebuilds the same object
from ``config.json``. Each file is imported once per process (the same
classes on every lookup). Every failure is one ``ValueError`` line naming
the config key (``where``) and what to fix.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pathlib
import sys
from collections.abc import Callable
from typing import Any

_FILE_MODULES: dict[pathlib.Path, Any] = {}  # one module object per file: the same classes on every lookup


def is_reference(name: str) -> bool:
    """Whether ``name`` is ``module:attr`` / ``file.py:attr`` rather than a registered name."""
    return isinstance(name, str) and ":" in name


def split_reference(ref: str, where: str) -> tuple[str, str]:
    """``'a/b.py:make'`` -> ``('a/b.py', 'make')``; the attribute may be dotted (``Class.create``)."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"{where}={ref!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    return target, attr


def absolute_reference(ref: str) -> str:
    """A file reference with its path made absolute (against the working directory); others unchanged."""
    if not is_reference(ref):
        return ref
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        return f"{pathlib.Path(target).expanduser().absolute()}:{attr}"
    return ref


def _load_file(path: str, where: str, ref: str) -> Any:
    file = pathlib.Path(path).expanduser().absolute()
    if not file.is_file():
        raise ValueError(f"{where}={ref!r}: no such file {str(file)!r}")
    if file in _FILE_MODULES:
        return _FILE_MODULES[file]
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:10]
    name = f"tl_jax_user_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: report its error in one line
        del sys.modules[name]
        line = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise ValueError(f"{where}={ref!r}: importing {file} failed{line}: {type(e).__name__}: {e}") from None
    _FILE_MODULES[file] = module
    return module


def _load_module(name: str, where: str, ref: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ValueError(f"{where}={ref!r}: no module named {e.name!r} (is it installed or on PYTHONPATH? "
                             f"a file is referenced as path/to/file.py:factory)") from None
        raise ValueError(f"{where}={ref!r}: importing {name} failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}={ref!r}: importing {name} failed: {type(e).__name__}: {e}") from None


def resolve(ref: str, where: str = "config.model.name") -> Callable[..., Any]:
    """The object ``ref`` names (imported once per file or module).

    Raises:
        ValueError: malformed reference, missing file or module, import error, missing attribute.
    """
    target, attr = split_reference(ref, where)
    module = _load_file(target, where, ref) if target.endswith(".py") else _load_module(target, where, ref)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise ValueError(f"{where}={ref!r}: {target} has no attribute {attr!r}; it defines {public}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}={ref!r}: {attr} is a {type(obj).__name__}, not a factory (function or class)")
    return obj


def parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """``(named parameters, takes **kwargs)`` of ``factory`` (a class: its ``__init__``)."""
    try:
        if isinstance(factory, type) and "__signature__" not in vars(factory):  # a class: its __init__ (NNX
            sig = inspect.signature(factory.__init__)  # modules' metaclass hides it behind (*args, **kwargs))
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        else:
            sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C types: assume anything goes
        return set(), True
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def takes_rngs(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` builds a Flax NNX module (it accepts ``rngs``)."""
    names, _ = parameters(factory)
    return "rngs" in names
