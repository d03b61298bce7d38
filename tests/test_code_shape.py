"""The package's shape limits (issue 29): files of at most 400 lines; functions of at most 80 lines in the
training loop and the objectives, the code a researcher reads to add a method."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
SHORT_FUNCTIONS_IN = ("tl_jax/train", "tl_jax/objectives")


def long_functions(path: pathlib.Path, limit: int) -> list[str]:
    """``'file:line name (N lines)'`` for each function of ``path`` longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                out.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_long_function_finder(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 5 + "    return x\n")
    assert long_functions(f, 3) == ["m.py:5 long (7 lines)"]
    assert long_functions(f, 7) == []


def test_no_file_over_400_lines():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted((ROOT / "tl_jax").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not big, f"files over {MAX_FILE_LINES} lines (split them by idea): {', '.join(big)}"


def test_no_function_over_80_lines_in_the_loop_and_the_objectives():
    long = [s for d in SHORT_FUNCTIONS_IN for p in sorted((ROOT / d).rglob("*.py"))
            for s in long_functions(p, MAX_FUNCTION_LINES)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
