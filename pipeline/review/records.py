"""The review's records: what a reviewer's actions and SAM 2's re-tracking leave in the run folder.

Everything a review writes is append-only, one small Parquet file per action, so that two reviewers (two app
instances) on one OUT never write the same file and a kill loses at most the action being written:

    OUT/review/sessions/<session_id>/decisions-<seq:06d>.parquet    DECISIONS_SCHEMA rows (usually one)
    OUT/review/sessions/<session_id>/corrections-<seq:06d>.parquet  CORRECTIONS_SCHEMA rows
    OUT/review/sessions/<session_id>/events-<seq:06d>.parquet       EVENTS_SCHEMA rows (the review's monitoring)
    OUT/review/sessions/<session_id>/session.json                   reviewer, started_at, host, pid

Readers merge every session's files (a pyarrow dataset over the folder): the latest decision per masklet
wins (by `time`, then `session_id`, then `seq`). Files are written to a temporary name and renamed
(pipeline/store/atomic.py), so a reader never sees half a file.

Corrections are prompts, not pixels: `masklet refine` (and the app's "propagate now") replays them with SAM 2
and writes a new VERSION of each corrected masklet; the previous versions stay:

    OUT/versions/<item_id>/<object_id>/v<NNN>/masks.zarr     bool (1, frames, H, W), chunked like the run's array
    OUT/versions/<item_id>/<object_id>/v<NNN>/masklet.parquet one MASKLETS_SCHEMA row + VERSION_COLUMNS
    OUT/versions/<item_id>/<object_id>/v<NNN>/frames.parquet  that object's FRAMES_SCHEMA rows

Version 0 is the run's own masklet (in masks/ and meta/, never copied); a version folder is published by one
rename when complete. `open_run` and exports give, by default, the latest version of each masklet that no
decision rejects.
"""
from __future__ import annotations

import pyarrow as pa

DECISIONS = ("accept", "reject", "duplicate", "label", "clear")  # clear: withdraw this session's last decision

DECISIONS_SCHEMA = pa.schema([
    ("session_id", pa.string()),
    ("seq", pa.int64()),  # the action's number within its session
    ("reviewer", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("item_id", pa.string()),
    ("object_id", pa.int32()),
    ("masklet_id", pa.string()),  # "<item_id>/<object_id>"
    ("decision", pa.string()),  # one of DECISIONS
    ("duplicate_of", pa.string()),  # masklet_id, with decision == "duplicate"
    ("label", pa.string()),  # with decision == "label" (free text, or one of review.labels in the config)
])

CORRECTIONS_SCHEMA = pa.schema([
    ("correction_id", pa.string()),  # uuid4 hex
    ("session_id", pa.string()),
    ("seq", pa.int64()),
    ("reviewer", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("item_id", pa.string()),
    ("object_id", pa.int32()),  # -1: a new masklet for a missed object (refine gives it the next free id)
    ("masklet_id", pa.string()),  # null for a new masklet
    ("frame", pa.int32()),  # decoded frame (the Zarr time axis)
    ("points", pa.list_(pa.list_(pa.float32(), 2))),  # (x, y) in the stored masks' pixels
    ("point_labels", pa.list_(pa.int8())),  # 1 positive, 0 negative (SAM's labels)
    ("box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1, or null
    ("candidate", pa.int8()),  # which of SAM 2's multimask candidates the reviewer picked (0..2)
    ("lock", pa.bool_()),  # the reviewer locked this frame: re-tracking never overwrites it
    ("base_version", pa.int32()),  # the masklet version the reviewer corrected
])

EVENTS_SCHEMA = pa.schema([
    ("session_id", pa.string()),
    ("seq", pa.int64()),
    ("reviewer", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("kind", pa.string()),  # open_item | frame_prediction | propagation | decision | correction | close_item
    ("item_id", pa.string()),
    ("object_id", pa.int32()),
    ("frame", pa.int32()),
    ("ms", pa.float64()),  # latency of frame_prediction / propagation
    ("fg_clicks", pa.int32()),  # with kind == correction
    ("bg_clicks", pa.int32()),
])

# Columns a version's masklet row adds to MASKLETS_SCHEMA (the run's own rows are version 0, type "auto").
VERSION_COLUMNS = pa.schema([
    ("version", pa.int32()),
    ("masklet_type", pa.string()),  # auto | manual (SA-V's field)
    ("edited_frame_count", pa.int32()),  # frames whose mask came from a correction (SA-V's field)
    ("corrections", pa.list_(pa.string())),  # correction_ids replayed into this version
    ("locked_frames", pa.list_(pa.int32())),
    ("created_at", pa.timestamp("ms", tz="UTC")),
])
