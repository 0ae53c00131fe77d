"""Flags fire just across their threshold and not just before it; re-flagging changes only flags and priority."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.quality.flags import FLAG_NAMES, QAConfig, flag_masklets
from pipeline.quality.signals import MASKLET_SIGNALS_SCHEMA, MaskletSignals, PromptSignals

# A masklet that fires no flag under the default thresholds.
CLEAN = {
    "object_id": 0, "predicted_iou": 0.9, "stability_score": 0.95, "prompt_area_share": 0.1,
    "prompt_fg_points": 1, "prompt_bg_points": 0, "area_share_mean": 0.1, "area_share_min": 0.1,
    "area_share_max": 0.1, "perimeter_mean": 100.0, "complexity_mean": 0.1, "complexity_max": 0.1,
    "components_mean": 1.0, "components_max": 1, "holes_max": 0, "border_share": 0.0, "frames_tracked": 10,
    "frames_visible": 10, "visible_share": 1.0, "frames_tracked_after_prompt": 9,
    "frames_visible_after_prompt": 9, "visibility_gaps": 0, "iou_pairs": 9, "iou_mean": 0.95, "iou_min": 0.9,
    "iou_jumps": 0, "jump_iou": 0.5, "area_change_max": 1.1, "object_score_mean": 5.0, "object_score_min": 3.0,
    "dup_iou": 0.0, "dup_object_id": -1,
}


def table(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist([{**CLEAN, "object_id": i, **r} for i, r in enumerate(rows)],
                                schema=MASKLET_SIGNALS_SCHEMA)


def flags_of(*rows: dict, qa: QAConfig = QAConfig()) -> list[list[str]]:
    return flag_masklets(table(*rows), qa).column("flags").to_pylist()


# (flag, changes that fire it just across the threshold, changes just on the other side)
ACROSS = [
    ("tiny", {"area_share_mean": 0.0099}, {"area_share_mean": 0.01}),
    ("huge", {"area_share_mean": 0.8001}, {"area_share_mean": 0.80}),
    ("fragmented", {"components_mean": 5.0}, {"components_mean": 4.99}),
    ("unstable", {"iou_mean": 0.599}, {"iou_mean": 0.6}),
    ("flicker", {"visibility_gaps": 2}, {"visibility_gaps": 1}),
    ("flicker", {"iou_jumps": 3}, {"iou_jumps": 2}),
    ("lost", {"frames_visible_after_prompt": 0}, {"frames_visible_after_prompt": 1}),
    ("duplicate", {"dup_iou": 0.9, "dup_object_id": 1}, {"dup_iou": 0.899, "dup_object_id": 1}),
    ("low_score", {"predicted_iou": 0.69}, {"predicted_iou": 0.7}),
]


def test_the_clean_masklet_fires_nothing():
    assert flags_of({}) == [[]]


@pytest.mark.parametrize("flag, fires, does_not", ACROSS, ids=[f"{a[0]}-{next(iter(a[1]))}" for a in ACROSS])
def test_each_flag_fires_across_its_threshold_only(flag, fires, does_not):
    assert flags_of(fires, does_not) == [[flag], []]


def test_lost_needs_frames_after_the_prompt_and_can_be_turned_off():
    never_tracked_after = {"frames_tracked_after_prompt": 0, "frames_visible_after_prompt": 0}
    lost = {"frames_visible_after_prompt": 0}
    assert flags_of(never_tracked_after, lost) == [[], ["lost"]]
    assert flags_of(lost, qa=QAConfig(lost=False)) == [[]]


def test_missing_signals_fire_only_lost():
    """A masklet never visible has null shape and IoU signals: no tiny/unstable from a null."""
    acc = MaskletSignals([PromptSignals(0, 0, 0.9, 0.95, 100)], 8, 8)
    for f in range(3):
        acc.add(f, (0,), np.zeros((1, 8, 8), bool), np.zeros(1, np.float32))
    out = flag_masklets(acc.finish().masklets, QAConfig())
    assert out.column("flags").to_pylist() == [["lost"]]


def test_flags_from_real_signals():
    """Two identical masklets from the accumulator are flagged duplicate, a third one alone is not."""
    h, w = 20, 20
    masks = np.zeros((3, h, w), bool)
    masks[0:2, 2:8, 2:8] = True
    masks[2, 12:18, 12:18] = True
    acc = MaskletSignals([PromptSignals(i, 0, 0.9, 0.95, 36) for i in range(3)], h, w)
    for f in range(3):
        acc.add(f, (0, 1, 2), masks, np.ones(3, np.float32))
    assert flag_masklets(acc.finish().masklets, QAConfig()).column("flags").to_pylist() == [
        ["duplicate"], ["duplicate"], []]


def test_review_priority_formula():
    """flags + (1 - clip(predicted IoU) * visible_share * iou_mean); nulls count as 0."""
    out = flag_masklets(table({}, {"iou_mean": None, "iou_pairs": 0},
                              {"predicted_iou": 0.5, "visible_share": 0.8, "iou_mean": 0.9},
                              {"predicted_iou": 1.2}), QAConfig())
    assert out.column("flags").to_pylist() == [[], [], ["low_score"], []]
    assert out.column("review_priority").to_pylist() == pytest.approx([
        1 - 0.9 * 0.95, 1.0, 1 + 1 - 0.5 * 0.8 * 0.9, 1 - 1.0 * 0.95])


def test_more_flags_always_come_first():
    out = flag_masklets(table({"predicted_iou": 0.0, "visible_share": 0.0},  # 1 flag, no confidence
                              {"dup_iou": 0.95, "visibility_gaps": 3}), QAConfig())  # 2 flags, confident
    p = out.column("review_priority").to_pylist()
    assert p[1] > p[0]


def test_reflagging_changes_only_flags_and_priority():
    rows = [{}, {"area_share_mean": 0.02}, {"iou_mean": 0.65}, {"dup_iou": 0.85, "dup_object_id": 0}]
    first = flag_masklets(table(*rows), QAConfig())
    second = flag_masklets(first, QAConfig(tiny_area=0.05, unstable_iou=0.7, duplicate_iou=0.8))
    assert second.column_names == first.column_names  # replaced, not appended twice
    signals = MASKLET_SIGNALS_SCHEMA.names
    assert second.select(signals).equals(first.select(signals))
    assert first.column("flags").to_pylist() == [[], [], [], []]
    assert second.column("flags").to_pylist() == [[], ["tiny"], ["unstable"], ["duplicate"]]
    assert second.column("review_priority").to_pylist() != first.column("review_priority").to_pylist()
    assert flag_masklets(second, QAConfig()).equals(first)


def test_flag_names_keep_their_order():
    out = flags_of({"predicted_iou": 0.1, "area_share_mean": 0.001, "visibility_gaps": 5})
    assert out == [["tiny", "flicker", "low_score"]]
    assert set(FLAG_NAMES) == {a[0] for a in ACROSS}


def test_a_table_without_signals_is_refused_naming_the_columns():
    with pytest.raises(ValueError, match=r"signal column\(s\) \['area_share_mean'"):
        flag_masklets(table({}).drop_columns(["area_share_mean"]), QAConfig())


@pytest.mark.parametrize("key, value, range_text", [
    ("tiny_area", -0.1, ">= 0 and <= 1"),
    ("huge_area", 1.5, ">= 0 and <= 1"),
    ("unstable_iou", 2, ">= 0 and <= 1"),
    ("duplicate_iou", "0.9", "expected a number"),
    ("low_score", float("nan"), ">= 0 and <= 1"),
    ("fragmented_components", 0, ">= 1"),
    ("flicker_gaps", 0, ">= 1"),
    ("flicker_jumps", 1.5, "expected an integer"),
    ("lost", 1, "expected true or false"),
    ("frame_budget_ms", 0, "> 0"),
])
def test_out_of_range_thresholds_name_key_value_and_range(key, value, range_text):
    with pytest.raises(ValueError) as e:
        QAConfig(**{key: value})
    msg = str(e.value)
    assert "\n" not in msg and f"qa.{key}={value!r}" in msg and range_text in msg


def test_tiny_must_stay_below_huge():
    with pytest.raises(ValueError, match=r"qa.tiny_area=0.5 is out of range: must not exceed qa.huge_area=0.4"):
        QAConfig(tiny_area=0.5, huge_area=0.4)


def test_unknown_keys_are_rejected_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['qa.tiny'\]; valid keys here: \['qa.tiny_area'"):
        QAConfig.from_dict({"tiny": 0.1})
    assert QAConfig.from_dict({"tiny_area": 0.02}).tiny_area == 0.02
