"""The docs stay honest: README.md and docs/*.md are checked against the code.

* README.md is at most 250 lines, and every relative link of README.md and
  docs/*.md points to an existing file (and, with ``#anchor``, to a heading of it);
* every ``tl-jax train``/``tl-jax sweep``/``python experiments/...`` command in a
  ```bash block resolves: a train command's config through
  ``tl_jax.cli.main([... "--print-config"])`` (exit 0) and ``validate``, a
  sweep's ``get_sweep`` points through :func:`tl_jax.sweep.runner.resolve`, an
  experiment script's flags through its own argparse parser plus its
  ``get_config()``/``get_sweep()``. Commands that need files this repo does not
  have are listed in ``SKIP`` with the reason; any other command that cannot be
  checked fails the test;
* every ```python block runs through ``compile``, and the ones marked
  ``<!-- test -->`` on the line before are executed in a temporary working
  directory (tfds' data dir: the session's ``tfds_data_dir``); one that trains into ``runs/`` must
  have trained something there.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# Commands that need files this repository does not have: (substring of the command, reason).
SKIP = [
    ("weights=pretrained/minilm", "needs pretrained/minilm, written by `tl-jax weights convert` from a downloaded model"),
    ("name=my_photos", "needs the dataset that `tl-jax data prepare` makes from a photos/ folder"),
    ("my_models.py:my_net", "needs the reader's my_models.py (the code block above it)"),
    ("my_data.py:load", "needs the reader's my_data.py with a load() function"),
]
SHELL_VARS = {"$i": "0"}  # loop variables of the multi-process example
SEPARATORS = {";", "&", "&&", "||", "|"}
FENCE = re.compile(r"^```(\w*)\s*$")


# ---------------------------------------------------------------- markdown parsing


def code_blocks(page: pathlib.Path) -> list[tuple[str, str, bool, int]]:
    """``(language, code, marked_test, line)`` for every fenced block of ``page``."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            marked = start > 0 and lines[start - 1].strip() == "<!-- test -->"
            out.append((m.group(1), "\n".join(body), marked, start + 1))
        i += 1
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def relative_links(page: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [u for u in links if not re.match(r"^[a-z]+:", u)]


# ---------------------------------------------------------------- shell commands


def logical_lines(code: str) -> list[str]:
    return code.replace("\\\n", " ").splitlines()


def commands(line: str) -> list[list[str]]:
    """The ``tl-jax train|sweep ...`` and ``python experiments/...`` commands of one shell line.

    Environment assignments and launchers (``srun ...``) before the command are
    dropped; a quoted argument holding a command (``gcloud ... --command="..."``)
    is searched too.
    """
    for var, value in SHELL_VARS.items():
        line = line.replace(var, value)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    found, start = [], 0
    pieces = []
    for j, tok in enumerate(tokens + [";"]):
        if tok in SEPARATORS:
            pieces.append(tokens[start:j])
            start = j + 1
    for piece in pieces:
        for k, tok in enumerate(piece):
            name = tok.rsplit("/", 1)[-1]
            if name == "tl-jax" and k + 1 < len(piece) and piece[k + 1] in ("train", "sweep"):
                found.append(piece[k:])
                break
            if name in ("python", "python3") and k + 1 < len(piece) and piece[k + 1].startswith("experiments/"):
                found.append(piece[k:])
                break
            if " " in tok and "=" in tok:  # --command="cd x && tl-jax train ..."
                found.extend(commands(tok.split("=", 1)[1]))
    return found


def doc_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for lang, code, _, line in code_blocks(page):
            if lang != "bash":
                continue
            for text in logical_lines(code):
                for cmd in commands(text):
                    out.append((f"{page.relative_to(ROOT)}:{line}", cmd))
    return out


def skip_reason(cmd: list[str]) -> str | None:
    text = " ".join(cmd)
    for needle, reason in SKIP:
        if needle in text:
            return reason
    return None


def option(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"no {name} in {args}")


def replace_option(args: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == name:
            out += [name, value]
            skip = True
        elif a.startswith(name + "="):
            out.append(f"{name}={value}")
        else:
            out.append(a)
    return out


def check_train(args: list[str], tmp: pathlib.Path) -> None:
    from tl_jax import cli
    from tl_jax import config as config_lib

    args = replace_option(args, "--workdir", str(tmp / "wd"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["train", *args, "--print-config"])
    assert rc == 0, f"exit {rc}: {err.getvalue().strip()}"
    rest, overrides = cli.split_overrides(args)
    config = cli.resolve_config(option(rest, "--config"), overrides)
    config_lib.validate(config)
    assert not (tmp / "wd").exists(), "--print-config wrote into the workdir"


def check_sweep(args: list[str], tmp: pathlib.Path) -> None:
    from tl_jax import cli
    from tl_jax.sweep import runner

    rest, overrides = cli.split_overrides(args)
    config_file, points = runner.load_points(option(rest, "--config"))
    assert points, "get_sweep returned no points"
    runner.resolve(config_file, points, tmp / "sweep", overrides)
    known = {"--config", "--workdir", "--jobs", "--vectorize", "--no-report", "--list", "--index", "--shard",
             "--no-wait", "--no-wait-code", "--poll-s", "--executor", "--address", "--retries"}
    for a in rest:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, f"tl-jax sweep has no option {a}"


class _Parsed(Exception):
    pass


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_script(args: list[str], tmp: pathlib.Path, monkeypatch) -> None:
    """``python experiments/X.py FLAGS``: its argparse accepts FLAGS; its get_config()/get_sweep() resolve."""
    from tl_jax import config as config_lib
    from tl_jax.sweep import runner

    path = ROOT / args[0]
    assert path.is_file(), f"no such script {args[0]}"
    module = _load(path)
    assert hasattr(module, "main"), f"{args[0]} has no main()"
    parsed = {}
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        parsed["args"] = real_parse(self, argv, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args[1:]])
    with pytest.raises(_Parsed):
        module.main(args[1:])
    monkeypatch.undo()
    config_lib.validate(config_lib.load_config(str(path)))
    if hasattr(module, "get_sweep"):
        runner.resolve(str(path), module.get_sweep(), tmp / "sweep")


# ---------------------------------------------------------------- tests


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            bad.append(f"{link}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{link}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_command_extraction_finds_wrapped_commands():
    line = ('XLA_FLAGS=x srun --nodes=2 tl-jax train --config a.py --workdir w --config.seed=$i & '
            'gcloud ssh --command="cd x && .venv/bin/tl-jax sweep --config b.py --workdir v" # tl-jax train')
    assert commands(line) == [["tl-jax", "train", "--config", "a.py", "--workdir", "w", "--config.seed=0"],
                              [".venv/bin/tl-jax", "sweep", "--config", "b.py", "--workdir", "v"]]


DOC_COMMANDS = doc_commands()


def test_docs_have_commands_to_check():
    kinds = {cmd[1] if "tl-jax" in cmd[0] else "script" for _, cmd in DOC_COMMANDS}
    assert kinds == {"train", "sweep", "script"}, kinds
    used = {needle for needle, _ in SKIP if any(needle in " ".join(c) for _, c in DOC_COMMANDS)}
    assert used == {needle for needle, _ in SKIP}, f"stale SKIP entries: {set(n for n, _ in SKIP) - used}"


@pytest.mark.parametrize("where,cmd", DOC_COMMANDS, ids=[f"{w}:{' '.join(c)[:70]}" for w, c in DOC_COMMANDS])
def test_command_resolves(where, cmd, tmp_path, monkeypatch):
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ROOT)
    if "tl-jax" in cmd[0]:
        (check_train if cmd[1] == "train" else check_sweep)(cmd[2:], tmp_path)
    else:
        check_script(cmd[1:], tmp_path, monkeypatch)


PY_BLOCKS = [(page, code, marked, line) for page in PAGES for lang, code, marked, line in code_blocks(page)
             if lang == "python"]


@pytest.mark.parametrize("page,code,marked,line", PY_BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, _, _, n in PY_BLOCKS])
def test_python_block_compiles(page, code, marked, line):
    compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")


TESTED = [b for b in PY_BLOCKS if b[2]]


def test_readme_and_data_examples_are_tested():
    pages = {p.relative_to(ROOT).as_posix() for p, *_ in TESTED}
    assert {"README.md", "docs/data.md"} <= pages, pages


@pytest.mark.slow
@pytest.mark.parametrize("page,code,marked,line", TESTED, ids=[f"{p.relative_to(ROOT)}:{n}" for p, _, _, n in TESTED])
def test_marked_python_block_runs(page, code, marked, line, tmp_path, monkeypatch, tfds_data_dir):
    from tensorflow_datasets.core import constants

    from tl_jax.data import in_memory

    monkeypatch.setattr(constants, "DATA_DIR", tfds_data_dir)
    monkeypatch.chdir(tmp_path)
    registered = dict(in_memory._REGISTRY)
    try:
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__docs__"})
    finally:
        for name in set(in_memory._REGISTRY) - set(registered):
            in_memory.unregister_dataset(name)
    if "runs" in code:  # an example that trains into runs/ must have trained something
        assert any((tmp_path / "runs").iterdir()), "the example trained nothing"
