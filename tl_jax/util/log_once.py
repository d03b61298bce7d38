"""Warnings that would repeat on every run of a process, printed once per process.

A study runs many trainings in one process (``make demo``: 24 target runs); a
warning about the *settings* (``batch_size=32 exceeds the 10 training
examples``) is the same text for each of them and says nothing new the second
time. :func:`warn_once` logs a message the first time its formatted text is
seen by this process and drops later copies; a warning with different numbers
(another batch size, another training-set size) is a new text and is logged.

Why the formatted text and not the call site: the same call with other
arguments is new information. Why per process: a process is one user command;
tests that expect the warning call :func:`reset` first (``tests/conftest.py``
does, for every test).
"""
from __future__ import annotations

import logging

_SEEN: set[tuple[str, int, str]] = set()


def warn_once(logger: logging.Logger, msg: str, *args, level: int = logging.WARNING) -> bool:
    """``logger.log(level, msg, *args)`` unless this process already logged the same text there.

    Returns True when the message was logged, False when it was a repeat."""
    text = msg % args if args else msg
    key = (logger.name, level, text)
    if key in _SEEN:
        return False
    _SEEN.add(key)
    logger.log(level, "%s (shown once per process)", text, stacklevel=2)
    return True


def reset() -> None:
    """Forget the messages seen so far (the next :func:`warn_once` of each is logged again)."""
    _SEEN.clear()
