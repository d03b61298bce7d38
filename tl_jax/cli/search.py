"""``tl-jax search``: an Optuna (TPE) search over a config file's ``get_search`` space.

    tl-jax search --config experiments/FILE.py[:ARG] --workdir ROOT --trials N [--config.KEY=VALUE ...]

The search itself (space, trials, ``optuna.journal``, ``search.json``) is
:mod:`tl_jax.sweep.search`; this module is its command line.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from tl_jax.cli.args import split_overrides
from tl_jax.sweep.search import best_lines, run_search


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax search", description="Optuna (TPE) search over a config file's "
                                "get_search space; trials train into ROOT/trial_<k>; resumable.",
                                epilog="Any --config.KEY=VALUE overrides a config key of every trial.")
    p.add_argument("--config", required=True, help="experiments/FILE.py[:ARG]; ARG goes to get_search(ARG)")
    p.add_argument("--workdir", required=True, help="the study dir: trial_<k>/, optuna.journal, search.json")
    p.add_argument("--trials", type=int, required=True, help="how many trials this invocation adds")
    return p


def cmd_search(argv: Sequence[str]) -> int:
    """``tl-jax search --config FILE[:ARG] --workdir ROOT --trials N [--config.KEY=VALUE ...]``."""
    rest, overrides = split_overrides(argv)
    args = search_parser().parse_args(rest)
    record = run_search(args.config, args.workdir, trials=args.trials, overrides=overrides)
    print(best_lines(record))
    return 0
