"""Shared test setup: CPU only, a persistent compile cache, one prepared tfds dir.

The embedded datasets are prepared once per test session into a temporary
directory (``tfds_data_dir`` fixture), never into the user's ~/tensorflow_datasets.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("TL_JAX_COMPILE_CACHE", str(_CACHE))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["TL_JAX_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
    """A tfds data_dir shared by the whole session (embedded sets prepared lazily)."""
    env = os.environ.get("TL_JAX_TEST_DATA_DIR")
    if env:
        return env
    return str(tmp_path_factory.getbasetemp() / "tfds")


RUN_FILES = [".lock.0", "checkpoints", "config.json", "events.out.tfevents.*", "metrics.jsonl", "summary.json"]


def workdir_files(workdir) -> list[str]:
    """A workdir's entries, TensorBoard event files shown as one ``events.out.tfevents.*`` (compare with RUN_FILES)."""
    names = {("events.out.tfevents.*" if n.startswith("events.out.tfevents.") else n) for n in os.listdir(workdir)}
    return sorted(names)


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """Each test sees every once-per-process warning afresh (tl_jax.util.log_once)."""
    from tl_jax.util import log_once

    log_once.reset()
    yield
