"""``tl-jax report ROOT``: collect a study's ``summary.json`` files into tables and plots.

    tl-jax report runs/demo [--group method,shots] [--metric test/accuracy]

Writes ``results.csv``, ``results.md``, ``results.png`` and ``curves.png`` into
ROOT (:mod:`tl_jax.sweep.report`) and prints the table.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-jax report", description="Collect summary.json files into tables/plots "
                                "(results.csv, results.md, results.png, curves.png).")
    p.add_argument("root", help="a study dir with one sub-workdir per run")
    p.add_argument("--group", default=None, help="comma-separated point fields to group by "
                   "(default: every field that varies, except seeds)")
    p.add_argument("--metric", default="test/accuracy", help="summary.json key to tabulate (default test/accuracy)")
    return p


def cmd_report(argv: Sequence[str]) -> int:
    args = report_parser().parse_args(argv)
    # Deferred (matplotlib, pandas-like tables): `tl-jax report --help` runs without them.
    from tl_jax.sweep.report import write_report

    group = None if args.group is None else [g for g in args.group.split(",") if g]
    print(write_report(args.root, group_by=group, metric=args.metric))
    return 0
