"""Parquet tables with explicit schemas: items, masklets (one row per object) and frames (one row per
object per frame). Pure functions from records to Arrow tables; the commit module writes them.

The quality signals (pipeline/quality/signals.py) are columns of the same tables: computed in the worker
from the masks in memory, with the masklets' flags and review priority (pipeline/quality/flags.py) computed
from them at commit time (`masklet qa` recomputes those two from the stored signals).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.config import QAConfig
from pipeline.quality.flags import flag_masklets
from pipeline.quality.signals import (FRAME_SIGNALS_SCHEMA, MASKLET_SIGNALS_SCHEMA,
                                      MaskletSignals)

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("path", pa.string()),
    ("kind", pa.string()),
    ("shard_id", pa.int32()),
    ("status", pa.string()),  # done | failed
    ("error", pa.string()),
    ("attempts", pa.int32()),
    ("num_frames", pa.int32()),  # frames decoded and segmented (the Zarr time axis)
    ("source_num_frames", pa.int64()),  # frames in the media, as probed
    ("stride", pa.int32()),
    ("width", pa.int32()),  # resolution of the stored masks (null for failed items)
    ("height", pa.int32()),
    ("source_width", pa.int32()),  # the media's resolution, as probed (displayed orientation)
    ("source_height", pa.int32()),
    ("scale", pa.float64()),  # width / source_width: 1.0 unless frames exceeded decode.max_side
    ("fps", pa.float64()),
    ("num_objects", pa.int32()),
    ("model", pa.string()),
    ("image_size", pa.int32()),
    ("checkpoint_sha256", pa.string()),
    ("random_weights", pa.bool_()),
    ("device", pa.string()),
    # the numerics the masks were computed with (pipeline/numerics.py; null for items failed before the model)
    ("device_class", pa.string()),  # cpu | cuda-sm<major><minor>
    ("device_name", pa.string()),
    ("autocast", pa.string()),  # bf16 | fp16 | off (float32)
    ("object_batch", pa.int32()),  # objects per batched tracking step
    ("tf32", pa.bool_()),
    ("compile", pa.bool_()),
    ("torch_version", pa.string()),
    ("sam2_version", pa.string()),
    ("seconds_decode", pa.float64()),
    ("seconds_prompt", pa.float64()),
    ("seconds_propagate", pa.float64()),
    ("seconds_write", pa.float64()),  # writing masks and computing signals, in the writer thread
    ("seconds_signals", pa.float64()),  # of which the quality signals
    ("seconds_total", pa.float64()),
    # quality (pipeline/quality/signals.py): share of each frame's pixels under any masklet
    ("coverage_mean", pa.float64()),
    ("coverage_min", pa.float64()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
])

_MASKLETS_BASE = pa.schema([
    ("item_id", pa.string()),
    ("object_id", pa.int32()),
    ("masklet_id", pa.string()),  # "<item_id>/<object_id>": stable across runs of the same plan
    ("prompt_source", pa.string()),  # amg | reseed | sam1 | correction (pipeline/records.py's Prompt.source)
    ("prompt_frame", pa.int32()),  # the seed frame: where the masklet's prompt was given
    ("prompt_source_frame", pa.int64()),
    ("prompt_x", pa.float32()),
    ("prompt_y", pa.float32()),
    ("predicted_iou", pa.float32()),
    ("stability_score", pa.float32()),
    ("prompt_area", pa.int64()),
    ("first_frame", pa.int32()),  # first decoded frame where the mask is non-empty (-1: never): first appeared
    ("last_frame", pa.int32()),
    ("frames_visible", pa.int32()),
    ("area_mean", pa.float64()),  # over visible frames
    ("area_min", pa.int64()),
    ("area_max", pa.int64()),
    # the duplicate rule's decision on a re-seeded masklet (pipeline/stages/reseed.py): null when kept
    ("dropped_reason", pa.string()),  # duplicate | empty
    ("dropped_frame", pa.int32()),  # from this frame on it was no longer tracked
    ("merged_into", pa.int32()),  # the older masklet it duplicated (null for empty)
])

# Every masklet signal (the ones named like a base column are the same values: predicted_iou,
# stability_score, frames_visible), then the flags and priority computed from them.
MASKLETS_SCHEMA = pa.schema([
    *_MASKLETS_BASE,
    *(f for f in MASKLET_SIGNALS_SCHEMA if f.name not in _MASKLETS_BASE.names),
    pa.field("flags", pa.list_(pa.string())),
    pa.field("review_priority", pa.float64()),
])

_FRAMES_BASE = pa.schema([
    ("item_id", pa.string()),
    ("object_id", pa.int32()),
    ("frame", pa.int32()),  # position on the Zarr time axis
    ("source_frame", pa.int64()),  # index of the frame in the original media
    ("area", pa.int64()),
    ("bbox_x", pa.int32()),  # tight box of the mask, pixels, XYWH; all 0 when the mask is empty
    ("bbox_y", pa.int32()),
    ("bbox_w", pa.int32()),
    ("bbox_h", pa.int32()),
    ("object_score", pa.float32()),  # SAM 2 object-presence logit (> 0: the model thinks it is present)
])

FRAMES_SCHEMA = pa.schema([*_FRAMES_BASE, *(f for f in FRAME_SIGNALS_SCHEMA if f.name not in _FRAMES_BASE.names)])
_FRAME_SIGNAL_NAMES = [f.name for f in FRAME_SIGNALS_SCHEMA if f.name not in _FRAMES_BASE.names]


def mask_stats(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(O, H, W) bool -> areas (O,) int64 and boxes (O, 4) int32 XYWH (zeros where empty)."""
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1, dtype=np.int64)
    boxes = np.zeros((masks.shape[0], 4), dtype=np.int32)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for o in np.flatnonzero(areas):
        ys = np.flatnonzero(rows[o])
        xs = np.flatnonzero(cols[o])
        boxes[o] = (xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)
    return areas, boxes


class FrameRows:
    """Accumulates per-frame rows column-wise while an item is propagated; with `signals`, feeds each frame to
    that accumulator too and keeps its per-frame signal columns (areas and boxes come from it, once)."""

    def __init__(self, item_id: str, signals: MaskletSignals | None = None):
        self.item_id = item_id
        self.signals = signals
        self.seconds_signals = 0.0
        self.cols: dict[str, list] = {name: [] for name in FRAMES_SCHEMA.names}

    def add(self, frame: int, source_frame: int, object_ids, masks: np.ndarray, scores: np.ndarray) -> None:
        n = len(object_ids)
        if self.signals is not None:
            t0 = time.perf_counter()
            fs = self.signals.add(frame, object_ids, masks, scores)
            self.seconds_signals += time.perf_counter() - t0
            areas = fs.areas
            boxes = np.stack([fs.boxes[:, 2], fs.boxes[:, 0], fs.boxes[:, 3] - fs.boxes[:, 2],
                              fs.boxes[:, 1] - fs.boxes[:, 0]], axis=1).astype(np.int32).reshape(n, 4)
            for name in _FRAME_SIGNAL_NAMES:
                self.cols[name].extend(fs.rows[name])
        else:
            areas, boxes = mask_stats(masks)
            for name in _FRAME_SIGNAL_NAMES:
                self.cols[name].extend([None] * n)
        self.cols["item_id"].extend([self.item_id] * n)
        self.cols["object_id"].extend(object_ids)
        self.cols["frame"].extend([frame] * n)
        self.cols["source_frame"].extend([source_frame] * n)
        self.cols["area"].extend(areas.tolist())
        for i, name in enumerate(("bbox_x", "bbox_y", "bbox_w", "bbox_h")):
            self.cols[name].extend(boxes[:, i].tolist())
        self.cols["object_score"].extend(np.asarray(scores, dtype=np.float32).tolist())

    def __len__(self) -> int:
        return len(self.cols["item_id"])

    def table(self, start: int = 0) -> pa.Table:
        """The rows from row `start` on (all by default)."""
        return pa.table({k: v[start:] for k, v in self.cols.items()}, schema=FRAMES_SCHEMA)

    def extend(self, table: pa.Table) -> None:
        """Append rows read back from a checkpoint."""
        for name in FRAMES_SCHEMA.names:
            self.cols[name].extend(table.column(name).to_pylist())


def masklets_table(item_id: str, prompts, source_frames: list[int], frames: pa.Table,
                   signals: pa.Table | None = None, qa: QAConfig | None = None,
                   dropped: dict | None = None) -> pa.Table:
    """One row per prompted object, with track statistics derived from that item's frame rows, the masklet
    signals (`signals`: MaskletSignals.finish().masklets, in prompt order; nulls without) and the flags and
    review priority they give under `qa` (the run's thresholds). `dropped`: object id -> pipeline.records.Dropped
    for masklets the duplicate rule removed."""
    dropped = dropped or {}
    obj = np.asarray(frames.column("object_id").to_numpy(zero_copy_only=False))
    frm = np.asarray(frames.column("frame").to_numpy(zero_copy_only=False))
    area = np.asarray(frames.column("area").to_numpy(zero_copy_only=False))
    rows = {name: [] for name in _MASKLETS_BASE.names}
    for p in prompts:
        sel = (obj == p.object_id) & (area > 0)
        vis_frames, vis_area = frm[sel], area[sel]
        rows["item_id"].append(item_id)
        rows["object_id"].append(p.object_id)
        rows["masklet_id"].append(f"{item_id}/{p.object_id}")
        rows["prompt_source"].append(p.source)
        rows["prompt_frame"].append(p.frame)
        rows["prompt_source_frame"].append(source_frames[p.frame])
        rows["prompt_x"].append(p.point[0])
        rows["prompt_y"].append(p.point[1])
        rows["predicted_iou"].append(p.predicted_iou)
        rows["stability_score"].append(p.stability_score)
        rows["prompt_area"].append(p.area)
        rows["first_frame"].append(int(vis_frames.min()) if len(vis_frames) else -1)
        rows["last_frame"].append(int(vis_frames.max()) if len(vis_frames) else -1)
        rows["frames_visible"].append(int(len(vis_frames)))
        rows["area_mean"].append(float(vis_area.mean()) if len(vis_area) else 0.0)
        rows["area_min"].append(int(vis_area.min()) if len(vis_area) else 0)
        rows["area_max"].append(int(vis_area.max()) if len(vis_area) else 0)
        fate = dropped.get(p.object_id)
        rows["dropped_reason"].append(fate.reason if fate else None)
        rows["dropped_frame"].append(fate.frame if fate else None)
        rows["merged_into"].append(fate.merged_into if fate else None)
    table = pa.table(rows, schema=_MASKLETS_BASE)
    extra = [f for f in MASKLETS_SCHEMA if f.name not in _MASKLETS_BASE.names and f.name not in
             ("flags", "review_priority")]
    if signals is not None:
        if signals.column("object_id").to_pylist() != [p.object_id for p in prompts]:
            raise ValueError(f"item {item_id}: the signals' objects {signals.column('object_id').to_pylist()} "
                             f"are not the prompts' {[p.object_id for p in prompts]}")
        for f in extra:
            table = table.append_column(f, signals.column(f.name).cast(f.type))
        return flag_masklets(table, qa or QAConfig()).cast(MASKLETS_SCHEMA)
    for f in extra:
        table = table.append_column(f, pa.nulls(len(table), f.type))
    table = table.append_column(pa.field("flags", pa.list_(pa.string())), pa.nulls(len(table), pa.list_(pa.string())))
    return table.append_column(pa.field("review_priority", pa.float64()), pa.nulls(len(table), pa.float64()))


def items_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
