"""The ``tl-jax`` command line: help without JAX, every subcommand's --help, the package's import shape."""
import ast
import pathlib
import subprocess
import sys
import time

import pytest

from tl_jax import cli
from tl_jax.cli import main
from tl_jax.cli.main import COMMANDS, command_function

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tl_jax", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_lists_every_command_fast(args):
    _run("--help")  # a first run warms the file cache: what is timed is tl-jax, not the disk
    proc, seconds = _run(*args)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    for name, cmd in COMMANDS.items():
        assert sum(line.split()[:1] == [name] and cmd.summary in line for line in lines) == 1, name
    assert seconds < 1.0, f"tl-jax {' '.join(args)} took {seconds:.2f} s"


def test_help_imports_no_jax():
    code = ("import sys; from tl_jax.cli import main; assert main(['--help']) == 0; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'flax', 'optax', 'tensorflow_datasets')); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv", [[name] for name in COMMANDS]
                         + [["data", "prepare"], ["weights", "convert"], ["weights", "inspect"]])
def test_each_subcommand_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tl-jax {' '.join(argv)}"), out[:200]


@pytest.mark.parametrize("name, actions", [("data", ["prepare"]), ("weights", ["convert", "inspect"])])
def test_data_and_weights_help_list_their_actions(name, actions, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"\n  {a} " in out for a in actions), out


def test_missing_action_and_unknown_command_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2 and "usage: tl-jax data" in capsys.readouterr().err
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-jax: error: unknown command 'trian'") and "train" in err


def test_every_command_resolves_to_its_function():
    for name in COMMANDS:
        fn = command_function(name)
        assert callable(fn) and fn.__module__ == f"tl_jax.cli.{COMMANDS[name].module}"


def test_shared_helpers_are_exported():
    assert cli.split_overrides(["--config.a=1", "x"]) == (["x"], ["a=1"])
    assert cli.main is main and callable(cli.resolve_config) and callable(cli.run_command)
    assert ValueError in cli.USER_ERRORS


def _tl_jax_imports(path: pathlib.Path) -> set[str]:
    """Every ``tl_jax...`` module that ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_jax"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tl_jax"))
    return out


def test_nothing_outside_the_cli_imports_it():
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tl_jax").rglob("*.py"))
             if "cli" not in p.relative_to(ROOT / "tl_jax").parts[:1] and p.name != "__main__.py"
             and any(m == "tl_jax.cli" or m.startswith("tl_jax.cli.") for m in _tl_jax_imports(p))]
    assert users == []


def test_cli_modules_do_not_import_the_dispatcher_back():
    for path in sorted((ROOT / "tl_jax" / "cli").glob("*.py")):
        if path.name in ("__init__.py", "__main__.py", "main.py"):
            continue
        bad = {m for m in _tl_jax_imports(path) if m in ("tl_jax.cli", "tl_jax.cli.main")}
        assert not bad, (path.name, bad)


def test_entry_points_run_the_same_command():
    for module in ("tl_jax", "tl_jax.cli", "tl_jax.train"):
        proc = subprocess.run([sys.executable, "-m", module, *([] if module == "tl_jax.train" else ["train"]),
                               "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0 and "--workdir" in proc.stdout and "--mock-data" in proc.stdout, (module, proc)
    assert proc.stdout.startswith("usage: python -m tl_jax.train")
