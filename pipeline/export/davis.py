"""`davis-png`: DAVIS 2017 results layout, `{video}/{frame:05d}.png`, one palette PNG per frame (the DAVIS
palette) holding object ids 1..N (0 background), N <= 254 (255 is DAVIS's void label). Frame files are named by
the frame's index in the media, as `sav-png`; every decoded frame gets a file, empty or not.

One PNG per frame cannot hold overlapping objects. Overlaps are resolved by SAM 2's own rule: vos_inference's
put_per_obj_mask paints object ids in descending order, so where masks still overlap the lowest id wins (the
predictor's non-overlap constraint keeps the argmax object; on our stored binary masks the id order is all
there is). The pixels an object loses that way are counted, per item and in total (the item's summary and
export.json `summary.overwritten_pixels`): sum over frames of (sum of the objects' areas - area of their union).

Id k + 1 is the item's k-th selected masklet in object_id order; `objects.jsonl` at DEST (one line per item:
{"video", "ids": {"1": "<item_id>/<object_id>", ...}}) maps them back. It is not written in the video folders:
sav_evaluator takes a video folder holding anything but *.png for the SA-V layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.png import write_palette_png
from pipeline.store.atomic import write_atomic

MAX_OBJECTS = 254
OBJECTS_FILE = "objects.jsonl"


class TooManyObjects(ValueError):
    """An item with more masklets than a DAVIS PNG has ids."""


def paint(masks: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Objects' (H, W) bool masks -> uint8 ids (k + 1, lower id wins an overlap) and the pixels overwritten."""
    canvas = np.zeros(shape, np.uint8)
    total = 0
    for k in range(len(masks) - 1, -1, -1):  # descending, as put_per_obj_mask: the lowest id is painted last
        canvas[masks[k]] = k + 1
        total += int(masks[k].sum())
    return canvas, total - int(np.count_nonzero(canvas))


class DavisPng:
    name = "davis-png"
    description = ("DAVIS layout: {video}/{frame:05d}.png, palette PNG of ids 1..N (<= 254); overlaps resolved "
                   "as SAM 2 does (lower id wins), overwritten pixels counted")

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        n = len(item.object_ids)
        if n > MAX_OBJECTS:
            raise TooManyObjects(
                f"item {item.item_id}: {n} masklets, but a DAVIS PNG holds ids 1..{MAX_OBJECTS} (255 is void); "
                f"keep fewer with a filter (--min-frames-visible, --min-area-share, --no-flag) or export "
                f"--format sav-png, which keeps every object")
        video = stage / item.item_id
        video.mkdir()
        overwritten = 0
        for t, source_frame in enumerate(item.source_frames):
            masks = [np.asarray(item.mask(k, t), dtype=bool) for k in range(n)]
            canvas, lost = paint(masks, (item.height, item.width))
            overwritten += lost
            write_palette_png(video / f"{source_frame:05d}.png", canvas, item.run.label)
        return {"item_id": item.item_id, "masklets": n, "frames": item.num_frames, "overwritten_pixels": overwritten,
                "ids": {str(k + 1): r for k, r in enumerate(item.masklets["masklet_id"].to_pylist())}}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        def write(path: Path) -> None:
            with open(path, "w") as f:
                for i in items:
                    f.write(json.dumps({"video": i["item_id"], "ids": i["ids"]}) + "\n")

        write_atomic(Path(dest) / OBJECTS_FILE, write)
        return {"overwritten_pixels": sum(i["overwritten_pixels"] for i in items),
                "overwritten_pixels_by_item": {i["item_id"]: i["overwritten_pixels"] for i in items
                                               if i["overwritten_pixels"]},
                "objects_file": OBJECTS_FILE}


FORMAT = DavisPng()
