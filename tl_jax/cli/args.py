"""What every ``tl-jax`` subcommand shares: config overrides, config resolution, one-line errors.

Imported by the dispatcher (:mod:`tl_jax.cli.main`) and by each subcommand's
module; it imports none of them, so nothing imports the CLI back. It stays
light (no JAX): ``tl-jax --help`` goes through it.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import ml_collections

from tl_jax import config as config_lib

# Errors a user can fix from the message alone: printed as one line, exit status 2.
# TL_JAX_DEBUG=1 shows the full traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, FloatingPointError)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=v`` (or ``--config.a.b v``) overrides from other args.

    Returns ``(rest, overrides)`` with each override as ``'a.b=v'`` (the part after ``--config.``).
    """
    rest, overrides = [], []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body = f"{body}={argv[i + 1]}"
                next(it, None)
            overrides.append(body)
        else:
            rest.append(arg)
    return rest, overrides


def resolve_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """``FILE.py[:ARG]`` loaded by its ``get_config(ARG)``, then ``overrides`` (``['a.b=v', ...]``) applied."""
    config = config_lib.load_config(spec)
    return config_lib.apply_overrides(config, overrides)


def run_command(fn: Callable[[Sequence[str]], int], argv: Sequence[str], prog: str = "tl-jax") -> int:
    """``fn(argv)`` with logging set up; user errors (:data:`USER_ERRORS`) become ``PROG: error: ...``, exit 2.

    A preempted run exits with its own status (``Preempted.exit_code``), Ctrl-C with 130.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    _quiet_libraries()
    try:
        return fn(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_preempted(e):
            print(f"{prog}: {e}", file=sys.stderr)
            return e.exit_code
        if not isinstance(e, USER_ERRORS) or os.environ.get("TL_JAX_DEBUG"):
            raise
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def _is_preempted(e: BaseException) -> bool:
    """``e`` is a :class:`tl_jax.train.preemption.Preempted`.

    Looked up in ``sys.modules`` rather than imported: that module imports JAX, which a command's
    ``--help`` must not pay for, and a run that was preempted has imported it already.
    """
    preemption = sys.modules.get("tl_jax.train.preemption")
    return preemption is not None and isinstance(e, preemption.Preempted)


def _quiet_libraries() -> None:
    """absl, orbax, JAX internals and tfds log warnings and errors only."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover
        absl_logging = None
    if absl_logging is not None:
        absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Sharding info not provided.*")
