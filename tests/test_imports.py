"""The import graph of ``tl_jax``: no cycles, and no hidden imports inside functions.

Read statically (``ast``), so the test sees every module without importing it:

* an edge ``a -> b`` for each module-level ``import tl_jax.b`` / ``from tl_jax.b import x`` in ``a``
  (``from tl_jax.pkg import sub``, where ``sub`` is a module, is an edge to ``tl_jax.pkg.sub``);
  a strongly connected component with more than one module is a cycle;
* a ``tl_jax`` import inside a function is allowed only to defer a heavy or optional dependency, and then
  it carries a comment (on its line or the line above) saying why.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "tl_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _targets(node: ast.AST, modules: dict) -> list[str]:
    """The tl_jax modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("tl_jax")]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tl_jax"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        plain = [a.name for a in node.names if f"{node.module}.{a.name}" not in modules]
        return subs + ([node.module] if plain else [])
    return []


def _function_imports(tree: ast.AST):
    """Import statements inside a function body (at any depth)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for n in _function_imports(tree)}
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inner:
                edges.update(t for t in _targets(node, modules) if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_tl_jax_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (modules that import each other, directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_imports_inside_functions_say_why():
    undocumented = []
    for name, path in all_modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in _function_imports(tree):
            if not _targets(node, all_modules()) and not (isinstance(node, ast.ImportFrom)
                                                         and (node.module or "").startswith("tl_jax")):
                continue  # not a tl_jax import
            here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                undocumented.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not undocumented, ("tl_jax imports inside functions without a comment saying why (move them to the "
                              "module top, or defer a heavy dependency with a comment): " + ", ".join(undocumented))
