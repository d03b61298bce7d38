"""``tl-jax train`` (also ``python -m tl_jax.train``): train or resume one run into ``--workdir``.

    tl-jax train --config experiments/mnist_to_digits.py:stage=source --workdir runs/src
    tl-jax train --config experiments/mnist_to_digits.py:stage=target,shots=10 --workdir runs/ft \\
        --config.init_from=runs/src --config.param_rules='[["backbone/.*", null], [".*", 1.0]]'

Prints the run's summary (``summary.json``) as ``key=value`` on one line.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from tl_jax import config as config_lib
from tl_jax.cli.args import resolve_config, split_overrides


def train_parser(prog: str = "tl-jax train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train (or resume) one run into --workdir.",
                                epilog="Any --config.KEY=VALUE overrides a config key (JSON values: null, lists; "
                                       "quote them for the shell: --config.param_rules='[[\"head/.*\", 1.0]]').")
    p.add_argument("--config", required=True, help="experiments/FILE.py[:key=value,...]")
    p.add_argument("--workdir", required=True, help="output dir (config.json, metrics.jsonl, summary.json, checkpoints/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run with another config in --workdir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--mock-data", type=int, default=None, metavar="N", help="train on N random tfds examples of "
                   "the catalogue dataset's real features and shapes (config.data.mock_examples): checks shapes, "
                   "freezing and compile without the data; recorded in config.json and summary.json")
    return p


def cmd_train(argv: Sequence[str], prog: str = "tl-jax train") -> int:
    rest, overrides = split_overrides(argv)
    args = train_parser(prog).parse_args(rest)
    config = resolve_config(args.config, overrides)
    if args.mock_data is not None:  # the same as --config.data.mock_examples=N
        config_lib.set_value(config, "data.mock_examples", args.mock_data)
    if args.print_config:
        print(config)
        return 0
    # Deferred (JAX): `tl-jax train --help` and --print-config run without it.
    import jax

    from tl_jax.parallel import distributed  # deferred (JAX), as above

    # Multi-host: join before any JAX op (so before tl_jax.train.loop is imported); processes other than 0
    # log warnings only.
    if distributed.initialize(config.parallel) and jax.process_index() != 0:
        logging.getLogger("tl_jax").setLevel(logging.WARNING)
    # tl_jax.train.loop also imports every module that registers a config check (config.validate runs them).
    from tl_jax.train.loop import train

    summary = train(config, args.workdir, overwrite=args.overwrite)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(summary.items())))
    return 0
