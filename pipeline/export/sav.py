"""SA-V formats: `sav-json` (the SA-V train annotation JSON, one `{video}_auto.json` per item) and `sav-png`
(the SA-V val/test layout, one 0/1 palette PNG per object per frame). Both keep overlapping objects.

Which frames are "annotated": every decoded frame of the run. SA-V annotates every 4th frame of its 24 fps
videos (6 fps); our decoded frames, with the run's stride or target fps, play that role. `sav-json` lists them
in order (masklet[t] is decoded frame t; the extra key `annotated_source_frames` gives each one's index in the
media); `sav-png` names each file by that media index, as SA-V names its 6 fps files by the 24 fps index.

sav-json, key by key (sam2 sav_dataset/README.md; docs: /work/shared/notes/formats-and-metrics.md section 1):
- masklet[t][k]: COCO RLE of object k on annotated frame t ({"size": [H, W], "counts": str}), Fortran order
  as pycocotools encodes; an empty RLE where the object is invisible (never null, as in SA-V's files).
- masklet_id: 0..N-1 (the index into each inner list, as SA-V); `masklet_run_id` (extra) names the run's
  masklet ("<item_id>/<object_id>") behind each index.
- masklet_size_abs: mean area in pixels over the annotated frames where the object is visible (0.0 if none);
  masklet_size_rel = size_abs / (H * W); masklet_size_bucket: "small" below 32², "medium" below 96², else
  "large" (SA-V leaves exactly 96² unassigned; here it is "large", as COCO's area ranges make it).
- masklet_visibility_changes: visible <-> invisible toggles after the first appearance.
- masklet_first_appeared_frame: the first annotated frame where it is visible (SA-V's auto masklets always
  say 0: they are all prompted on frame 0; ours may appear later); a masklet never visible: its prompt frame.
- masklet_frame_count: the number of annotated frames (the same for every masklet, as in SA-V's files).
- masklet_type "auto", masklet_edited_frame_count 0, masklet_num N.
- masklet_stability_score[t][k]: SA-V has a score per frame; we keep the AMG's stability score of the prompt
  mask only, on the masklet's prompt frame, and null on the other frames (nothing per frame is computed).
- video_id: the item id. video_frame_count and video_duration: of the media (source_num_frames, / fps; null
  without fps). video_height, video_width, video_resolution: of the masks (the media's unless
  decode.max_side shrank the frames; then `export_info.source_size` has the media's). video_environment and
  video_split: null (unknown). Numbers that SA-V writes as floats are floats here too.
- export_info (extra): model, random_weights, the RANDOM WEIGHTS label when so, run fingerprint, stride.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.png import write_palette_png

SMALL, MEDIUM = 32 ** 2, 96 ** 2


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of one (H, W) bool mask, counts as a str (JSON-able; pycocotools reads it back)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def size_bucket(size_abs: float) -> str:
    return "small" if size_abs < SMALL else "medium" if size_abs < MEDIUM else "large"


def visibility_changes(visible: list[bool]) -> int:
    """Toggles between visible and invisible after the first visible frame."""
    if True not in visible:
        return 0
    first = visible.index(True)
    return sum(1 for a, b in zip(visible[first:], visible[first + 1:]) if a != b)


def _export_info(item: ItemExport) -> dict:
    info = {"model": item.run.model, "random_weights": item.run.random_weights, "run": item.run.root,
            "fingerprint": item.run.fingerprint, "stride": item.item.get("stride"),
            "source_size": [item.item.get("source_height"), item.item.get("source_width")]}
    if item.run.label:
        info["label"] = item.run.label
    return info


def sav_record(item: ItemExport) -> dict:
    """The SA-V JSON of one item, reading one mask at a time."""
    n, frames = len(item.object_ids), item.num_frames
    masklet, areas = [], np.zeros((n, frames), np.int64)
    for t in range(frames):
        row = []
        for k in range(n):
            m = np.asarray(item.mask(k, t), dtype=bool)
            areas[k, t] = int(m.sum())
            row.append(encode_rle(m))
        masklet.append(row)
    visible = areas > 0
    size_abs = [float(areas[k][visible[k]].mean()) if visible[k].any() else 0.0 for k in range(n)]
    resolution = item.height * item.width
    rows = item.masklets.to_pylist()
    first = [int(np.flatnonzero(visible[k])[0]) if visible[k].any() else int(rows[k]["prompt_frame"])
             for k in range(n)]
    stability = [[None] * n for _ in range(frames)]
    for k, r in enumerate(rows):
        if 0 <= r["prompt_frame"] < frames and r["stability_score"] is not None:
            stability[r["prompt_frame"]][k] = float(r["stability_score"])
    fps = item.item.get("fps")
    source_frames = item.item.get("source_num_frames") or frames
    return {
        "video_id": item.item_id,
        "video_duration": float(source_frames / fps) if fps else None,
        "video_frame_count": float(source_frames),
        "video_height": float(item.height),
        "video_width": float(item.width),
        "video_resolution": float(resolution),
        "video_environment": None,
        "video_split": None,
        "masklet": masklet,
        "masklet_id": list(range(n)),
        "masklet_size_rel": [s / resolution for s in size_abs],
        "masklet_size_abs": size_abs,
        "masklet_size_bucket": [size_bucket(s) for s in size_abs],
        "masklet_visibility_changes": [visibility_changes(visible[k].tolist()) for k in range(n)],
        "masklet_first_appeared_frame": first,
        "masklet_frame_count": [frames] * n,
        "masklet_edited_frame_count": [0] * n,
        "masklet_type": ["auto"] * n,
        "masklet_stability_score": stability,
        "masklet_num": n,
        "masklet_run_id": [r["masklet_id"] for r in rows],
        "annotated_source_frames": list(item.source_frames),
        "export_info": _export_info(item),
    }


class SavJson:
    name = "sav-json"
    description = "SA-V train annotation JSON: one {video}_auto.json per item, COCO RLE per annotated frame and object"

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        name = f"{item.item_id}_auto.json"
        with open(stage / name, "w") as f:
            json.dump(sav_record(item), f, separators=(",", ":"))
        return {"item_id": item.item_id, "file": name, "masklets": len(item.object_ids), "frames": item.num_frames}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        return {"files": len(items), "annotated_frames": sum(i["frames"] for i in items)}


class SavPng:
    name = "sav-png"
    description = ("SA-V val/test layout: {video}/{object_id:03d}/{frame:05d}.png, one 0/1 palette PNG per object "
                   "per frame (overlaps kept), frame = index in the media")

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        video = stage / item.item_id
        video.mkdir()
        for k, object_id in enumerate(item.object_ids):
            folder = video / f"{object_id:03d}"
            folder.mkdir()
            for t, source_frame in enumerate(item.source_frames):
                m = np.asarray(item.mask(k, t), dtype=np.uint8)
                write_palette_png(folder / f"{source_frame:05d}.png", m, item.run.label)
        return {"item_id": item.item_id, "masklets": len(item.object_ids), "frames": item.num_frames,
                "files": len(item.object_ids) * item.num_frames}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        return {"files": sum(i["files"] for i in items)}


SAV_JSON = SavJson()
SAV_PNG = SavPng()
