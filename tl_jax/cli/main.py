"""The ``tl-jax`` command line (also ``python -m tl_jax.train``).

    tl-jax train --config experiments/mnist_to_digits.py:stage=source --workdir runs/src
    tl-jax train --config experiments/mnist_to_digits.py:stage=target,shots=10 --workdir runs/ft \\
        --config.init_from=runs/src --config.param_rules='[["backbone/.*", null], [".*", 1.0]]'
    tl-jax sweep --config experiments/freeze_depth.py --workdir runs/freeze [--jobs 2] [--vectorize auto]
    tl-jax sweep --config ... --workdir ROOT --list | --index K|auto | --shard I/N   (array tasks: docs/cluster.md)
    tl-jax report runs/demo [--group method,shots] [--metric test/accuracy]
    tl-jax search --config FILE.py[:ARG] --workdir ROOT --trials N   (Optuna over get_search: tl_jax/sweep/search.py)
    tl-jax eval --workdir runs/ft [--checkpoint best] [--dataset optdigits --split test]  (tl_jax/cli/eval_predict.py)
    tl-jax predict --workdir runs/ft --image-folder DIR --out preds   (PREFIX.npz, PREFIX.csv)
    tl-jax data prepare --image-folder DIR --name NAME --data-dir D   (see tl_jax/cli/data_weights.py)
    tl-jax weights convert --from FILE --mapping bert --model bert --out DIR
    tl-jax rank --target CONFIG --candidates W1 W2 ... [--layer features] [--score logme,leep] [--out DIR]
    tl-jax fewshot --workdir W --target CONFIG [--shots 1,5,10,25] [--seeds 3]   (both: tl_jax/cli/rank_fewshot.py)
    tl-jax interpolate --finetuned W1 [--pretrained W0] --alphas 0,0.5,1 --out DIR   (WiSE-FT)

Errors a user can fix (config keys, paths, rules, data) are printed as one line
``tl-jax: error: ...`` with exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tl_jax.cli.data_weights import cmd_data, cmd_weights  # `data prepare`, `weights convert` (light imports)
from tl_jax.cli.eval_predict import cmd_eval, cmd_predict  # `eval`, `predict` (light imports)
from tl_jax.cli.rank_fewshot import cmd_fewshot, cmd_rank  # `rank`, `fewshot` (light imports)

# Errors a user can fix from the message alone: printed as one line, exit status 2.
# TL_JAX_DEBUG=1 shows the full traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, FloatingPointError)


def _train_parser(prog: str = "tl-jax train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train (or resume) one run into --workdir.",
                                epilog="Any --config.KEY=VALUE overrides a config key (JSON values: null, lists).")
    p.add_argument("--config", required=True, help="experiments/FILE.py[:key=value,...]")
    p.add_argument("--workdir", required=True, help="output dir (config.json, metrics.jsonl, summary.json, checkpoints/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run with another config in --workdir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--mock-data", type=int, default=None, metavar="N", help="train on N random tfds examples of "
                   "the catalogue dataset's real features and shapes (config.data.mock_examples): checks shapes, "
                   "freezing and compile without the data; recorded in config.json and summary.json")
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=v`` (or ``--config.a.b v``) overrides from other args."""
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


def resolve_config(spec: str, overrides: Sequence[str]):
    from tl_jax import config as config_lib

    config = config_lib.load_config(spec)
    return config_lib.apply_overrides(config, overrides)


def cmd_train(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    args = _train_parser().parse_args(rest)
    config = resolve_config(args.config, overrides)
    if args.mock_data is not None:  # the same as --config.data.mock_examples=N
        from tl_jax import config as config_lib

        config_lib.set_value(config, "data.mock_examples", args.mock_data)
    if args.print_config:
        print(config)
        return 0
    from tl_jax.parallel import distributed

    # Multi-host: join before any JAX op; processes other than 0 log warnings only.
    if distributed.initialize(config.parallel):
        import jax

        if jax.process_index() != 0:
            logging.getLogger("tl_jax").setLevel(logging.WARNING)
    from tl_jax.train.loop import train

    summary = train(config, args.workdir, overwrite=args.overwrite)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(summary.items())))
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="tl-jax report", description="Collect summary.json files into tables/plots "
                                "(results.csv, results.md, results.png, curves.png).")
    p.add_argument("root", help="a study dir with one sub-workdir per run")
    p.add_argument("--group", default=None, help="comma-separated point fields to group by "
                   "(default: every field that varies, except seeds)")
    p.add_argument("--metric", default="test/accuracy", help="summary.json key to tabulate (default test/accuracy)")
    args = p.parse_args(argv)
    from tl_jax.sweep.report import write_report

    group = None if args.group is None else [g for g in args.group.split(",") if g]
    print(write_report(args.root, group_by=group, metric=args.metric))
    return 0


def cmd_sweep(argv: Sequence[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tl-jax sweep", description="Run every point of a config file's get_sweep "
                                "into its own sub-workdir (skips finished points, resumes unfinished ones).",
                                epilog="Any --config.KEY=VALUE overrides a config key of every point. Array jobs: "
                                "see docs/cluster.md.")
    p.add_argument("--config", required=True, help="experiments/FILE.py[:ARG]; ARG goes to get_sweep(ARG)")
    p.add_argument("--workdir", required=True, help="the study dir: one sub-workdir per point, sweep.json, reports")
    p.add_argument("--jobs", type=int, default=1, help="points run in up to N parallel processes (default 1)")
    p.add_argument("--vectorize", default="auto", choices=("auto", "on", "off"),
                   help="train points that differ only in traced numbers as one vmapped step: auto (default) "
                        "times a few steps of each way and takes the faster")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--list", action="store_true", help="print each point's index, name, phase and status "
                      "(pending/running/finished/failed) and exit")
    task.add_argument("--index", default=None, metavar="K|auto", help="run point K only (auto: "
                      "$SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX)")
    task.add_argument("--shard", default=None, metavar="I/N", help="run the points k with k %% N == I")
    p.add_argument("--no-wait", action="store_true", help="with --index/--shard: exit (status --no-wait-code) "
                   "instead of waiting when an earlier phase is not finished")
    p.add_argument("--no-wait-code", type=int, default=75, help="exit status of --no-wait (default 75, EX_TEMPFAIL)")
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between checks of earlier phases (default 10)")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="where points run: local "
                   "(default) or ray (one Ray task per point, reserving the point's _resources, default 1 CPU; "
                   "pip install 'tl_jax[ray]')")
    p.add_argument("--address", default=None, help="--executor ray: the cluster address (default: a local runtime)")
    p.add_argument("--retries", type=int, default=1, help="--executor ray: retries of a failed point (default 1)")
    args = p.parse_args(rest)
    tasks = args.list or args.index is not None or args.shard is not None
    if args.executor == "ray":
        from tl_jax.sweep.ray_executor import run_ray

        if tasks:
            raise ValueError("--executor ray runs the whole sweep: drop --list/--index/--shard")
        run_ray(args.config, args.workdir, address=args.address, retries=args.retries, overrides=overrides)
    elif tasks:
        if args.jobs != 1:
            raise ValueError("--jobs is for a whole sweep in one task: with --index/--shard start more tasks")
        from tl_jax.sweep.tasks import NotReady, run_tasks

        try:
            out = run_tasks(args.config, args.workdir, index=args.index, shard=args.shard, list_only=args.list,
                            overrides=overrides, wait=not args.no_wait, poll_s=args.poll_s,
                            no_wait_code=args.no_wait_code)
        except NotReady as e:
            print(f"tl-jax sweep: {e}", file=sys.stderr)
            return e.exit_code
        if args.list:
            print(out)
        return 0  # no report: other tasks may still run (tl-jax report ROOT when all are done)
    else:
        from tl_jax.sweep.runner import run_sweep

        run_sweep(args.config, args.workdir, jobs=args.jobs, vectorize=args.vectorize, overrides=overrides)
    if not args.no_report:
        from tl_jax.sweep.report import write_report

        try:
            print(write_report(args.workdir))
        except (KeyError, FileNotFoundError) as e:
            logging.getLogger("tl_jax").warning("no report: %s", e)
    return 0


def cmd_search(argv: Sequence[str]) -> int:
    """``tl-jax search``: Optuna over ``get_search`` (tl_jax/sweep/search.py)."""
    from tl_jax.sweep.search import main as search_main

    return search_main(list(argv))


def cmd_interpolate(argv: Sequence[str]) -> int:
    """`tl-jax interpolate`: WiSE-FT weight interpolation (tl_jax/params/interpolate.py; imported when run)."""
    from tl_jax.params.interpolate import cmd_interpolate as run

    return run(argv)


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "report": cmd_report, "eval": cmd_eval,
            "predict": cmd_predict, "data": cmd_data, "weights": cmd_weights, "search": cmd_search,
            "rank": cmd_rank, "fewshot": cmd_fewshot, "interpolate": cmd_interpolate}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: tl-jax {{{','.join(COMMANDS)}}} ...  (tl-jax COMMAND --help)", file=sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"tl-jax: error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[argv[0]], argv[1:], prog=f"tl-jax {argv[0]}")


def run_command(fn, argv: Sequence[str], prog: str = "tl-jax") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    _quiet_libraries()
    from tl_jax.train.preemption import Preempted

    try:
        return fn(argv)
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:
        if os.environ.get("TL_JAX_DEBUG"):
            raise
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
    for name in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Sharding info not provided.*")


if __name__ == "__main__":
    sys.exit(main())
