"""The ``tl-jax`` dispatcher: ``tl-jax COMMAND ...`` runs ``cmd_COMMAND`` of the command's module.

The command table below is static text, and a command's module is imported
only when that command runs, so ``tl-jax``, ``tl-jax --help`` and ``tl-jax -h``
print the list of commands without importing JAX (well under a second).

Errors a user can fix (config keys, paths, rules, data) are printed as one line
``tl-jax COMMAND: error: ...`` with exit status 2, without a traceback
(:func:`tl_jax.cli.args.run_command`; ``TL_JAX_DEBUG=1`` shows it).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from tl_jax.cli.args import run_command


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


if __name__ == "__main__":
    sys.exit(main())
