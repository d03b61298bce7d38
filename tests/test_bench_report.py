"""make bench's report: the goal rows of issues 19-24 and the hand-written notes it keeps."""
import pathlib

from benchmarks.report import later_goals, render
from benchmarks.run import NOTES_MARKER, kept_notes


def test_later_goals_read_each_sections_figures_and_say_met_or_not():
    s = {"recipes": {"rank_ratio": 120.0, "rank_ratio_seed0": 40.0, "fewshot_ratio": 19.0, "ridge10": 0.95,
                     "probe10": 0.962, "accumulation": {"64": {"ratios": {"accum2": 1.7, "accum4": 1.9}},
                                                        "256": {"ratios": {"accum2": 0.96, "accum4": 1.0}}}},
         "methods": {"ratios": {"dann": 1.2, "cdan": 2.0, "distill": 1.8, "mcc": 1.6}},
         "shard": {"overhead_ratio": 0.5, "ray": {"overhead_s_mean": 0.2}}}
    rows = later_goals(s)
    met = {(r[0], r[1].split(" (")[0]): r[-1] for r in rows}
    assert met["22 ranking", "fine-tune K candidates"] == "yes"
    assert met["22 few-shot", "one SGD linear probe s / ridge over 4 shots x 3 seeds x 21 L2 s"] == "**no**"
    assert met["22 few-shot", "10-shot accuracy: ridge - SGD probe"] == "**no**"  # -0.012
    s["recipes"]["ridge10"] = 0.98  # above the probe by more than 0.01: met
    assert [r[-1] for r in later_goals(s) if r[1].startswith("10-shot")] == ["yes"]
    acc = [r for r in rows if r[0] == "22 accumulation"]
    assert [r[-1] for r in acc] == ["**no**", "**no**", "yes", "yes"]  # batch 64 first, then 256
    methods = next(r for r in rows if r[0] == "23 methods")
    assert methods[3] == "1.60" and methods[-1] == "**no** (mcc)"  # cdan / distill have a stated reason
    shard = [r[-1] for r in rows if r[0] == "24 sweep tasks"]
    assert shard == ["**no**", "yes"]
    assert all(r[-1] == "n/a" for r in later_goals({}) if r[-1] != "-")  # sections not run


def test_transferability_goal_needs_the_speed_and_the_agreement():
    s = {"transferability": {"ratios": {"logme": 4.0, "hscore": 1.2}, "rel_diff": {"logme": 1e-12, "hscore": 1e-12}}}
    rows = [r for r in later_goals(s) if r[0] == "33 scores"]
    assert [r[1].split(":")[0] for r in rows] == ["LogME", "H-score"]
    assert [r[3] for r in rows] == ["4.00", "1.20"] and [r[-1] for r in rows] == ["yes", "**no**"]
    s["transferability"]["rel_diff"]["logme"] = 1e-5  # fast but not the same values: not met
    assert [r[-1] for r in later_goals(s) if r[0] == "33 scores"][0] == "**no**"


def test_a_new_report_keeps_the_hand_written_notes_below_the_marker(tmp_path):
    out = tmp_path / "B.md"
    assert kept_notes(out) == ""
    out.write_text("# old generated part\n\n" + NOTES_MARKER + "\n# Notes\n\nkept, 2026-12-06\n")
    results = {"machine": {"date": "today", "cores": 2, "cpu": "x", "platform": "p"}, "versions": {}, "total_s": 60,
               "sections": {}}
    new = render(results) + kept_notes(out)
    assert "old generated part" not in new and new.endswith(NOTES_MARKER + "\n# Notes\n\nkept, 2026-12-06\n")
    assert pathlib.Path(out).read_text().count(NOTES_MARKER) == 1


def test_vit_goals_read_torch_over_tl_jax_and_conversion_over_read():
    from benchmarks.report import vit_goals

    vit = {"forward": {"seconds": {"tl_jax": 2.0, "timm eager": 3.0}},
           "train_step": {"seconds": {"tl_jax": 4.0, "timm eager": 3.0}},
           "conversion": {"read_s": 0.5, "convert_s": 2.0, "convert_again_s": 0.6}}
    rows = vit_goals(vit)
    assert [r[3] for r in rows] == ["1.50", "0.75", "4.00"]
    assert [r[4] for r in rows] == ["yes", "**no**", "**no**"]
    assert [r[4] for r in vit_goals({})] == ["n/a"] * 3
