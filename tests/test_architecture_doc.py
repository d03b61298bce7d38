"""docs/architecture.md names real files: every ``tl_jax/...`` or ``tests/...`` path it mentions exists, and
README links it."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"(?<![\w/.<])((?:tl_jax|tests|docs)/[\w/.<>-]*[\w/])")


def named_paths(text: str) -> list[str]:
    """Paths the text names, without placeholders such as ``tl_jax/objectives/<method>.py``."""
    return sorted({p.rstrip("/") for p in PATH.findall(text) if "<" not in p})


def test_path_finder():
    assert named_paths("see `tl_jax/train/build.py` and tl_jax/cli/, not tl_jax/objectives/<m>.py") == [
        "tl_jax/cli", "tl_jax/train/build.py"]


def test_every_path_in_architecture_doc_exists():
    paths = named_paths(DOC.read_text())
    assert len(paths) > 30
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_readme_links_the_architecture_page():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
