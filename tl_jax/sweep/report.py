"""Collect a study's runs into ``results.csv``, ``results.md``, ``results.png`` and ``curves.png``.

    tl-jax report runs/X [--group a,b] [--metric test/accuracy]

Every ``summary.json`` below the study dir is one run (its sub-workdir name is
``run``); its ``point.json`` (written by ``tl-jax sweep``) gives the swept
fields. ``results.csv`` has one row per run: ``run``, the point's fields, every
summary value. Runs are grouped by ``group`` fields (default: every point field
that varies, except seeds: a field named ``seed`` or ending in ``seed``); the
metric is reported as mean ± std over each group's runs (the seeds, or whatever
else is not grouped; population std, ddof=0) with n. In the Markdown table the
last group field spans the columns, the others the rows; the best mean per
column is bold (highest, or lowest for a metric named like ``loss``/``error``).
``results.png``: metric vs the last group field, one line per combination of
the others, error bars = std. ``curves.png``: ``train/loss`` and the metric vs
step from ``metrics.jsonl``, at every step any run of a group logged (mean ± std
over the runs that logged it). Both plots put their legend under the axes, so it
never covers a curve. Points with ``_report: false`` (e.g. the pretraining run)
are in the CSV only.

A partial study (points of ``sweep.json`` without ``summary.json``: failed,
running or pending, see :mod:`tl_jax.sweep.status`) is still reported from its
finished points; the others are named in one warning, in a line under the
table of ``results.md`` and as rows of ``results.csv`` with their ``status``
(and no metrics), so no point is dropped silently.
"""
from __future__ import annotations

import csv
import json
import logging
import pathlib
from collections import defaultdict
from typing import Any

import numpy as np

from tl_jax.sweep.status import point_status
from tl_jax.train.trackers import TensorBoardWriter
from tl_jax.train.workdir import EVENTS_GLOB

Stats = dict[tuple, tuple[float, float, int]]
log = logging.getLogger("tl_jax")


def is_seed_field(name: str) -> bool:
    return name == "seed" or name.endswith(("seed", ".seed"))


def _point_order(root: pathlib.Path) -> list[str]:
    sweep = root / "sweep.json"
    if sweep.exists():
        try:
            return list(json.loads(sweep.read_text()).get("points", {}))
        except (json.JSONDecodeError, AttributeError):
            pass
    return []


def load_runs(root: str) -> list[dict]:
    """``[{"run", "dir", "fields", "summary"}]`` for every ``summary.json`` below ``root``, sweep order first."""
    base = pathlib.Path(root)
    runs = []
    for summary_file in sorted(base.rglob("summary.json")):
        d = summary_file.parent
        if "checkpoints" in d.relative_to(base).parts:
            continue
        point_file = d / "point.json"
        fields = json.loads(point_file.read_text()) if point_file.exists() else {}
        fields.pop("source", None)
        runs.append({"run": str(d.relative_to(base)), "dir": d, "fields": fields,
                     "summary": json.loads(summary_file.read_text())})
    order = {name: i for i, name in enumerate(_point_order(base))}
    return sorted(runs, key=lambda r: (order.get(r["run"], len(order)), r["run"]))


def missing_points(root: str) -> list[dict]:
    """``[{"run", "status", "fields"}]`` for the points of ``sweep.json`` that have no ``summary.json``."""
    base = pathlib.Path(root)
    try:  # the fields of points that never started: sweep.json's record
        planned = json.loads((base / "sweep.json").read_text())["points"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        planned = {}
    out = []
    for name in _point_order(base):
        if not (base / name / "summary.json").is_file():
            point_file = base / name / "point.json"
            fields = (json.loads(point_file.read_text()) if point_file.is_file()
                      else dict((planned.get(name) or {}).get("point", {})))
            out.append({"run": name, "status": point_status(base / name), "fields": fields})
    return out


def missing_line(missing: list[dict], n_points: int) -> str:
    """``'2 of 6 points are not in these results (no summary.json): t3 (failed), t5 (pending)'``."""
    names = ", ".join(f"{m['run']} ({m['status']})" for m in missing)
    return f"{len(missing)} of {n_points} points are not in these results (no summary.json): {names}"


def collect(root: str) -> list[dict]:
    """One flat record per run: ``run`` + point fields + summary values (all runs)."""
    return [{"run": r["run"], **{k: v for k, v in r["fields"].items() if k != "_report"}, **r["summary"]}
            for r in load_runs(root)]


def reportable(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["fields"].get("_report", True) is not False]


def _varies(rows: list[dict], field: str) -> bool:
    return len({json.dumps(r.get(field), sort_keys=True) for r in rows}) > 1


def detect_group_fields(rows: list[dict], field_names: list[str]) -> list[str]:
    """The fields among ``field_names`` present in every row with more than one value, seeds excluded."""
    return [f for f in field_names if not is_seed_field(f) and all(f in r for r in rows) and _varies(rows, f)]


def _key(v: Any) -> Any:
    return tuple(_key(x) for x in v) if isinstance(v, (list, tuple)) else v


def aggregate(rows: list[dict], group_by: list[str], metric: str) -> Stats:
    """``{(group values): (mean, std, n)}`` of ``metric`` (rows lacking a group field or the metric are left out)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if metric in r and all(g in r for g in group_by) and isinstance(r[metric], (int, float)):
            groups[tuple(_key(r[g]) for g in group_by)].append(float(r[metric]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def ordered(values: list) -> list:
    """Numbers ascending, anything else in first-seen order (numbers first)."""
    seen = list(dict.fromkeys(values))
    nums = sorted(v for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool))
    return nums + [v for v in seen if v not in nums]


def lower_is_better(metric: str) -> bool:
    return any(w in metric.rsplit("/", 1)[-1] for w in ("loss", "error", "_s"))


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "-".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown_table(stats: Stats, group_by: list[str], metric: str) -> str:
    """Rows: all but the last group field; columns: the last one's values; best per column in bold.

    With one group field: one row per value and one column (the metric)."""
    if len(group_by) < 2:  # one row per value (or one row 'all'), one column: the metric
        stats = {((k[0] if group_by else "all"), ""): v for k, v in stats.items()}
        group_by = [group_by[0] if group_by else "runs", ""]
    row_fields, col_field = group_by[:-1], group_by[-1]
    rows = ordered([k[:-1] for k in stats]) if row_fields else [()]
    cols = ordered([k[-1] for k in stats])
    pick = min if lower_is_better(metric) else max
    best = {c: pick((stats[r + (c,)][0] for r in rows if r + (c,) in stats), default=None) for c in cols}
    head = list(row_fields)
    col_names = [f"{col_field}={_fmt(c)}" if col_field else metric for c in cols]
    lines = ["| " + " | ".join(head) + " | " + " | ".join(col_names) + " |",
             "|" + "---|" * len(head) + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            if r + (c,) not in stats:
                cells.append("–")
                continue
            mean, std, n = stats[r + (c,)]
            cell = f"{mean:.3f} ± {std:.3f} (n={n})"
            cells.append(f"**{cell}**" if mean == best[c] else cell)
        label = [_fmt(v) for v in r]
        lines.append("| " + " | ".join(label) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib  # deferred: plotting is the only user of matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(fig, axes) -> None:
    """One legend for the figure, centred under the axes (outside them: it covers no data).

    ``constrained`` layout (set when the figure is made) shrinks the axes to make room."""
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if labels:
        fig.legend([handles[lb] for lb in labels], labels, loc="outside lower center", fontsize=8,
                   ncol=min(len(labels), 4 if len(axes) > 1 else 2), frameon=False)


def plot_results(stats: Stats, group_by: list[str], metric: str, path: pathlib.Path) -> None:
    """Metric vs the last group field, one line per combination of the others, std error bars."""
    fig = results_figure(stats, group_by, metric)
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def results_figure(stats: Stats, group_by: list[str], metric: str):
    """The matplotlib figure of :func:`plot_results` (its legend under the axes)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    xs_all = ordered([k[-1] for k in stats]) if group_by else [0]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs_all)}
    lines = ordered([k[:-1] for k in stats]) if group_by else [()]
    for line in lines:
        xs = [x for x in xs_all if (line + (x,) if group_by else ()) in stats]
        vals = [stats[line + (x,) if group_by else ()] for x in xs]
        label = ", ".join(f"{f}={_fmt(v)}" for f, v in zip(group_by[:-1], line)) or metric
        ax.errorbar([pos[x] for x in xs], [v[0] for v in vals], yerr=[v[1] for v in vals], marker="o", capsize=3,
                    label=label)
    if numeric and group_by and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(list(pos.values()), [_fmt(x) for x in xs_all])
    ax.set_xlabel(group_by[-1] if group_by else "")
    ax.set_ylabel(f"{metric} (mean ± std)")
    ax.grid(alpha=0.3)
    _legend_below(fig, [ax])
    return fig


def _curve(runs: list[dict], key: str) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """``(steps, mean, std)`` of ``key`` at every step that any of ``runs`` logged, over the runs that
    logged it (population std). None when fewer than two steps are logged (no curve to draw)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        f = r["dir"] / "metrics.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            m = json.loads(line) if line.strip() else {}
            if isinstance(m.get(key), (int, float)) and "step" in m:
                by_step[int(m["step"])].append(float(m[key]))
    if len(by_step) < 2:
        return None
    steps = sorted(by_step)
    return (steps, np.array([np.mean(by_step[t]) for t in steps]), np.array([np.std(by_step[t]) for t in steps]))


def plot_curves(runs: list[dict], group_by: list[str], metric: str, path: pathlib.Path) -> bool:
    """``train/loss`` (and ``metric``, if logged twice or more) vs step, mean ± std band per group.

    Returns False (and writes nothing) when no run logged a curve."""
    fig = curves_figure(runs, group_by, metric)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return True


def curves_figure(runs: list[dict], group_by: list[str], metric: str):
    """The matplotlib figure of :func:`plot_curves` (None when no run logged a curve): one panel per key,
    one line per group with a marker at each logged step, the legend under the panels."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if all(g in r["fields"] for g in group_by):
            groups[tuple(_key(r["fields"][g]) for g in group_by)].append(r)
    panels = {}
    for key in ("train/loss", metric):
        curves = {g: c for g in ordered(list(groups)) if (c := _curve(groups[g], key)) is not None}
        if curves:
            panels[key] = curves
    if not panels:
        return None
    plt = _plt()
    n_lines = max(len(c) for c in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4 + 0.2 * n_lines), squeeze=False,
                             layout="constrained")
    for ax, (key, curves) in zip(axes[0], panels.items()):
        for g, (steps, mean, std) in curves.items():
            ax.plot(steps, mean, marker=".", markersize=4,
                    label=", ".join(f"{f}={_fmt(v)}" for f, v in zip(group_by, g)) or "all")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        if key.endswith("loss") and all(np.all(m > 0) for _, m, _ in curves.values()):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} (mean ± std)")
        ax.grid(alpha=0.3)
    _legend_below(fig, list(axes[0]))
    return fig


def write_report(root: str, group_by: list[str] | None = None, metric: str = "test/accuracy") -> str:
    """Write results.csv/.md/.png and curves.png into ``root``; returns the Markdown table."""
    out = pathlib.Path(root)
    runs = load_runs(root)
    missing = missing_points(root)
    note = missing_line(missing, len(_point_order(out))) if missing else ""
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {root}" + (f"; {note}" if note else ""))
    if note:
        log.warning("report: %s", note)
    rows = collect(root)
    if missing:  # the unfinished points as rows too, with their status
        rows = [{**r, "status": "finished"} for r in rows] + [
            {"run": m["run"], **{k: v for k, v in m["fields"].items() if k != "_report"}, "status": m["status"]}
            for m in missing]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
    runs = reportable(runs)
    flat = [{**r["fields"], **r["summary"]} for r in runs]
    point_fields = list(dict.fromkeys(k for r in runs for k in r["fields"] if k != "_report"))
    if group_by is None:
        group_by = detect_group_fields(flat, point_fields)
    stats = aggregate(flat, group_by, metric)
    if not stats:
        known = sorted({k for r in flat for k in r})
        raise KeyError(f"no run has {metric!r} and every group field {group_by}; fields and metrics: {known}")
    repeats = [f for f in point_fields if f not in group_by and _varies(flat, f)] or ["runs"]
    table = (f"{metric}, mean ± std over {', '.join(repeats)} (n runs per cell):\n\n"
             + markdown_table(stats, group_by, metric))
    if note:
        table += f"\n\n{note}"
    (out / "results.md").write_text(table + "\n")
    plot_results(stats, group_by, metric, out / "results.png")
    plot_curves(runs, group_by, metric, out / "curves.png")
    _tensorboard_images(out, ["results.png", "curves.png"], table)
    return table


def _tensorboard_images(root: pathlib.Path, names: list[str], table: str) -> None:
    """The study's plots and table as TensorBoard images/text in ``root`` (the runs are its sub-folders)."""
    for old in root.glob(EVENTS_GLOB):  # one report at a time
        old.unlink()
    try:
        writer = TensorBoardWriter(root)
    except ImportError:  # tensorboardX missing: the PNGs are there anyway
        return
    for name in names:
        if (root / name).is_file():
            writer.image(f"study/{name.removesuffix('.png')}", root / name)
    writer.text("study/results", table)
    writer.close()
