"""What every ``tl-jax`` subcommand shares: config overrides, config resolution, the errors a user can fix.

Imported by the dispatcher (:mod:`tl_jax.cli.main`) and by each subcommand's
module; it imports none of them, so nothing imports the CLI back. It stays
light (no JAX): ``tl-jax --help`` goes through it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence

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


def json_arg(text: str, kind: type, what: str) -> object:
    """``text`` (a flag's value) parsed as JSON of type ``kind`` (``list``, ``dict``); otherwise one line
    ``WHAT must be ...`` naming the flag (``what``: e.g. ``'--model-kwargs must be a JSON dict'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{what}, got {text!r}")
    return value


def action_parser(prog: str, description: str, actions: Mapping[str, str]) -> argparse.ArgumentParser:
    """``PROG ACTION ...``: the first argument one of ``actions`` (name -> what it does, listed by ``--help``),
    the rest left for that action's own parser."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="actions:\n" + "\n".join(f"  {k:9s} {v}" for k, v in actions.items())
                                + f"\n({prog} ACTION --help)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=sorted(actions), help="what to do (see below)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the action's arguments")
    return p
