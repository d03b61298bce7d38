"""The ``tl-jax`` dispatcher: ``tl-jax COMMAND ...`` runs ``cmd_COMMAND`` of the command's module.

The command table below is static text, and a command's module is imported
only when that command runs, so ``tl-jax``, ``tl-jax --help`` and ``tl-jax -h``
print the list of commands without importing JAX (well under a second).

Errors a user can fix (config keys, paths, rules, data) are printed as one line
``tl-jax COMMAND: error: ...`` with exit status 2, without a traceback
(:func:`run_command`; ``TL_JAX_DEBUG=1`` shows it).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tl_jax.cli.args import USER_ERRORS


class Command(NamedTuple):
    module: str  # under tl_jax.cli
    function: str
    summary: str  # the one line of `tl-jax --help`


COMMANDS: dict[str, Command] = {
    "train": Command("train", "cmd_train", "train (or resume) one run into --workdir"),
    "sweep": Command("sweep", "cmd_sweep", "run every point of a config file's get_sweep, then report"),
    "report": Command("report", "cmd_report", "tables and plots of a study's summary.json files"),
    "search": Command("search", "cmd_search", "Optuna (TPE) search over a config file's get_search space"),
    "eval": Command("eval_predict", "cmd_eval", "evaluate a saved run's checkpoint on a split"),
    "predict": Command("eval_predict", "cmd_predict", "per-example predictions of a saved run (npz + csv)"),
    "rank": Command("rank_fewshot", "cmd_rank", "rank candidate source models for a target by transferability"),
    "fewshot": Command("rank_fewshot", "cmd_fewshot", "few-shot ridge accuracy of a run's frozen features"),
    "analyze": Command("analyze", "cmd_analyze", "t-SNE and proxy A-distance of runs' source vs target features"),
    "interpolate": Command("interpolate", "cmd_interpolate", "WiSE-FT: mix pretrained and fine-tuned weights"),
    "data": Command("data", "cmd_data", "prepare an image folder or a CSV of texts as a dataset"),
    "weights": Command("weights", "cmd_weights",
                       "convert or inspect a weights file (safetensors, torch, npz); merge LoRA"),
}


def help_text() -> str:
    """What ``tl-jax --help`` prints: usage, one line per command, where to read more."""
    width = max(map(len, COMMANDS))
    lines = ["usage: tl-jax COMMAND [ARGS ...]   (tl-jax COMMAND --help for a command's options)", "",
             "Transfer learning in JAX/Flax: train, sweep and compare runs, rank sources, bring your own data "
             "and weights.", "", "commands:"]
    lines += [f"  {name:{width}s}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Any --config.KEY=VALUE overrides a config key (train, sweep, search, rank, fewshot). "
              "Docs: README.md, docs/."]
    return "\n".join(lines)


def command_function(name: str):
    """``cmd_NAME`` of the command's module (imported now: deferred so that --help stays JAX-free)."""
    cmd = COMMANDS[name]
    return getattr(importlib.import_module(f"tl_jax.cli.{cmd.module}"), cmd.function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if argv[0] not in COMMANDS:
        print(f"tl-jax: error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)} "
              f"(tl-jax --help)", file=sys.stderr)
        return 2
    return run_command(command_function(argv[0]), argv[1:], prog=f"tl-jax {argv[0]}")


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


if __name__ == "__main__":
    sys.exit(main())
