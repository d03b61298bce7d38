"""`make test-fast` (``pytest -m "not slow"``) touches every tl_jax module at least once.

Static, from the source (nothing imported but the CLI's command table): a module is
*reached* by the fast tier when

* a test file that is not wholly slow (no module-level ``pytestmark = pytest.mark.slow``)
  imports it outside its ``@pytest.mark.slow`` tests, or calls ``main(["COMMAND", ...])``
  of the ``tl-jax`` dispatcher (that runs the command's module, ``tl_jax.cli.COMMANDS``);
* or a reached module imports it at its top level (that import runs whenever the
  reached module is imported). Function-level imports do not count: they run only if
  that function is called.

A new module with no fast test fails here, naming the module: add a small test, or
import it from an existing fast test that exercises it.
"""
from __future__ import annotations

import ast
import pathlib

from tl_jax.cli.main import COMMANDS  # a static table: importing it imports no JAX

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tl_jax"
# `python -m` wrappers (`sys.exit(main())`), run in subprocesses by the slow end-to-end tests
EXEMPT = {"tl_jax.__main__", "tl_jax.cli.__main__", "tl_jax.train.__main__"}


def module_name(path: pathlib.Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, package: str) -> set[str]:
    """Dotted names an Import/ImportFrom node brings in: the module and ``module.name`` for each name."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        return {base} | {f"{base}.{a.name}" for a in node.names}
    return set()


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in decorators)


def _cli_command(node: ast.AST) -> str | None:
    """``COMMAND`` of a call ``main(["COMMAND", ...])`` / ``cli.main([...])``, else None."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.List)):
        return None
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    first = node.args[0].elts[0] if node.args[0].elts else None
    if func == "main" and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def fast_imports(test_file: pathlib.Path, commands: dict) -> set[str] | None:
    """Modules ``test_file`` imports outside slow tests (None: the whole file is slow)."""
    tree = ast.parse(test_file.read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                and "slow" in ast.unparse(node.value)):
            return None
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_slow(node.decorator_list):
            return
        found.update(_imported(node, "tests"))
        command = _cli_command(node)
        if command in commands:
            found.add(f"tl_jax.cli.{commands[command].module}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def top_level_imports(name: str, path: pathlib.Path) -> set[str]:
    """What importing module ``name`` imports for sure: its top-level imports and its parent packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
    for node in ast.parse(path.read_text()).body:
        out |= _imported(node, package)
    return out


def reached_modules() -> tuple[set[str], list[str]]:
    """(modules the fast tier reaches, the test files it runs)."""
    modules = all_modules()
    reached, fast_files = set(), []
    for test_file in sorted((ROOT / "tests").glob("test_*.py")):
        names = fast_imports(test_file, COMMANDS)
        if names is not None:
            fast_files.append(test_file.name)
            reached |= names & set(modules)
    stack = list(reached)
    while stack:
        name = stack.pop()
        for dep in top_level_imports(name, modules[name]) & set(modules):
            if dep not in reached:
                reached.add(dep)
                stack.append(dep)
    return reached, fast_files


def test_every_module_is_reached_by_a_fast_test():
    reached, fast_files = reached_modules()
    missing = sorted(set(all_modules()) - reached - EXEMPT)
    assert not missing, (f"no fast test (one not marked slow) reaches {missing}: import it from a fast test in "
                         f"tests/ (fast files: {len(fast_files)})")


def test_the_scan_sees_imports_slow_marks_and_cli_commands(tmp_path):
    """The scanner itself: a slow test's import and a wholly slow file do not count; main(['report']) does."""
    f = tmp_path / "test_x.py"
    f.write_text("import pytest\nfrom tl_jax.sweep import report\nfrom tl_jax.cli import main\n\n"
                 "def test_a():\n    from tl_jax.params import merge\n    main(['report', 'x'])\n\n"
                 "@pytest.mark.slow\ndef test_b():\n    import tl_jax.weights.convert\n")
    found = fast_imports(f, COMMANDS)
    assert {"tl_jax.sweep.report", "tl_jax.params.merge", f"tl_jax.cli.{COMMANDS['report'].module}"} <= found
    assert "tl_jax.weights.convert" not in found
    f.write_text("import pytest\nimport tl_jax.weights.convert\npytestmark = pytest.mark.slow\n")
    assert fast_imports(f, COMMANDS) is None
    assert "tl_jax.params.param_rules" in top_level_imports("tl_jax.params", PACKAGE / "params" / "__init__.py")
