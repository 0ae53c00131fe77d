"""A test-side stand-in for the export runner: builds `ItemExport`s from a run folder (or from hand-made
masks written through the real Zarr writer) and drives a format's write_item / finish the way the runner's
contract says (an empty staging folder per item, published into DEST as is, then finish with the summaries
in item order). Tests of the formats use it until they also go through `masklet export`."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import StoreConfig
from pipeline.export.base import ItemExport, RunInfo
from pipeline.paths import RunPaths
from pipeline.records import FrameMasks, Prompt
from pipeline.store import metadata
from pipeline.store.masks import MaskWriter, open_masks


def run_info(run) -> RunInfo:
    models = run.items.column("model").to_pylist()
    return RunInfo(root=str(run.paths.root), model=models[0] if models else "",
                   random_weights=run.random_weights, fingerprint=run.plan.snapshot["config_fingerprint"])


def items_from_run(out) -> list[ItemExport]:
    from pipeline import open_run

    run = open_run(out)
    info = run_info(run)
    exports = []
    for row in run.items.to_pylist():
        if row["status"] != "done":
            continue
        masklets = run.masklets_for(row["item_id"]).sort_by("object_id")
        frames = run.frames_for(row["item_id"])
        arr = run.masks(row["item_id"])
        exports.append(ItemExport(
            item_id=row["item_id"], item=row, object_ids=masklets.column("object_id").to_pylist(),
            masklets=masklets, frames=frames, source_frames=list(arr.attrs["source_frames"]),
            height=arr.shape[2], width=arr.shape[3], run=info,
            mask=lambda k, t, arr=arr: np.asarray(arr[k, t])))
    return exports


def handmade_item(root: Path, item_id: str, masks: np.ndarray, kind: str = "video", random_weights: bool = True,
                  flags: dict[int, list[str]] | None = None, stride: int = 1) -> ItemExport:
    """masks: bool (objects, frames, H, W), written with the run's MaskWriter and read back from Zarr."""
    paths = RunPaths.of(root).ensure()
    objects, frames, height, width = masks.shape
    source_frames = [t * stride for t in range(frames)]
    writer = MaskWriter(paths, item_id, objects, frames, height, width, StoreConfig(frames_per_file=4),
                        {"item_id": item_id, "object_ids": list(range(objects)), "source_frames": source_frames})
    rows = metadata.FrameRows(item_id)
    scores = np.linspace(-1, 2, objects, dtype=np.float32)
    for t in range(frames):
        writer.write(FrameMasks(t, source_frames[t], tuple(range(objects)), masks[:, t].copy(), scores))
        rows.add(t, source_frames[t], tuple(range(objects)), masks[:, t], scores)
    writer.finish(num_frames=frames)
    writer.publish()
    arr = open_masks(paths, item_id)
    frames_table = rows.table()
    prompts = []
    for o in range(objects):
        t0 = next((t for t in range(frames) if masks[o, t].any()), 0)
        prompts.append(Prompt(object_id=o, frame=t0, mask=masks[o, t0], point=(0.5, 0.5), predicted_iou=0.5 + o / 10,
                              stability_score=0.9, area=int(masks[o, t0].sum()), bbox=(0, 0, 1, 1)))
    masklets = metadata.masklets_table(item_id, prompts, source_frames, frames_table)
    flag_lists = [(flags or {}).get(o, []) for o in range(objects)]
    masklets = masklets.set_column(masklets.schema.get_field_index("flags"), "flags",
                                   pa.array(flag_lists, pa.list_(pa.string())))
    masklets = masklets.set_column(masklets.schema.get_field_index("review_priority"), "review_priority",
                                   pa.array([float(len(f)) + 0.25 for f in flag_lists], pa.float64()))
    info = RunInfo(root=str(root), model="sam2.1_hiera_tiny (RANDOM WEIGHTS)" if random_weights else "sam2.1_hiera_tiny",
                   random_weights=random_weights, fingerprint="handmade")
    item = {"item_id": item_id, "path": f"/media/{item_id}", "kind": kind, "width": width, "height": height,
            "num_frames": frames, "fps": 25.0 if kind == "video" else None, "status": "done"}
    return ItemExport(item_id=item_id, item=item, object_ids=list(range(objects)), masklets=masklets,
                      frames=frames_table, source_frames=source_frames, height=height, width=width, run=info,
                      mask=lambda k, t: np.asarray(arr[k, t]))


def export(fmt, items: list[ItemExport], dest: Path, scratch: Path, finish: bool = True):
    """write_item into an empty per-item stage, publish the stage into dest, then finish (summaries, and
    finish's summary or None)."""
    dest.mkdir(parents=True, exist_ok=True)
    summaries = []
    for n, item in enumerate(items):
        stage = scratch / f"stage-{n}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        summaries.append(fmt.write_item(item, stage))
        shutil.copytree(stage, dest, dirs_exist_ok=True)
        shutil.rmtree(stage)
    return summaries, (fmt.finish(dest, summaries, items[0].run) if finish else None)
