"""CVAT XML ("CVAT for images 1.1"): one `annotations.xml` per item, under the item's id, with one `mask`
shape per visible masklet-frame carrying the masklet's identity in a `masklet_id` attribute.

Why not tracks: CVAT has no mask tracks. Its XML importer (cvat-ai/cvat, cvat/apps/dataset_manager/formats/
cvat.py, `load_anno`, the `el.tag == "track"` branch: "convert mask tracks to shapes because mask track are
not supported") turns a mask `<track>` into one shape built from `track.shapes[0]` only, so every frame but
the first would be dropped. Per-frame shapes keep every frame; the attribute keeps identity, and a reviewed
task exported again as "CVAT for images 1.1" maps back by `masklet_id`.

Why one file per item: CVAT imports annotations into one task, and a video is one task. Frames are named as
CVAT names a video task's frames (`frame_<media index, 6 digits>`, image id = that index), so the file
uploads into a task made from the same video with frame step 1 (or the item's stride, whose frames are
the ones listed); an image item is one image named by its file name.

Mask encoding (pipeline/export/rle.py): the mask cropped to its tight box (left, top, width, height) and the
row-major run lengths of that crop, background first, as CVAT's importer and cvat_sdk.masks read them.
Empty masks get no shape. Kept as attributes (text, so CVAT needs no ranges for them): masklet_id,
object_id, predicted_iou, stability_score, review_priority, flags (comma-separated), object_score.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import XMLGenerator

from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.rle import cvat_rle, tight_box
from pipeline.export.ytvis import object_scores

FILE = "annotations.xml"
ATTRIBUTES = ("masklet_id", "object_id", "predicted_iou", "stability_score", "review_priority", "flags",
              "object_score")


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if value == value else ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class _Writer:
    """Indented XML, element by element (an item's shapes are written as they are encoded)."""

    def __init__(self, f):
        self.x = XMLGenerator(f, "utf-8")
        self.level = 0

    def open(self, tag: str, attrs: dict | None = None) -> None:
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.startElement(tag, {k: _text(v) for k, v in (attrs or {}).items()})
        self.level += 1

    def close(self, tag: str) -> None:
        self.level -= 1
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.endElement(tag)

    def leaf(self, tag: str, text, attrs: dict | None = None) -> None:
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.startElement(tag, attrs or {})
        self.x.characters(_text(text))
        self.x.endElement(tag)


def _meta(w: _Writer, item: ItemExport, labels: list[str]) -> None:
    w.open("meta")
    w.open("task")
    w.leaf("name", item.item_id)
    w.leaf("size", item.num_frames)
    w.leaf("mode", "annotation")
    w.open("labels")
    for label in labels:
        w.open("label")
        w.leaf("name", label)
        w.leaf("type", "mask")
        w.open("attributes")
        for name in ATTRIBUTES:
            w.open("attribute")
            w.leaf("name", name)
            w.leaf("mutable", "False")
            w.leaf("input_type", "text")
            w.leaf("default_value", "")
            w.leaf("values", "")
            w.close("attribute")
        w.close("attributes")
        w.close("label")
    w.close("labels")
    w.open("original_size")
    w.leaf("width", item.width)
    w.leaf("height", item.height)
    w.close("original_size")
    w.close("task")
    # Readers of the format skip elements of <meta> they do not know (CVAT's importer does not read <meta>).
    w.open("masklet")
    w.leaf("model", item.run.model)
    w.leaf("random_weights", "true" if item.run.random_weights else "false")
    if item.run.label:
        w.leaf("warning", item.run.label)
    w.leaf("run", item.run.root)
    w.leaf("fingerprint", item.run.fingerprint)
    w.leaf("source_frames", ",".join(str(s) for s in item.source_frames))
    w.close("masklet")
    w.close("meta")


@dataclass(frozen=True)
class CvatFormat:
    name: str = "cvat"
    description: str = "CVAT for images 1.1 XML per item: a mask shape per masklet-frame with a masklet_id attribute"

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        names = item.extra.get("labels") or {}
        label_of = {o: names.get(o, "object") for o in item.object_ids}
        scores = object_scores(item)
        rows = item.masklets.to_pylist()
        is_video = item.item.get("kind") != "image"
        path = stage / item.item_id / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # Frame-major (CVAT's <image> holds all of a frame's shapes): one frame's masks read at a time.
        shapes = 0
        with open(path, "w", encoding="utf-8") as f:
            w = _Writer(f)
            w.x.startDocument()
            w.open("annotations")
            w.leaf("version", "1.1")
            _meta(w, item, sorted(set(label_of.values())))
            for t in range(item.num_frames):
                src = item.source_frames[t]
                name = f"frame_{src:06d}" if is_video else Path(item.item.get("path") or item.item_id).name
                w.open("image", {"id": src if is_video else 0, "name": name, "width": item.width,
                                 "height": item.height})
                for k, (object_id, row) in enumerate(zip(item.object_ids, rows)):
                    m = item.mask(k, t)
                    box = tight_box(m)
                    if box is None:
                        continue
                    left, top, width, height = box
                    w.open("mask", {"label": label_of[object_id], "source": "auto", "occluded": 0,
                                    "rle": ", ".join(str(r) for r in cvat_rle(m, box)).replace(" ", ""),
                                    "left": left, "top": top, "width": width, "height": height, "z_order": 0})
                    values = {**row, "object_score": scores.get((object_id, t))}
                    for attr in ATTRIBUTES:
                        w.leaf("attribute", values.get(attr), {"name": attr})
                    w.close("mask")
                    shapes += 1
                w.close("image")
            w.close("annotations")
            w.x.ignorableWhitespace("\n")
            w.x.endDocument()
        return {"item_id": item.item_id, "file": f"{item.item_id}/{FILE}", "shapes": shapes,
                "frames": item.num_frames}

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        return {"files": len(items), "shapes": sum(s["shapes"] for s in items), "random_weights": run.random_weights}


FORMAT = CvatFormat()
