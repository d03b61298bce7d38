"""Collect a study's ``summary.json`` files into ``results.csv``, ``results.md`` and ``results.png``.

Each sub-workdir with a ``summary.json`` and a ``point.json`` is one run. Runs
are grouped by the ``group_by`` fields of their point (e.g. method, shots) and
``metric`` is reported as mean ± std (population std, ddof=0) over the rest
(the seeds). The Markdown table has one row per first group field and one
column per second; the best mean per column is in bold.
"""
from __future__ import annotations

import csv
import json
import pathlib
from collections import defaultdict

import numpy as np


def collect(root: str) -> list[dict]:
    """One flat record per finished run: point fields + summary metrics + ``run``."""
    rows = []
    for summary_file in sorted(pathlib.Path(root).glob("*/summary.json")):
        point_file = summary_file.parent / "point.json"
        if not point_file.exists():
            continue
        point = json.loads(point_file.read_text())
        point.pop("source", None)
        rows.append({"run": summary_file.parent.name, **point, **json.loads(summary_file.read_text())})
    return rows


def aggregate(rows: list[dict], group_by: list[str], metric: str) -> dict[tuple, tuple[float, float, int]]:
    """``{(group values): (mean, std, n)}`` of ``metric``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if metric in r and all(g in r for g in group_by):
            groups[tuple(r[g] for g in group_by)].append(float(r[metric]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def markdown_table(stats: dict[tuple, tuple[float, float, int]], row_field: str, col_field: str,
                   metric: str) -> str:
    rows = sorted({k[0] for k in stats}, key=str)
    cols = sorted({k[1] for k in stats}, key=lambda c: (isinstance(c, str), c))
    best = {c: max((stats[(r, c)][0] for r in rows if (r, c) in stats), default=None) for c in cols}
    lines = [f"| {row_field} \\ {col_field} | " + " | ".join(f"{col_field}={c}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            if (r, c) not in stats:
                cells.append("–")
                continue
            mean, std, n = stats[(r, c)]
            cell = f"{mean:.3f} ± {std:.3f} (n={n})"
            cells.append(f"**{cell}**" if mean == best[c] else cell)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return f"{metric}, mean ± std over seeds:\n\n" + "\n".join(lines)


def plot(stats: dict[tuple, tuple[float, float, int]], path: pathlib.Path, col_field: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({k[0] for k in stats}, key=str):
        xs = sorted(k[1] for k in stats if k[0] == method)
        ys = [stats[(method, x)][0] for x in xs]
        es = [stats[(method, x)][1] for x in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=str(method))
    if all(isinstance(k[1], (int, float)) and k[1] > 0 for k in stats):
        ax.set_xscale("log")
    ax.set_xlabel(col_field)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: str, group_by: list[str], metric: str = "test/accuracy") -> str:
    """Write results.csv/.md/.png into ``root``; returns the Markdown table."""
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no finished runs (summary.json + point.json) under {root}")
    out = pathlib.Path(root)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    stats = aggregate(rows, group_by, metric)
    table = markdown_table(stats, group_by[0], group_by[1], metric)
    (out / "results.md").write_text(table + "\n")
    plot(stats, out / "results.png", group_by[1], metric)
    return table
