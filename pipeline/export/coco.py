"""COCO instance JSON: one `images` entry per image item and per decoded video frame, one `annotations`
entry per visible masklet-frame (compressed RLE with str counts; area and box from pycocotools, which is
what pycocotools.coco.COCO and loadRes compute again).

COCO has no "absent": an empty mask gets no annotation. Video frames carry their `video_id` (an entry of
the extra top-level `videos` list, one per video item), `frame` (the decoded index, the Zarr time axis) and
`frame_index` (the frame's index in the media); each annotation carries `masklet_id` and `object_id`, so the
frames of one masklet can be joined back. Kept too: `score` (= predicted_iou), `predicted_iou`,
`stability_score`, `review_priority`, `flags`, and the frame's `object_score` (SAM 2's presence logit).
Lost: the masklet's other signals (in masklets.parquet, joined by masklet_id). Ids are assigned when the
parts are merged (videos, images, annotations 1.., in item order).

`file_name`: an image item's id; a video frame's `<item_id>/<media frame index, 5 digits>.jpg` (frames are
not written by this export).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.export import parts
from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.rle import coco_area_bbox, coco_rle
from pipeline.export.ytvis import frame_file_name, info, object_scores

FILE = "coco.json"
_KEEP = ("masklet_id", "object_id", "predicted_iou", "stability_score", "review_priority")


@dataclass(frozen=True)
class CocoFormat:
    name: str = "coco"
    description: str = "COCO instance JSON (one file): one RLE annotation per visible masklet-frame"

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        labels = item.extra.get("labels") or {}
        category = {o: labels.get(o, "object") for o in item.object_ids}
        scores = object_scores(item)
        rows = item.masklets.to_pylist()
        is_video = item.item.get("kind") != "image"
        counts = {"images": item.num_frames, "annotations": 0}

        def records():
            if is_video:
                yield {"video": {"item_id": item.item_id, "path": item.item.get("path"), "width": item.width,
                                 "height": item.height, "length": item.num_frames,
                                 "source_frames": list(item.source_frames)}}
            for t in range(item.num_frames):
                image = {"file_name": frame_file_name(item, t) if is_video else item.item_id,
                         "width": item.width, "height": item.height, "item_id": item.item_id, "frame": t,
                         "frame_index": item.source_frames[t]}
                yield {"image": image}
            # Object-major, like the masks' chunks: one object's frames are read in order.
            for k, (object_id, row) in enumerate(zip(item.object_ids, rows)):
                extras = {key: row.get(key) for key in _KEEP}
                extras["flags"] = list(row.get("flags") or [])
                for t in range(item.num_frames):
                    m = item.mask(k, t)
                    if not m.any():
                        continue
                    rle = coco_rle(m)
                    area, box = coco_area_bbox(rle)
                    counts["annotations"] += 1
                    yield {"annotation": {"frame": t, "category": category[object_id],
                                          "segmentation": rle, "area": area, "bbox": box, "iscrowd": 0,
                                          "score": row.get("predicted_iou"), **extras,
                                          "object_score": scores.get((object_id, t))}}

        rel = parts.part_path(self.name, item.item_id)
        parts.write_part(stage, rel, records())
        return {"item_id": item.item_id, "part": rel, "categories": sorted(set(category.values())),
                "video": is_video, **counts}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        categories: dict[str, int] = {"object": 1}
        for s in items:  # from the summaries: no pass over the parts for a handful of names
            for name in s["categories"]:
                categories.setdefault(name, len(categories) + 1)
        # Global ids from the summaries' counts alone: item n's first image id is 1 + the images before it.
        first_image, video_ids, n_images, n_videos = [], [], 0, 0
        for s in items:
            first_image.append(n_images + 1)
            n_images += s["images"]
            n_videos += bool(s["video"])
            video_ids.append(n_videos if s["video"] else None)
        summary = {"file": FILE, "videos": n_videos, "images": n_images,
                   "annotations": sum(s["annotations"] for s in items), "categories": len(categories),
                   "random_weights": run.random_weights}
        if parts.already_merged(dest, FILE, self.name, items):
            parts.remove_parts(dest, self.name)
            return summary

        def videos():
            for s, vid in zip(items, video_ids):
                for v in parts.read_part(dest, s["part"], "video"):
                    yield {"id": vid, **v}

        def images():
            for s, first, vid in zip(items, first_image, video_ids):
                for im in parts.read_part(dest, s["part"], "image"):
                    extra = {"video_id": vid} if vid is not None else {}
                    yield {"id": first + im["frame"], **im, **extra}

        def annotations():
            ann_id = 0
            for s, first, vid in zip(items, first_image, video_ids):
                for a in parts.read_part(dest, s["part"], "annotation"):
                    ann_id += 1
                    frame, name = a.pop("frame"), a.pop("category")
                    extra = {"video_id": vid} if vid is not None else {}
                    yield {"id": ann_id, "image_id": first + frame, "category_id": categories[name], **a, **extra}

        def body(w: parts.JsonArrayWriter) -> None:
            w.key("info", info(run, "masklet export, COCO instance format"))
            w.key("licenses", [])
            w.key("categories", [{"id": i, "name": n, "supercategory": "object"} for n, i in categories.items()])
            w.array("videos", videos())
            w.array("images", images())
            w.array("annotations", annotations())

        parts.write_json(dest / FILE, body)
        parts.remove_parts(dest, self.name)
        return summary


FORMAT = CocoFormat()
