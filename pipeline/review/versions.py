"""Masklet versions: what `masklet refine` writes for a corrected masklet, and how readers find them.

    OUT/versions/<item_id>/<object_id>/v<NNN>/masks.zarr       bool (1, frames, H, W), chunked and compressed
                                                               like the run's own array (store/masks.py)
    OUT/versions/<item_id>/<object_id>/v<NNN>/masklet.parquet  one MASKLETS_SCHEMA row + VERSION_COLUMNS
    OUT/versions/<item_id>/<object_id>/v<NNN>/frames.parquet   that object's FRAMES_SCHEMA rows

Version 0 is the run's own masklet (masks/ and meta/, never copied). A version is staged under
tmp/versions/<item_id>/<object_id>/ and published by one rename (pipeline/store/atomic.py publish): a reader
sees a version whole or not at all, and a kill leaves only staging, which the next write of that masklet
clears. Its quality signals are computed as the worker computes them (pipeline/quality/signals.py
MaskletSignals over every object of the item: the other objects at the run's own masks, so overlap and
duplicate signals still see them), and its flags come from the thresholds in force (quality/reflag.current_qa).

Readers never touch the model: `version_rows(out)` reads every version's row, `latest_versions(out)` the
newest of each masklet, `masklet_mask(out, item_id, object_id, version)` one version's (frames, H, W) masks.
With no OUT/versions folder they cost one stat.
"""
from __future__ import annotations

import datetime as dt
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from pipeline.paths import RunPaths
from pipeline.quality.reflag import current_qa
from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.records import FrameMasks
from pipeline.review.records import VERSION_COLUMNS
from pipeline.store import metadata
from pipeline.store.atomic import publish
from pipeline.store.masks import MaskWriter, open_masks

VERSION_SCHEMA = pa.schema([*metadata.MASKLETS_SCHEMA, *VERSION_COLUMNS])
_VERSION_DIR = re.compile(r"^v(\d{3,})$")


def published_versions(paths: RunPaths, item_id: str, object_id: int) -> list[int]:
    """The version numbers published for one masklet, ascending (0, the run's own, is never listed)."""
    folder = paths.masklet_versions(item_id, object_id)
    if not folder.exists():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_DIR.match(p.name)))


def latest_version(out: str | Path, item_id: str, object_id: int) -> int:
    versions = published_versions(RunPaths.of(out), item_id, object_id)
    return versions[-1] if versions else 0


def with_version_zero(masklets: pa.Table) -> pa.Table:
    """The run's own masklet rows as version 0 (type auto, no edited frames, no corrections)."""
    n = masklets.num_rows
    cols = {
        "version": pa.array([0] * n, pa.int32()),
        "masklet_type": pa.array(["auto"] * n, pa.string()),
        "edited_frame_count": pa.array([0] * n, pa.int32()),
        "corrections": pa.array([[]] * n, pa.list_(pa.string())),
        "locked_frames": pa.array([[]] * n, pa.list_(pa.int32())),
        "created_at": pa.nulls(n, pa.timestamp("ms", tz="UTC")),
    }
    for f in VERSION_COLUMNS:
        masklets = masklets.append_column(f, cols[f.name])
    return masklets


def version_rows(out: str | Path) -> pa.Table:
    """Every published version's masklet row (VERSION_SCHEMA), by item, object and version."""
    root = RunPaths.of(out).versions
    files = sorted(root.glob("*/*/v*/masklet.parquet")) if root.exists() else []
    if not files:
        return VERSION_SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(f, schema=VERSION_SCHEMA) for f in files])
    return table.sort_by([("item_id", "ascending"), ("object_id", "ascending"), ("version", "ascending")])


def latest_versions(out: str | Path) -> pa.Table:
    """The newest published version of each masklet that has one (VERSION_SCHEMA)."""
    rows = version_rows(out)
    if rows.num_rows == 0:
        return rows
    ids = rows.column("masklet_id").to_pylist()
    last = {m: i for i, m in enumerate(ids)}  # sorted by version: the last index of each masklet is its newest
    return rows.take(pa.array(sorted(last.values()), pa.int64()))


def version_folder(out: str | Path, item_id: str, object_id: int, version: int) -> Path:
    return RunPaths.of(out).masklet_version(item_id, object_id, version)


def open_version_masks(out: str | Path, item_id: str, object_id: int, version: int) -> zarr.Array:
    """bool (1, frames, H, W) of a published version >= 1, lazy."""
    folder = version_folder(out, item_id, object_id, version)
    if not folder.exists():
        raise KeyError(f"masklet {item_id}/{object_id} has no version {version} in {RunPaths.of(out).root} "
                       f"(published: {published_versions(RunPaths.of(out), item_id, object_id)})")
    return zarr.open_array(str(folder / "masks.zarr"), mode="r")


def masklet_mask(out: str | Path, item_id: str, object_id: int, version: int | None = None) -> np.ndarray:
    """One masklet's masks, bool (frames, H, W): `version` None: the newest; 0: the run's own."""
    paths = RunPaths.of(out)
    if version is None:
        version = latest_version(out, item_id, object_id)
    if version == 0:
        return np.asarray(open_masks(paths, item_id)[int(object_id)])
    return np.asarray(open_version_masks(out, item_id, object_id, version)[0])


def frame_reader(out: str | Path, item_id: str, object_id: int, version: int):
    """(t) -> (H, W) bool of one version, read one chunk at a time (version 0: the run's array)."""
    if version == 0:
        array = open_masks(RunPaths.of(out), item_id)
        return lambda t: array[int(object_id), t]
    array = open_version_masks(out, item_id, object_id, version)
    return lambda t: array[0, t]


@dataclass(frozen=True)
class _Prompt:
    """The fields metadata.masklets_table reads from a prompt, rebuilt from a run's masklets row."""

    object_id: int
    source: str
    frame: int
    point: tuple[float, float]
    predicted_iou: float
    stability_score: float
    area: int

    @classmethod
    def from_row(cls, row: dict) -> _Prompt:
        return cls(int(row["object_id"]), row["prompt_source"], int(row["prompt_frame"]),
                   (row["prompt_x"], row["prompt_y"]), row["predicted_iou"], row["stability_score"],
                   int(row["prompt_area"]))


def write_version(out: str | Path, item_id: str, object_id: int, masks: np.ndarray, object_scores: np.ndarray,
                  corrections: Sequence[str], edited_frames: Sequence[int], locked_frames: Sequence[int] = (),
                  fg_points: int = 0, bg_points: int = 0, version: int | None = None) -> int:
    """Publish a new version of one masklet: `masks` bool (frames, H, W) on the run's decoded frames,
    `object_scores` (frames,) (NaN: none). `corrections`: every correction id in it (its base's and the new
    ones); `edited_frames`: the frames whose mask came from a correction; fg/bg_points: the reviewer's clicks
    on top of the automatic prompt. Returns the version number (the next free one unless given)."""
    from pipeline.plan import load_run
    from pipeline.results import open_run

    plan = load_run(out)
    paths = plan.paths
    run = open_run(out)
    base = run.masklets_for(item_id).sort_by("object_id")
    rows = base.to_pylist()
    object_id = int(object_id)
    if object_id not in [r["object_id"] for r in rows]:
        raise KeyError(f"item {item_id!r} has no masklet {object_id} in {paths.root}")
    array = open_masks(paths, item_id)
    num_objects, num_frames, height, width = array.shape
    if masks.shape != (num_frames, height, width) or masks.dtype != np.bool_:
        raise ValueError(f"masklet {item_id}/{object_id}: masks must be bool {(num_frames, height, width)}, "
                         f"got {masks.dtype} {masks.shape}")
    if version is None:
        version = max(published_versions(paths, item_id, object_id), default=0) + 1
    final = paths.masklet_version(item_id, object_id, version)
    if final.exists():
        raise FileExistsError(f"{final} exists: version {version} of masklet {item_id}/{object_id} was published "
                              f"already (two refines of one masklet at once?)")
    source_frames = [int(s) for s in array.attrs["source_frames"]][:num_frames]
    run_frames = run.frames_for(item_id)
    scores = {(r["object_id"], r["frame"]): r["object_score"]
              for r in run_frames.select(["object_id", "frame", "object_score"]).to_pylist()}
    object_ids = [r["object_id"] for r in rows]
    prompts = [PromptSignals(r["object_id"], r["prompt_frame"], r["predicted_iou"], r["stability_score"],
                             r["prompt_area"], 1 + (fg_points if r["object_id"] == object_id else 0),
                             bg_points if r["object_id"] == object_id else 0) for r in rows]
    signals = MaskletSignals(prompts, height, width, keep_rows=False)
    frame_rows = metadata.FrameRows(item_id, signals)

    stage_root = paths.version_tmp(item_id, object_id)
    shutil.rmtree(stage_root, ignore_errors=True)  # what a killed write left
    stage = stage_root / f"v{version:03d}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    attrs = {"item_id": item_id, "object_ids": [object_id], "source_frames": source_frames,
             "model": array.attrs.get("model"), "random_weights": array.attrs.get("random_weights"),
             "version": version}
    writer = MaskWriter(paths, item_id, 1, num_frames, height, width, plan.config.store, attrs,
                        stage=stage / "masks.zarr")
    try:
        plane = object_ids.index(object_id)
        for t in range(num_frames):
            everyone = np.asarray(array[:, t]) if num_objects else np.zeros((0, height, width), bool)
            everyone = everyone[object_ids]
            everyone[plane] = masks[t]
            obj_scores = np.array([scores.get((o, t), np.nan) for o in object_ids], dtype=np.float32)
            obj_scores[plane] = object_scores[t]
            frame_rows.add(t, source_frames[t], object_ids, everyone, obj_scores)
            writer.write(FrameMasks(t, source_frames[t], (object_id,), masks[t][None],
                                    np.asarray(object_scores[t:t + 1], np.float32)))
        writer.finish()
        frames_all = frame_rows.table()
        computed = signals.finish()
        table = metadata.masklets_table(item_id, [_Prompt.from_row(r) for r in rows], source_frames, frames_all,
                                        computed.masklets, current_qa(paths, plan.config))
        table = table.filter(pc.equal(table["object_id"], object_id))
        frames = frames_all.filter(pc.equal(frames_all["object_id"], object_id))
        extra = {
            "version": pa.array([version], pa.int32()),
            "masklet_type": pa.array(["manual"], pa.string()),
            "edited_frame_count": pa.array([len(set(edited_frames))], pa.int32()),
            "corrections": pa.array([list(corrections)], pa.list_(pa.string())),
            "locked_frames": pa.array([sorted({int(f) for f in locked_frames})], pa.list_(pa.int32())),
            "created_at": pa.array([dt.datetime.now(dt.UTC)], pa.timestamp("ms", tz="UTC")),
        }
        for f in VERSION_COLUMNS:
            table = table.append_column(f, extra[f.name])
        pq.write_table(table.cast(VERSION_SCHEMA), stage / "masklet.parquet")
        pq.write_table(frames, stage / "frames.parquet")
        final.parent.mkdir(parents=True, exist_ok=True)
        publish(stage, final)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
    return version


def version_frames(out: str | Path, item_id: str, object_id: int, version: int) -> pa.Table:
    """The frame rows of a published version >= 1."""
    return pq.read_table(version_folder(out, item_id, object_id, version) / "frames.parquet",
                         schema=metadata.FRAMES_SCHEMA)
