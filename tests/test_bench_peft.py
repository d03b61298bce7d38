"""make bench's `peft` section (benchmarks/peft_bench.py): its goal rows, and the quick section end to end."""
import json
import math

import pytest

from benchmarks.peft_bench import VARIANTS, goal_rows
from benchmarks.run import main


def test_goal_rows_say_met_or_not_and_n_a_without_the_section():
    rows = goal_rows({"ratios": {"step": 0.7, "opt_state": 0.031, "peak": 0.9, "merged_step": 1.01},
                      "merge": {"rel_diff": 2e-7}})
    assert [r[0] for r in rows] == ["31 PEFT"] * 5
    assert [r[3] for r in rows] == ["0.700", "0.031", "0.900", "2.0e-07", "1.010"]
    assert [r[-1] for r in rows] == ["yes", "**no**", "**no**", "yes", "yes"]
    assert all("ViT-S/16 224²" in r[1] for r in rows if "Δ" not in r[1])
    assert [r[-1] for r in goal_rows({"quick": True, "size": 32, "ratios": {"merged_step": 1.2}})][-1] == "**no**"
    assert all(r[3] == "n/a" and r[-1] == "n/a" for r in goal_rows({}))


def _table(md: str, first_header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header starts with ``| first_header |``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_peft_section_writes_its_table_and_positive_finite_ratios(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "r.json"
    assert main(["--quick", "--only", "peft", "--out", str(out), "--json", str(raw)]) == 0
    res = json.loads(raw.read_text())["sections"]["peft"]
    assert "error" not in res, res.get("error")
    md = out.read_text()
    section = md[md.index("## Parameter-efficient fine-tuning"):]
    assert "QUICK run" in section  # labelled: not the goal's model
    runs = _table(section, "run")
    assert [r[0] for r in runs] == list(VARIANTS) and all(len(r) == 14 for r in runs)
    lora, full, merged = res["variants"]["lora"], res["variants"]["full"], res["variants"]["merged"]
    assert 0 < lora["trainable"] < full["trainable"] == full["params"] == merged["params"]
    assert lora["params"] == full["params"] + res["merge"]["lora_params"]
    for key in ("step", "step_wall", "opt_state", "peak", "live", "gflop", "merged_step", "merged_step_wall"):
        assert math.isfinite(res["ratios"][key]) and res["ratios"][key] > 0, key
    assert res["ratios"]["opt_state"] < 1 and res["ratios"]["gflop"] < 1  # the frozen base: no state, no dW
    assert 0 <= res["merge"]["rel_diff"] < res["merge"]["lora_vs_base_rel"]  # B moved off zero before the merge
    goals = [r for r in _table(md, "goal") if r[0] == "31 PEFT"]
    assert len(goals) == 5 and all(math.isfinite(float(r[3])) and float(r[3]) >= 0 for r in goals)
