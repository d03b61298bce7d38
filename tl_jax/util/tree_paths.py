"""'/'-joined paths of pytree leaves: the names rules, merges and errors speak in."""
from __future__ import annotations

from typing import Any

import jax


def path_str(path: tuple) -> str:
    """'/'-joined key path of a pytree leaf (dict keys, attributes, indices): ``backbone/conv1/kernel``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_paths(tree: Any) -> dict[str, Any]:
    """``{'a/b/kernel': leaf, ...}`` in the tree's leaf order."""
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
