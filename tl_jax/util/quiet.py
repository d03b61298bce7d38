"""Silence third-party chatter around calls known to log or print harmlessly.

* :func:`absl_errors_only`: absl (orbax, tfds) logs below ERROR are dropped while open,
  e.g. orbax's "Metadata file does not exist" for a train state's sub-directory;
* :func:`quiet_tfds`: the same, plus no tfds progress bars and, optionally, nothing
  printed to stdout ("Downloading and preparing dataset ...") while a dataset is prepared.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def absl_errors_only() -> Iterator[None]:
    """The ``absl`` logger at ERROR while open; its level restored after."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


@contextlib.contextmanager
def quiet_tfds(stdout: bool = False) -> Iterator[None]:
    """:func:`absl_errors_only`, no tfds progress bars, and (``stdout=True``) stdout swallowed."""
    import tensorflow_datasets as tfds

    with absl_errors_only(), contextlib.ExitStack() as stack:
        tfds.disable_progress_bar()
        stack.callback(tfds.enable_progress_bar)
        if stdout:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        yield
