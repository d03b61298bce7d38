"""One-line config errors: "did you mean" suggestions, JSON quoting hints, typos inside a config file.

Used by :mod:`tl_jax.config` (imports nothing of tl_jax). Each function returns
text for a message; the caller raises.
"""
from __future__ import annotations

import difflib
import json
import linecache
import pathlib
import re
import traceback
from types import TracebackType
from typing import Any

import ml_collections
from ml_collections import config_dict

_JSON_WORDS = {"null", "true", "false"}
_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def close_keys(key: str, keys: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` keys like ``key``: similarity >= 0.6 and within 0.1 of the closest (no far-fetched extras)."""
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in keys), key=lambda rk: -rk[0])
    best = scored[0][0] if scored else 0.0
    return [k for r, k in scored[:n] if r >= max(0.6, best - 0.1)]


def did_you_mean(key: str, keys: list[str], prefix: str = "config.") -> str:
    """``'; did you mean config.a, config.b?'`` for the :func:`close_keys` of ``key``, else ``''``."""
    close = close_keys(key, keys)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of ``config``, groups included (``'train'``, ``'train.steps'``, ...)."""
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, prefix + k + "."))
    return keys


def quoted_json(raw: str) -> str | None:
    """``'[[backbone/.*,null]]'`` (JSON whose strings lost their quotes in the shell) -> ``'[["backbone/.*", null]]'``.

    Bare words between ``[ ] { } , :`` become JSON strings, numbers and null/true/false stay;
    None when the result is still not JSON.
    """
    parts = re.split(r"([\[\]{},:])", raw)
    out = []
    for part in parts:
        word = part.strip()
        if part in "[]{},:" or not word or word in _JSON_WORDS or _NUMBER.fullmatch(word) or word[0] == '"':
            out.append(part)
        else:
            out.append(json.dumps(word))
    text = "".join(out)
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return None


def quoting_hint(dotted: str, value: Any, expected: str = "") -> str:
    """How to quote a JSON list or dict in the shell, for a string that looks like one whose quotes the shell
    removed, or any string where ``expected`` is ``'list'`` or ``'dict'``; else ``''``."""
    if not isinstance(value, str):
        return ""
    bracketed = value.strip()[:1] in ("[", "{")
    if not bracketed and expected not in ("list", "dict"):
        return ""
    if bracketed:
        fixed = quoted_json(value)
    else:  # the brackets are gone too: 'head' for a list, 'width:2' for a dict
        fixed = quoted_json("{" + value + "}") if expected == "dict" else json.dumps([value])
    example = fixed or ('{"width": 2}' if expected == "dict" or value.strip()[:1] == "{" else '[["backbone/.*", null]]')
    return (f"; JSON needs quotes around strings, and the shell removes unquoted ones (and splits unquoted "
            f"{{a,b}}): quote the whole value, e.g. --config.{dotted}='{example}'")


def _user_frame(tb: TracebackType | None, path: pathlib.Path):
    """The innermost frame of ``tb`` that runs the file ``path`` (the config file), and its line number."""
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        if pathlib.Path(frame.f_code.co_filename).resolve() == path:
            found = (frame, lineno)
    return found


def _failed_node(tb: TracebackType | None):
    """``(ConfigDict, key, value)`` of the innermost ml_collections ``__getattr__/__setattr__/__getitem__/
    __setitem__`` in ``tb`` (``value``: what was being set, else None)."""
    node = None
    for frame, _ in traceback.walk_tb(tb):
        loc = frame.f_locals
        key = loc.get("attribute", loc.get("key"))
        if isinstance(loc.get("self"), ml_collections.ConfigDict) and isinstance(key, str):
            node = (loc["self"], key, loc.get("value"))
    return node


def _node_path(frame, node: ml_collections.ConfigDict):
    """``(root, 'a.b.')``: a ConfigDict local of ``frame`` and the path of ``node`` under it; None if none holds it."""
    def walk(cfg, prefix):
        if cfg is node:
            return prefix
        for k, v in cfg.items():
            if isinstance(v, ml_collections.ConfigDict):
                hit = walk(v, f"{prefix}{k}.")
                if hit is not None:
                    return hit
        return None

    for value in frame.f_locals.values():
        if isinstance(value, ml_collections.ConfigDict):
            hit = walk(value, "")
            if hit is not None:
                return value, hit
    return None


def file_error(e: Exception, path: str) -> str | None:
    """One line for an unknown key or a wrong type set by config file ``path``'s own code, else None.

    ``c.train.stepz = 3`` in ``get_config`` -> ``'FILE line 12: unknown config key config.train.stepz
    (c.train.stepz = 3); did you mean config.train.steps?'``. Other errors are not explained (None).
    """
    if not isinstance(e, (AttributeError, KeyError, TypeError)):
        return None
    user = _user_frame(e.__traceback__, pathlib.Path(path).resolve())
    failed = _failed_node(e.__traceback__)
    if user is None or failed is None:
        return None
    frame, lineno = user
    node, key, value = failed
    source = linecache.getline(frame.f_code.co_filename, lineno).strip()
    where = f"{path} line {lineno} ({source})" if source else f"{path} line {lineno}"
    found = _node_path(frame, node)
    dotted = found[1] + key if found else key
    if isinstance(e, TypeError):
        field = node._fields.get(key)  # noqa: SLF001 (ml_collections keeps FieldReferences here)
        expected = f"{field.get_type().__name__} or None" if isinstance(field, config_dict.FieldReference) \
            else type(field).__name__
        return f"{where}: config.{dotted}: expected {expected}, got {value!r} ({type(value).__name__})"
    keys = all_keys(found[0]) if found else list(node.keys())
    return f"{where}: unknown config key config.{dotted}{did_you_mean(dotted, keys)}"
