"""The report's numbers against the summaries it read (mean/std recomputed here), its files and CLI."""
import csv
import json
import re

import numpy as np
import pytest

from tl_jax.cli import main
from tl_jax.sweep.report import aggregate, collect, write_report

METHODS = ("scratch", "finetune")
LAMS = (0.1, 1.0, 3.0)
SEEDS = (0, 1, 2)


def _acc(method, lam, seed):
    return round(0.5 + 0.1 * METHODS.index(method) + 0.05 * LAMS.index(lam) + 0.013 * seed * (1 + lam), 6)


def _write_run(d, point, summary, curve=True):
    d.mkdir(parents=True)
    (d / "point.json").write_text(json.dumps(point))
    (d / "summary.json").write_text(json.dumps(summary))
    if curve:
        recs = [{"step": s, "train/loss": 2.0 / s} for s in (5, 10)] + [{"step": 10, "test/accuracy": 0.5}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture
def study(tmp_path):
    for m in METHODS:
        for lam in LAMS:
            for s in SEEDS:
                acc = _acc(m, lam, s)
                _write_run(tmp_path / f"{m}_lam{lam}_seed{s}", {"stage": "target", "method": m, "lam": lam, "seed": s,
                                                               "source": "/x/source"},
                           {"test/accuracy": acc, "test/loss": 1.0 - acc, "steps": 10, "wall_s": 1.0})
    _write_run(tmp_path / "source", {"stage": "source", "_report": False}, {"test/accuracy": 0.99, "steps": 5})
    _write_run(tmp_path / "source" / "checkpoints" / "5", {}, {"test/accuracy": 0.0}, curve=False)  # not a run
    return tmp_path


def _cells(table):
    """``{(row label, column header): (mean, std, n, bold)}`` parsed from the Markdown table."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        for h, c in zip(header[1:], cells[1:]):
            m = re.fullmatch(r"(\*\*)?([\d.]+) ± ([\d.]+) \(n=(\d+)\)(\*\*)?", c)
            out[(cells[0], h)] = (float(m.group(2)), float(m.group(3)), int(m.group(4)), bool(m.group(1)))
    return out


def test_table_numbers_match_the_summaries(study):
    table = write_report(str(study))  # groups detected: method, lam (seed and the constant stage are not)
    cells = _cells(table)
    assert len(cells) == len(METHODS) * len(LAMS)
    for lam in LAMS:
        means = {}
        for m in METHODS:
            vals = np.array([_acc(m, lam, s) for s in SEEDS])
            mean, std, n, _ = cells[(m, f"lam={lam:g}")]
            assert mean == pytest.approx(vals.mean(), abs=5e-4) and std == pytest.approx(vals.std(), abs=5e-4)
            assert n == len(SEEDS)
            means[m] = vals.mean()
        best = max(means, key=means.get)
        assert [m for m in METHODS if cells[(m, f"lam={lam:g}")][3]] == [best]
    assert "mean ± std over seed" in table
    for name in ("results.csv", "results.md", "results.png", "curves.png"):
        assert (study / name).stat().st_size > 0

    rows = list(csv.DictReader(open(study / "results.csv")))
    assert len(rows) == len(METHODS) * len(LAMS) * len(SEEDS) + 1  # + the pretraining run (CSV only)
    by_run = {r["run"]: r for r in rows}
    assert float(by_run["finetune_lam3.0_seed2"]["test/accuracy"]) == _acc("finetune", 3.0, 2)
    assert "source" not in rows[0] and "_report" not in rows[0]


def test_group_and_metric_options_and_lower_is_better(study):
    cells = _cells(write_report(str(study), group_by=["lam"], metric="test/loss"))
    assert len(cells) == len(LAMS)
    losses = {lam: np.array([1.0 - _acc(m, lam, s) for m in METHODS for s in SEEDS]) for lam in LAMS}
    for lam, vals in losses.items():
        mean, std, n, bold = cells[(f"{lam:g}", "test/loss")]
        assert bold == (lam == max(LAMS))  # the lowest loss is the best
        assert (mean, std, n) == (pytest.approx(vals.mean(), abs=5e-4), pytest.approx(vals.std(), abs=5e-4), 6)
    stats = aggregate(collect(str(study)), ["method"], "test/accuracy")  # the API the experiments use
    vals = [_acc("scratch", lam, s) for lam in LAMS for s in SEEDS]
    assert stats[("scratch",)] == (pytest.approx(np.mean(vals)), pytest.approx(np.std(vals)), 9)


def test_cli_report_and_errors(study, tmp_path_factory, capsys):
    assert main(["report", str(study), "--group", "method", "--metric", "test/loss"]) == 0
    out = capsys.readouterr().out
    cells = _cells(out[out.index("|"):])
    assert not cells[("scratch", "test/loss")][3] and cells[("finetune", "test/loss")][3]
    assert main(["report", str(study), "--metric", "test/acuracy"]) == 2
    assert "no run has 'test/acuracy'" in capsys.readouterr().err
    assert main(["report", str(tmp_path_factory.mktemp("empty"))]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_curves_use_every_logged_step_and_the_legend_covers_no_data(tmp_path):
    """Each group's line has a point at every step any of its runs logged (mean over the runs that logged
    it, numpy recomputed), and the legend lies outside every panel (the demo's had covered the curves)."""
    from tl_jax.sweep.report import curves_figure, load_runs

    logged = {("a", 0): range(10, 160, 10), ("a", 1): range(10, 160, 10), ("b", 0): range(5, 155, 5)}
    loss = {}
    for (method, seed), steps in logged.items():
        d = tmp_path / f"{method}_seed{seed}"
        recs = [{"step": s, "train/loss": 3.0 / s + 0.01 * seed} for s in steps]
        recs += [{"step": s, "test/accuracy": 0.5 + s / 1000} for s in (50, 100, 150)]
        for r in recs:
            if "train/loss" in r:
                loss.setdefault((method, r["step"]), []).append(r["train/loss"])
        d.mkdir()
        (d / "point.json").write_text(json.dumps({"method": method, "seed": seed}))
        (d / "summary.json").write_text(json.dumps({"test/accuracy": 0.6}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fig = curves_figure(load_runs(str(tmp_path)), ["method"], "test/accuracy")
    loss_ax, acc_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert sorted(lines) == ["method=a", "method=b"]
    for method, n in (("a", 15), ("b", 30)):
        xs, ys = lines[f"method={method}"].get_data()
        assert len(xs) == n
        np.testing.assert_allclose(ys, [np.mean(loss[(method, int(x))]) for x in xs])
    assert [len(ln.get_xdata()) for ln in acc_ax.get_lines()] == [3, 3]
    _assert_legend_outside(fig)


def _assert_legend_outside(fig):
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent()), "the legend covers a panel"


def test_results_plot_has_a_line_per_method_and_its_legend_outside(study):
    from tl_jax.sweep.report import results_figure

    stats = aggregate(collect(str(study)), ["method", "lam"], "test/accuracy")
    fig = results_figure(stats, ["method", "lam"], "test/accuracy")
    (ax,) = fig.axes
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["method=finetune", "method=scratch"]
    bars = {c.get_label(): c for c in ax.containers}  # errorbar containers: (data line, caps, bars)
    for method in METHODS:  # the means per lam, lams ascending
        np.testing.assert_allclose(np.asarray(bars[f"method={method}"].lines[0].get_ydata(), float),
                                   [stats[(method, lam)][0] for lam in LAMS])
    _assert_legend_outside(fig)
