"""Named quality flags and a review priority, computed only from stored signal columns.

`flag_masklets(table, qa)` reads the columns pipeline.quality.signals writes (MASKLET_SIGNALS_SCHEMA) and
returns the same table with a `flags` list<string> column and a `review_priority` float64 column, replacing
them if present. Nothing else changes, so a finished run can be re-flagged with new thresholds without the
model or the masks. Signals that are null (a masklet never visible has no area, no IoU) never fire a flag
except `lost`.

Flags (thresholds are `qa.*` keys, pipeline.config.QAConfig):
- tiny:         area_share_mean < tiny_area             (mean share of the frame over visible frames)
- huge:         area_share_mean > huge_area
- fragmented:   components_mean >= fragmented_components (8-connected regions, mean over visible frames)
- unstable:     iou_mean < unstable_iou                 (mean IoU between consecutive visible frames)
- flicker:      visibility_gaps >= flicker_gaps  or  iou_jumps >= flicker_jumps
- lost:         frames_tracked_after_prompt > 0 and frames_visible_after_prompt == 0
                (tracked past its prompt frame and never seen there); lost=False turns it off
- duplicate:    dup_iou >= duplicate_iou                (both masklets of a duplicate pair are flagged)
- low_score:    predicted_iou < low_score

Review priority (higher = look first):
    review_priority = number of flags + (1 - confidence)
    confidence = clip(predicted_iou, 0, 1) * visible_share * iou_mean   (a null counts as 0)
No masklet ranks above one with more flags (confidence is in [0, 1]); among masklets with as many
flags, the least confident comes first.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import QAConfig  # the thresholds: `qa.*` of the run config

__all__ = ["FLAG_NAMES", "QAConfig", "flag_arrays", "flag_masklets", "review_priority"]

FLAG_NAMES = ("tiny", "huge", "fragmented", "unstable", "flicker", "lost", "duplicate", "low_score")

# The signal columns flag_masklets reads; a table without one of them cannot be flagged.
REQUIRED_COLUMNS = (
    "area_share_mean", "components_mean", "iou_mean", "visibility_gaps", "iou_jumps",
    "frames_tracked_after_prompt", "frames_visible_after_prompt", "dup_iou", "predicted_iou",
    "visible_share",
)


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as floats with NaN for nulls (NaN compares False, so nulls never fire a flag).

    float32 columns stay float32: numpy compares them with a Python float threshold at float32 precision,
    so a stored predicted IoU of 0.7 (float32 0.69999999) is not below the threshold 0.7.
    """
    column = table.column(name)
    dtype = np.float32 if column.type == pa.float32() else np.float64
    return np.asarray(column.cast(pa.from_numpy_dtype(dtype)).to_numpy(zero_copy_only=False), dtype=dtype)


def flag_arrays(table: pa.Table, qa: QAConfig) -> dict[str, np.ndarray]:
    """Each flag's bool array over the table's rows."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"cannot flag masklets: signal column(s) {missing} missing; compute them with "
                         f"pipeline.quality.signals.MaskletSignals")
    c = {name: _column(table, name) for name in REQUIRED_COLUMNS}
    return {
        "tiny": c["area_share_mean"] < qa.tiny_area,
        "huge": c["area_share_mean"] > qa.huge_area,
        "fragmented": c["components_mean"] >= qa.fragmented_components,
        "unstable": c["iou_mean"] < qa.unstable_iou,
        "flicker": (c["visibility_gaps"] >= qa.flicker_gaps) | (c["iou_jumps"] >= qa.flicker_jumps),
        "lost": (qa.lost & (c["frames_tracked_after_prompt"] > 0) & (c["frames_visible_after_prompt"] == 0)),
        "duplicate": c["dup_iou"] >= qa.duplicate_iou,
        "low_score": c["predicted_iou"] < qa.low_score,
    }


def review_priority(table: pa.Table, flags: dict[str, np.ndarray]) -> np.ndarray:
    """Number of flags + (1 - confidence), confidence = clip(predicted IoU, 0, 1) * visible_share * iou_mean."""
    count = np.sum([flags[name] for name in FLAG_NAMES], axis=0) if len(table) else np.zeros(0)
    parts = [np.clip(np.nan_to_num(_column(table, name), nan=0.0), 0.0, 1.0)
             for name in ("predicted_iou", "visible_share", "iou_mean")]
    confidence = parts[0] * parts[1] * parts[2]
    return count + (1.0 - confidence)


def flag_masklets(table: pa.Table, qa: QAConfig) -> pa.Table:
    """`table` with `flags` (list<string>, in FLAG_NAMES order) and `review_priority` (float64) set."""
    flags = flag_arrays(table, qa)
    names = [[name for name in FLAG_NAMES if flags[name][row]] for row in range(len(table))]
    priority = review_priority(table, flags)
    out = table
    for name in ("flags", "review_priority"):
        if name in out.column_names:
            out = out.drop_columns([name])
    out = out.append_column(pa.field("flags", pa.list_(pa.string())), pa.array(names, type=pa.list_(pa.string())))
    return out.append_column(pa.field("review_priority", pa.float64()), pa.array(priority, type=pa.float64()))
