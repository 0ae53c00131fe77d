"""YouTube-VIS JSON: one `videos` entry per item and one `annotations` entry per masklet, per-frame
`segmentations` / `areas` / `bboxes` (compressed COCO RLE with str counts, area and box from pycocotools).

Spec: the challenge's format (TrackEval docs/YouTube-VIS-format.txt); loading rules: youtubevos/cocoapi
PythonAPI/pycocotools/ytvos.py (see shared notes, formats-and-metrics.md sections 5 and 8).

A frame where the masklet's mask is empty is `null` in all three lists, not an empty RLE: null is the format's
"absent", and ytvos.py counts an empty RLE as present with area 0 (annToRLE returns it as is; loadRes puts
area 0 in `areas`), so an empty RLE would mark the object present-but-empty on every frame before it
appears. Readers that index every frame (annToMask(ann, t) on a null) must skip nulls, as ytvoseval does.

What it keeps beyond the format: per annotation `masklet_id`, `object_id`, `score` (= predicted_iou, the
name YTVIS predictions use), `predicted_iou`, `stability_score`, `review_priority`, `flags`, `object_scores`
(SAM 2's presence logit per frame) and the masklet's other quality signals under `signals`; per video
`item_id`, `kind`, `path`, `source_frames`. The file holds every item; ids are assigned when the parts are
merged (videos 1.., annotations 1.., in item order). Categories are class-agnostic ("object", id 1) unless
the runner passes labels (item.extra["labels"]: object_id -> name).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.export import parts
from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.rle import coco_area_bbox, coco_rle

FILE = "ytvis.json"
# Masklet columns written under their own names; the rest of the row goes under "signals".
_TOP = ("masklet_id", "object_id", "predicted_iou", "stability_score", "review_priority", "flags")


def frame_file_name(item: ItemExport, t: int) -> str:
    """The frame's name in `file_names`: `<item_id>/<media frame index, 5 digits>.jpg` (YouTube-VIS names
    frames by their index in the source video). This export writes no frames: extract them under these
    names to view the masks over them."""
    return f"{item.item_id}/{item.source_frames[t]:05d}.jpg"


def info(run: RunInfo, description: str) -> dict:
    out = {"description": description, "model": run.model, "random_weights": run.random_weights,
           "run": run.root, "fingerprint": run.fingerprint}
    if run.label:
        out["warning"] = run.label
    return out


def masklet_extras(row: dict) -> dict:
    extras = {k: row[k] for k in _TOP if k in row}
    extras["flags"] = list(row.get("flags") or [])
    extras["signals"] = {k: v for k, v in row.items() if k not in _TOP and k != "item_id"}
    return extras


def object_scores(item: ItemExport) -> dict[tuple[int, int], float]:
    f = item.frames.select(["object_id", "frame", "object_score"]).to_pydict()
    return {(o, t): s for o, t, s in zip(f["object_id"], f["frame"], f["object_score"])}


@dataclass(frozen=True)
class YtvisFormat:
    name: str = "ytvis"
    description: str = "YouTube-VIS JSON (one file): per-masklet RLE lists, null where the object is absent"

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        labels = item.extra.get("labels") or {}
        category = {o: labels.get(o, "object") for o in item.object_ids}
        scores = object_scores(item)
        rows = item.masklets.to_pylist()
        video = {"item_id": item.item_id, "kind": item.item.get("kind"), "path": item.item.get("path"),
                 "width": item.width, "height": item.height, "length": item.num_frames,
                 "file_names": [frame_file_name(item, t) for t in range(item.num_frames)],
                 "source_frames": list(item.source_frames)}
        absent = 0

        def records():
            nonlocal absent
            yield {"video": video}
            for k, (object_id, row) in enumerate(zip(item.object_ids, rows)):
                segs, areas, boxes = [], [], []
                for t in range(item.num_frames):
                    m = item.mask(k, t)
                    if not m.any():
                        segs.append(None), areas.append(None), boxes.append(None)
                        absent += 1
                        continue
                    rle = coco_rle(m)
                    area, box = coco_area_bbox(rle)
                    segs.append(rle), areas.append(area), boxes.append(box)
                yield {"annotation": {
                    "category": category[object_id], "iscrowd": 0,
                    "height": item.height, "width": item.width, "length": item.num_frames,
                    "segmentations": segs, "areas": areas, "bboxes": boxes,
                    "score": row.get("predicted_iou"), **masklet_extras(row),
                    "object_scores": [scores.get((object_id, t)) for t in range(item.num_frames)]}}

        rel = parts.part_path(self.name, item.item_id)
        parts.write_part(stage, rel, records())
        return {"item_id": item.item_id, "part": rel, "categories": sorted(set(category.values())),
                "annotations": len(item.object_ids), "frames": item.num_frames, "absent_frames": absent}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        categories: dict[str, int] = {"object": 1}
        for s in items:  # from the summaries: no pass over the parts for a handful of names
            for name in s["categories"]:
                categories.setdefault(name, len(categories) + 1)
        summary = {"file": FILE, "videos": len(items), "annotations": sum(s["annotations"] for s in items),
                   "categories": len(categories), "absent_frames": sum(s["absent_frames"] for s in items),
                   "random_weights": run.random_weights}
        if parts.already_merged(dest, FILE, self.name, items):
            parts.remove_parts(dest, self.name)
            return summary

        def videos():
            for vid, s in enumerate(items, start=1):
                for v in parts.read_part(dest, s["part"], "video"):
                    yield {"id": vid, **v}

        def annotations():
            ann_id = 0
            for vid, s in enumerate(items, start=1):
                for a in parts.read_part(dest, s["part"], "annotation"):
                    ann_id += 1
                    name = a.pop("category")
                    yield {"id": ann_id, "video_id": vid, "category_id": categories[name], **a}

        def body(w: parts.JsonArrayWriter) -> None:
            w.key("info", info(run, "masklet export, YouTube-VIS format"))
            w.key("licenses", [])
            w.key("categories", [{"id": i, "name": n, "supercategory": "object"} for n, i in categories.items()])
            w.array("videos", videos())
            w.array("annotations", annotations())

        parts.write_json(dest / FILE, body)
        parts.remove_parts(dest, self.name)
        return summary


FORMAT = YtvisFormat()
