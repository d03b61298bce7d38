"""benchmarks/pipeline_bench.py (``make bench`` section ``pipeline``): the table's structure, not the goal.

The fast test renders a made-up result; the slow one runs the real thing at 32 px with a one-block ViT
and checks that every figure is there and that the ratios are the quotients of the examples/s.
"""
from __future__ import annotations

import math

import pytest

from benchmarks import pipeline_bench
from benchmarks.report import render

RESULT = {"batch": 16, "size": 224, "stored": 384, "images": 64,
          "ops": ["inception_crop", "flip_lr", "randaugment", "rescale", "normalize", "mixup/cutmix"],
          "examples_per_s": {"pipeline": 30.0, "pipeline_cached": 60.0, "ResNet-50": 10.0, "ViT-S/16": 40.0},
          "ratios": {"ResNet-50": 3.0, "ViT-S/16": 0.75}, "ratios_cached": {"ResNet-50": 6.0, "ViT-S/16": 1.5}}


def test_render_and_goal_rows():
    md = pipeline_bench.render(RESULT)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| consumer | examples/s | pipeline / step | cached pipeline / step |"
    assert rows[1:] == ["| ResNet-50 train step, batch 16 | 10.00 | 3.00 | 6.00 |",
                        "| ViT-S/16 train step, batch 16 | 40.00 | 0.75 | 1.50 |"]
    assert "**30.0 examples/s**" in md and "60.0 with the decoded images" in md
    goals = pipeline_bench.goals(RESULT)
    assert [g[-1] for g in goals] == ["yes", "**no**"] and [g[3] for g in goals] == ["3.0", "0.8"]
    assert pipeline_bench.goals({}) == []


def test_the_report_has_the_section():
    results = {"machine": {"date": "d", "cores": 2, "cpu": "c", "memory_gib": 1.0, "platform": "p", "loadavg": [1.0]},
               "versions": {}, "total_s": 60.0, "sections": {"pipeline": dict(RESULT, _seconds=5.0)}}
    md = render(results)
    assert "benchmarks/pipeline_bench.py" in md and "| ResNet-50 train step, batch 16 |" in md
    assert "randaugment + inception_crop + mixup examples/s / ViT-S/16" in md


@pytest.mark.slow
def test_a_tiny_run_fills_the_table(tmp_path):
    res = pipeline_bench.run(str(tmp_path), quick=True, size=32, batch=4, images=8,
                             models={"tiny ViT": ("vit", dict(patch_size=8, hidden_size=16, depth=1, num_heads=2,
                                                              mlp_dim=32))})
    per_s = res["examples_per_s"]
    assert set(per_s) == {"pipeline", "pipeline_cached", "tiny ViT"} and all(v > 0 for v in per_s.values())
    assert math.isclose(res["ratios"]["tiny ViT"], per_s["pipeline"] / per_s["tiny ViT"])
    assert "| tiny ViT train step, batch 4 |" in pipeline_bench.render(res)
