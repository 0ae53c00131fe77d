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

A new masklet (refine's answer to a correction on a missed object) has no version 0: its object id is past
the run's array, its first version carries its prompt (prompt_source "correction"). `item_masklets` gives an
item's rows as readers see them now (newest versions, new masklets included); the queue and exports use it.
Overlap signals are not recomputed for the item's other masklets when one is refined (README-review.md).

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


def version_masklet_files(out: str | Path) -> list[Path]:
    """Every published version's masklet.parquet (one VERSION_SCHEMA row each)."""
    root = RunPaths.of(out).versions
    return sorted(root.glob("*/*/v*/masklet.parquet")) if root.exists() else []


def version_rows(out: str | Path) -> pa.Table:
    """Every published version's masklet row (VERSION_SCHEMA), by item, object and version."""
    files = version_masklet_files(out)
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
    """The fields metadata.masklets_table reads from a prompt, rebuilt from a masklets row (the run's, or a
    new masklet's first version: prompt_source "correction", its creating correction's frame and first point)."""

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


def new_masklet_prompt(object_id: int, frame: int, point: tuple[float, float], predicted_iou: float,
                       area: int) -> dict:
    """The prompt columns of a masklet a reviewer added for a missed object (refine's new masklets):
    source "correction" (the name main's pipeline/records.py gives it), SAM 2's predicted IoU of the candidate
    picked, no stability score (a click has none)."""
    return {"object_id": int(object_id), "prompt_source": "correction", "prompt_frame": int(frame),
            "prompt_x": float(point[0]), "prompt_y": float(point[1]), "predicted_iou": float(predicted_iou),
            "stability_score": float("nan"), "prompt_area": int(area)}


def versioned_objects(out: str | Path, item_id: str) -> list[int]:
    """The object ids of `item_id` with a published version, ascending (new masklets included)."""
    folder = RunPaths.of(out).masklet_versions(item_id, 0).parent  # versions/<item_id>/
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and any(
        _VERSION_DIR.match(v.name) for v in p.iterdir()))


def _version_row(out: str | Path, item_id: str, object_id: int, version: int) -> dict:
    path = version_folder(out, item_id, object_id, version) / "masklet.parquet"
    return pq.read_table(path, schema=VERSION_SCHEMA).to_pylist()[0]


def version_rows_of(out: str | Path, item_id: str, object_id: int, numbers: Sequence[int]) -> list[dict]:
    """The masklet rows of these published versions of one masklet."""
    return [_version_row(out, item_id, object_id, v) for v in numbers]


def version_corrections(out: str | Path, item_id: str, object_id: int) -> set[str]:
    """Every correction id the published versions of one masklet list."""
    numbers = published_versions(RunPaths.of(out), item_id, object_id)
    return {c for row in version_rows_of(out, item_id, object_id, numbers) for c in row["corrections"] or ()}


def item_masklets(out: str | Path, item_id: str, run_rows: pa.Table) -> pa.Table:
    """One item's masklet rows as readers see them now (VERSION_SCHEMA, object_id order): each masklet's
    newest version in place of the run's row (`run_rows`, that item's masklets.parquet rows), and the new
    masklets refine created from corrections on missed objects. No versions: the run's rows as version 0."""
    table = with_version_zero(run_rows.select(metadata.MASKLETS_SCHEMA.names)).cast(VERSION_SCHEMA)
    objects = versioned_objects(out, item_id)
    if not objects:
        return table.sort_by("object_id")
    paths = RunPaths.of(out)
    newest = [_version_row(out, item_id, o, published_versions(paths, item_id, o)[-1]) for o in objects]
    newest = pa.Table.from_pylist(newest, schema=VERSION_SCHEMA)
    table = table.filter(pc.invert(pc.is_in(table["object_id"], value_set=newest["object_id"])))
    return pa.concat_tables([table, newest]).sort_by("object_id")


def _item_prompts(out, run, item_id: str, object_id: int, prompt: dict | None) -> tuple[list[dict], bool]:
    """The item's masklet rows that carry prompts (the run's), with `object_id`'s added when it is a new
    masklet (from `prompt`, or its first version's row); and whether it is new."""
    rows = run.masklets_for(item_id).sort_by("object_id").to_pylist()
    if object_id in [r["object_id"] for r in rows]:
        return rows, False
    if prompt is None:
        published = published_versions(RunPaths.of(out), item_id, object_id)
        if not published:
            raise KeyError(f"item {item_id!r} has no masklet {object_id} in {RunPaths.of(out).root}: neither the "
                           f"run's nor a new masklet's version; correct one of the item's masklets, or object_id -1 "
                           f"for a new one")
        prompt = _version_row(out, item_id, object_id, published[0])
    return rows + [dict(prompt, object_id=object_id)], True


def write_version(out: str | Path, item_id: str, object_id: int, masks: np.ndarray, object_scores: np.ndarray,
                  corrections: Sequence[str], edited_frames: Sequence[int], locked_frames: Sequence[int] = (),
                  fg_points: int = 0, bg_points: int = 0, version: int | None = None,
                  prompt: dict | None = None) -> int:
    """Publish a new version of one masklet: `masks` bool (frames, H, W) on the run's decoded frames,
    `object_scores` (frames,) (NaN: none). `corrections`: every correction id in it (its base's and the new
    ones); `edited_frames`: the frames whose mask came from a correction; fg/bg_points: the reviewer's clicks
    on top of the automatic prompt. A new masklet (an object id the run does not have) takes `prompt`
    (new_masklet_prompt) for its first version, its first version's prompt after. Returns the version number
    (the next free one unless given)."""
    from pipeline.plan import load_run
    from pipeline.results import open_run

    plan = load_run(out)
    paths = plan.paths
    object_id = int(object_id)
    rows, is_new = _item_prompts(out, open_run(out), item_id, object_id, prompt)
    array = open_masks(paths, item_id)
    _, num_frames, height, width = array.shape
    if masks.shape != (num_frames, height, width) or masks.dtype != np.bool_:
        raise ValueError(f"masklet {item_id}/{object_id}: masks must be bool {(num_frames, height, width)}, "
                         f"got {masks.dtype} {masks.shape}")
    if version is None:
        version = max(published_versions(paths, item_id, object_id), default=0) + 1
    final = paths.masklet_version(item_id, object_id, version)
    if final.exists():
        raise FileExistsError(f"{final} exists: version {version} of masklet {item_id}/{object_id} was published "
                              f"already (two refines of one masklet at once?)")
    stage_root = paths.version_tmp(item_id, object_id)
    shutil.rmtree(stage_root, ignore_errors=True)  # what a killed write left
    stage = stage_root / f"v{version:03d}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        table, frames = _stage_version(plan, open_run(out), array, item_id, object_id, version, rows, is_new, masks,
                                       object_scores, stage, fg_points, bg_points)
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


def _stage_version(plan, run, array, item_id: str, object_id: int, version: int, rows: list[dict],
                   is_new: bool, masks: np.ndarray, object_scores: np.ndarray, stage: Path, fg_points: int,
                   bg_points: int) -> tuple[pa.Table, pa.Table]:
    """Write the version's masks under `stage` and compute its masklet row and frame rows, with the signals
    over every object of the item: the run's at their own masks (version 0), this one at `masks`. Other new
    masklets are not among them (they have no plane in the run's array): see README-review.md."""
    num_objects, num_frames, height, width = array.shape
    source_frames = [int(s) for s in array.attrs["source_frames"]][:num_frames]
    scores = {(r["object_id"], r["frame"]): r["object_score"]
              for r in run.frames_for(item_id).select(["object_id", "frame", "object_score"]).to_pylist()}
    object_ids = [r["object_id"] for r in rows]
    run_ids = object_ids[:-1] if is_new else object_ids
    prompts = [PromptSignals(r["object_id"], r["prompt_frame"], r["predicted_iou"], r["stability_score"],
                             r["prompt_area"], 1 + (fg_points if r["object_id"] == object_id else 0),
                             bg_points if r["object_id"] == object_id else 0) for r in rows]
    if is_new:  # a reviewer's clicks are its whole prompt: no automatic point under them
        prompts[-1] = PromptSignals(object_id, rows[-1]["prompt_frame"], rows[-1]["predicted_iou"],
                                    rows[-1]["stability_score"], rows[-1]["prompt_area"], fg_points, bg_points)
    signals = MaskletSignals(prompts, height, width, keep_rows=False)
    frame_rows = metadata.FrameRows(item_id, signals)
    attrs = {"item_id": item_id, "object_ids": [object_id], "source_frames": source_frames,
             "model": array.attrs.get("model"), "random_weights": array.attrs.get("random_weights"),
             "version": version}
    writer = MaskWriter(plan.paths, item_id, 1, num_frames, height, width, plan.config.store, attrs,
                        stage=stage / "masks.zarr")
    plane = object_ids.index(object_id)
    for t in range(num_frames):
        everyone = np.asarray(array[:, t]) if num_objects else np.zeros((0, height, width), bool)
        everyone = everyone[run_ids]
        if is_new:
            everyone = np.concatenate([everyone, masks[t][None]])
        everyone[plane] = masks[t]
        obj_scores = np.array([scores.get((o, t), np.nan) for o in object_ids], dtype=np.float32)
        obj_scores[plane] = object_scores[t]
        frame_rows.add(t, source_frames[t], object_ids, everyone, obj_scores)
        writer.write(FrameMasks(t, source_frames[t], (object_id,), masks[t][None],
                                np.asarray(object_scores[t:t + 1], np.float32)))
    writer.finish()
    frames_all = frame_rows.table()
    table = metadata.masklets_table(item_id, [_Prompt.from_row(r) for r in rows], source_frames, frames_all,
                                    signals.finish().masklets, current_qa(plan.paths, plan.config))
    return (table.filter(pc.equal(table["object_id"], object_id)),
            frames_all.filter(pc.equal(frames_all["object_id"], object_id)))


def version_frames(out: str | Path, item_id: str, object_id: int, version: int) -> pa.Table:
    """The frame rows of a published version >= 1."""
    return pq.read_table(version_folder(out, item_id, object_id, version) / "frames.parquet",
                         schema=metadata.FRAMES_SCHEMA)
