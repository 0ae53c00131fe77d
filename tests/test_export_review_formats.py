"""The YouTube-VIS, COCO and CVAT exports: every mask decodes back bit for bit through each format's own
reader (pycocotools, a loader that follows ytvos.py, CVAT's mask codec), on hand-made masks with known
overlaps, empty frames and a one-pixel object, and on a real random-weight run."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.export import coco, cvat, ytvis
from pipeline.export.base import RANDOM_WEIGHTS_LABEL
from tests.export_driver import export, handmade_item, items_from_run

H, W, T = 12, 16, 5


def _handmade_masks() -> np.ndarray:
    """Four objects on 5 frames: 0 and 1 overlap; 1 is absent on frames 0 and 3; 2 is one pixel on frame 2
    only (in the last column); 3 is never visible; frame 4 of object 0 touches every border."""
    m = np.zeros((4, T, H, W), bool)
    for t in range(T):
        m[0, t, 2:8, 3 + t:9 + t] = True
    m[0, 4] = True
    m[0, 4, 5, 5] = False  # a hole
    for t in (1, 2, 4):
        m[1, t, 5:11, 6:12] = True  # overlaps object 0
    m[2, 2, 7, W - 1] = True
    return m


@pytest.fixture
def handmade(tmp_path):
    masks = _handmade_masks()
    video = handmade_item(tmp_path / "run", "clip_one.mp4", masks, flags={1: ["flicker"], 3: ["lost"]},
                          stride=3)
    image = handmade_item(tmp_path / "run", "photo.jpg", masks[:2, 2:3], kind="image")
    return [video, image], {"clip_one.mp4": masks, "photo.jpg": masks[:2, 2:3]}


# ---------------------------------------------------------------------------------------------- YouTube-VIS

def load_ytvis(path):
    """A loader that follows youtubevos/cocoapi ytvos.py: index videos and annotations by id, annToRLE per
    frame (compressed RLE as is, uncompressed through frPyObjects), annToMask = decode; null = absent."""
    data = json.loads(path.read_text())
    vids = {v["id"]: v for v in data["videos"]}
    masks = {}
    for ann in data["annotations"]:
        v = vids[ann["video_id"]]
        assert len(ann["segmentations"]) == len(ann["areas"]) == len(ann["bboxes"]) == v["length"]
        per_frame = []
        for t, seg in enumerate(ann["segmentations"]):
            if seg is None:
                assert ann["areas"][t] is None and ann["bboxes"][t] is None
                per_frame.append(np.zeros((v["height"], v["width"]), bool))
                continue
            rle = mask_utils.frPyObjects(seg, v["height"], v["width"]) if isinstance(seg["counts"], list) else seg
            m = mask_utils.decode(rle).astype(bool)
            assert ann["areas"][t] == mask_utils.area(rle) == m.sum()
            assert ann["bboxes"][t] == list(mask_utils.toBbox(rle))
            per_frame.append(m)
        masks[(v["item_id"], ann["object_id"])] = np.stack(per_frame)
    return data, masks


def test_ytvis_round_trip_is_bit_exact_and_nulls_absent_frames(handmade, tmp_path):
    items, truth = handmade
    summaries, summary = export(ytvis.FORMAT, items, tmp_path / "out", tmp_path / "scratch")
    data, masks = load_ytvis(tmp_path / "out" / ytvis.FILE)
    for item_id, m in truth.items():
        for o in range(m.shape[0]):
            np.testing.assert_array_equal(masks[(item_id, o)], m[o])
    assert summary["videos"] == 2 and summary["annotations"] == 6
    assert not (tmp_path / "out" / ".parts").exists()
    video = data["videos"][0]
    assert video["id"] == 1 and video["length"] == T and video["width"] == W and video["height"] == H
    assert video["file_names"][:2] == ["clip_one.mp4/00000.jpg", "clip_one.mp4/00003.jpg"]
    anns = {a["object_id"]: a for a in data["annotations"] if a["video_id"] == 1}
    assert [s is None for s in anns[1]["segmentations"]] == [True, False, False, True, False]
    assert anns[2]["areas"] == [None, None, 1, None, None] and anns[2]["bboxes"][2] == [W - 1, 7, 1, 1]
    assert all(s is None for s in anns[3]["segmentations"])  # never visible: kept, all null
    assert anns[1]["flags"] == ["flicker"] and anns[1]["masklet_id"] == "clip_one.mp4/1"
    assert anns[1]["score"] == pytest.approx(0.6) and anns[1]["review_priority"] == 1.25
    assert len(anns[1]["object_scores"]) == T and "iou_mean" in anns[1]["signals"]
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 7))
    assert data["info"]["random_weights"] is True and data["info"]["warning"] == RANDOM_WEIGHTS_LABEL


# --------------------------------------------------------------------------------------------------- COCO

def test_coco_round_trip_through_pycocotools_COCO(handmade, tmp_path):
    from pycocotools.coco import COCO

    items, truth = handmade
    _, summary = export(coco.FORMAT, items, tmp_path / "out", tmp_path / "scratch")
    path = tmp_path / "out" / coco.FILE
    gt = COCO(str(path))
    data = json.loads(path.read_text())
    images = {(im["item_id"], im["frame"]): im for im in data["images"]}
    seen = set()
    for ann in gt.loadAnns(gt.getAnnIds()):
        im = gt.imgs[ann["image_id"]]
        m = truth[im["item_id"]][ann["object_id"], im["frame"]]
        np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), m)
        assert ann["area"] == m.sum() and ann["iscrowd"] == 0
        seen.add((im["item_id"], ann["object_id"], im["frame"]))
    expected = {(i, o, t) for i, m in truth.items() for o in range(m.shape[0]) for t in range(m.shape[1])
                if m[o, t].any()}
    assert seen == expected, "one annotation per visible masklet-frame, none for empty masks"
    assert summary["images"] == T + 1 and summary["annotations"] == len(expected)
    frame3 = images[("clip_one.mp4", 3)]
    assert frame3["frame_index"] == 9 and frame3["video_id"] == 1 and frame3["file_name"] == "clip_one.mp4/00009.jpg"
    assert images[("photo.jpg", 0)]["file_name"] == "photo.jpg" and "video_id" not in images[("photo.jpg", 0)]
    assert data["videos"] == [{"id": 1, "item_id": "clip_one.mp4", "path": "/media/clip_one.mp4",
                               "width": W, "height": H, "length": T, "source_frames": [0, 3, 6, 9, 12]}]
    assert data["info"]["warning"] == RANDOM_WEIGHTS_LABEL
    # The annotations as results: loadRes recomputes area and box from the RLE and must agree.
    res = gt.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in data["annotations"]])
    for a, r in zip(data["annotations"], res.loadAnns(res.getAnnIds())):
        assert r["area"] == a["area"] and list(r["bbox"]) == a["bbox"]
        np.testing.assert_array_equal(res.annToMask(r), gt.annToMask(a))


# --------------------------------------------------------------------------------------------------- CVAT

def load_cvat(path):
    """Reads "CVAT for images 1.1" the way CVAT's importer does (formats/cvat.py load_anno: a mask's points
    are rle + [left, top, left + width - 1, top + height - 1]) and decodes each with CVAT's own codec."""
    from cvat_sdk.masks import decode_mask

    root = ET.parse(path).getroot()
    out = {}
    for image in root.iter("image"):
        w, h = int(image.get("width")), int(image.get("height"))
        for m in image.iter("mask"):
            left, top = int(m.get("left")), int(m.get("top"))
            points = [int(v) for v in m.get("rle").split(",")]
            points += [left, top, left + int(m.get("width")) - 1, top + int(m.get("height")) - 1]
            attrs = {a.get("name"): a.text for a in m.iter("attribute")}
            out[(int(image.get("id")), attrs["masklet_id"])] = (decode_mask(points, image_width=w, image_height=h),
                                                                  attrs, m.attrib)
    return root, out


def test_cvat_masks_decode_bit_exact_with_cvat_codec(handmade, tmp_path):
    pytest.importorskip("cvat_sdk.masks", reason="CVAT's mask codec comes with the `test` extra (cvat-sdk[masks])")
    items, truth = handmade
    summaries, summary = export(cvat.FORMAT, items, tmp_path / "out", tmp_path / "scratch")
    root, shapes = load_cvat(tmp_path / "out" / "clip_one.mp4" / cvat.FILE)
    masks = truth["clip_one.mp4"]
    expected = {(3 * t, f"clip_one.mp4/{o}") for o in range(4) for t in range(T) if masks[o, t].any()}
    assert set(shapes) == expected
    for (frame, masklet_id), (decoded, attrs, attrib) in shapes.items():
        o = int(masklet_id.rsplit("/", 1)[1])
        np.testing.assert_array_equal(decoded, masks[o, frame // 3])
        assert attrib["label"] == "object" and attrib["source"] == "auto"
    assert shapes[(6, "clip_one.mp4/2")][2]["width"] == "1"  # the one-pixel object: a 1x1 box, rle "0,1"
    assert shapes[(6, "clip_one.mp4/2")][2]["rle"] == "0,1"
    assert shapes[(3, "clip_one.mp4/1")][1]["flags"] == "flicker"
    assert [im.get("name") for im in root.iter("image")] == [f"frame_{3 * t:06d}" for t in range(T)]
    assert RANDOM_WEIGHTS_LABEL in ET.tostring(root.find("meta"), encoding="unicode")
    assert summaries[0]["shapes"] == len(expected)
    _, photo = load_cvat(tmp_path / "out" / "photo.jpg" / cvat.FILE)
    assert {k[0] for k in photo} == {0}


# ------------------------------------------------------------------------------------ a real random-weight run

def test_every_format_round_trips_a_real_random_weight_run(small_run, tmp_path):
    from pycocotools.coco import COCO

    items = items_from_run(small_run)
    assert {i.item["kind"] for i in items} == {"video", "image"} and all(i.object_ids for i in items)
    truth = {i.item_id: np.stack([np.stack([i.mask(k, t) for t in range(i.num_frames)])
                                  for k in range(len(i.object_ids))]) for i in items}
    export(ytvis.FORMAT, items, tmp_path / "ytvis", tmp_path / "scratch")
    data, masks = load_ytvis(tmp_path / "ytvis" / ytvis.FILE)
    assert data["info"]["warning"] == RANDOM_WEIGHTS_LABEL
    for (item_id, o), m in masks.items():
        np.testing.assert_array_equal(m, truth[item_id][o])
    assert len(masks) == sum(len(i.object_ids) for i in items)

    export(coco.FORMAT, items, tmp_path / "coco", tmp_path / "scratch")
    gt = COCO(str(tmp_path / "coco" / coco.FILE))
    for ann in gt.loadAnns(gt.getAnnIds()):
        im = gt.imgs[ann["image_id"]]
        np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), truth[im["item_id"]][ann["object_id"], im["frame"]])
    assert len(gt.getAnnIds()) == sum(int(m.reshape(m.shape[0], m.shape[1], -1).any(-1).sum()) for m in truth.values())

    if pytest.importorskip("cvat_sdk.masks", reason="CVAT's mask codec comes with the `test` extra"):
        export(cvat.FORMAT, items, tmp_path / "cvat", tmp_path / "scratch")
        for i in items:
            _, shapes = load_cvat(tmp_path / "cvat" / i.item_id / cvat.FILE)
            for (frame, masklet_id), (decoded, _, _) in shapes.items():
                t = i.source_frames.index(frame)
                np.testing.assert_array_equal(decoded, truth[i.item_id][int(masklet_id.rsplit("/", 1)[1]), t])


# Datumaro (the library CVAT's server is built on) reads "CVAT for images 1.1" with masks. It is not in the
# `test` extra: datumaro 1.13.12 pins pillow~=12.0 and pyarrow~=25.0, which would downgrade the project's
# pillow 13 and pyarrow 26. The check runs in this interpreter when datumaro imports here, or in the one named
# by MASKLET_DATUMARO_PYTHON (e.g. a venv with only `pip install datumaro==1.13.12`).
_DATUMARO_CHECK = """
import json, sys
import numpy as np
from datumaro.components.dataset import Dataset
folder, truth, stride = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
ds = Dataset.import_from(folder, "cvat")
n = 0
for item in ds:
    t = item.attributes["frame"] // stride
    for ann in item.annotations:
        o = int(ann.attributes["masklet_id"].rsplit("/", 1)[1])
        assert (ann.image.astype(bool) == truth[o, t]).all(), (item.id, o)
        n += 1
print(json.dumps({"items": len(ds), "masks": n}))
"""


def _datumaro_python() -> str | None:
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("datumaro") is not None:
        return sys.executable
    return os.environ.get("MASKLET_DATUMARO_PYTHON") or None


@pytest.mark.skipif(_datumaro_python() is None, reason="datumaro is not installed here and MASKLET_DATUMARO_PYTHON "
                    "is not set (datumaro is left out of the `test` extra: it pins pillow~=12 and pyarrow~=25)")
def test_cvat_export_loads_in_datumaro_bit_exact(handmade, tmp_path):
    import subprocess

    items, truth = handmade
    export(cvat.FORMAT, items, tmp_path / "out", tmp_path / "scratch")
    folder = tmp_path / "out" / "clip_one.mp4"
    (folder / "images").mkdir()
    for t in range(T):  # datumaro's reader wants the frames' files beside the XML; their content is not read
        (folder / "images" / f"frame_{3 * t:06d}").touch()
    np.save(tmp_path / "truth.npy", truth["clip_one.mp4"])
    done = subprocess.run([_datumaro_python(), "-c", _DATUMARO_CHECK, str(folder), str(tmp_path / "truth.npy"), "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts == {"items": T, "masks": int(truth["clip_one.mp4"].reshape(4, T, -1).any(-1).sum())}


def test_a_trained_model_run_carries_no_warning(tmp_path):
    masks = _handmade_masks()[:2, :2]
    item = handmade_item(tmp_path / "run", "clip.mp4", masks, random_weights=False)
    for fmt, file in ((ytvis.FORMAT, ytvis.FILE), (coco.FORMAT, coco.FILE)):
        _, summary = export(fmt, [item], tmp_path / fmt.name, tmp_path / "scratch")
        meta = json.loads((tmp_path / fmt.name / file).read_text())["info"]
        assert meta["random_weights"] is False and "warning" not in meta and summary["random_weights"] is False
    export(cvat.FORMAT, [item], tmp_path / "cvat", tmp_path / "scratch")
    meta = ET.parse(tmp_path / "cvat" / "clip.mp4" / cvat.FILE).getroot().find("meta/masklet")
    assert meta.find("random_weights").text == "false" and meta.find("warning") is None


def test_labels_become_categories_in_every_format(tmp_path):
    item = handmade_item(tmp_path / "run", "clip.mp4", _handmade_masks()[:3, :3])
    item.extra["labels"] = {1: "dog"}
    for fmt, file in ((ytvis.FORMAT, ytvis.FILE), (coco.FORMAT, coco.FILE)):
        export(fmt, [item], tmp_path / fmt.name, tmp_path / "scratch")
        data = json.loads((tmp_path / fmt.name / file).read_text())
        assert [c["name"] for c in data["categories"]] == ["object", "dog"]
        assert {(a["object_id"], a["category_id"]) for a in data["annotations"]} >= {(0, 1), (1, 2)}
    export(cvat.FORMAT, [item], tmp_path / "cvat", tmp_path / "scratch")
    root = ET.parse(tmp_path / "cvat" / "clip.mp4" / cvat.FILE).getroot()
    assert sorted(n.text for n in root.findall("meta/task/labels/label/name")) == ["dog", "object"]
    assert {m.get("label") for m in root.iter("mask") if m.find("attribute[@name='object_id']").text == "1"} == {"dog"}


@pytest.mark.parametrize("module", [ytvis, coco], ids=lambda m: m.FORMAT.name)
def test_finish_killed_while_removing_parts_finishes_on_rerun(module, handmade, tmp_path):
    """A finish killed after publishing its file, with some parts already removed: the rerun keeps the
    (whole) file, returns the same summary and removes the rest."""
    from pipeline.export import parts

    fmt = module.FORMAT
    items, _ = handmade
    dest = tmp_path / "out"
    summaries, _ = export(fmt, items, dest, tmp_path / "scratch", finish=False)
    kept = {s["part"]: (dest / s["part"]).read_bytes() for s in summaries}
    first = fmt.finish(dest, summaries, items[0].run)
    merged = dest / module.FILE
    text = merged.read_bytes()
    (dest / summaries[1]["part"]).parent.mkdir(parents=True)
    (dest / summaries[1]["part"]).write_bytes(kept[summaries[1]["part"]])  # part 0 was removed, part 1 not yet
    assert parts.already_merged(dest, merged.name, fmt.name, summaries)
    assert fmt.finish(dest, summaries, items[0].run) == first
    assert merged.read_bytes() == text and not (dest / ".parts").exists()
    assert [p.name for p in dest.iterdir()] == [module.FILE]


# ------------------------------------------------------------------------- through `masklet export` (the runner)

@pytest.fixture(scope="module")
def runner_run(tmp_path_factory):
    from tests.exportrun import make_run

    return make_run(tmp_path_factory.mktemp("runner"))


@pytest.mark.parametrize("fmt", ["ytvis", "coco", "cvat"])
def test_masklet_export_writes_each_format_bit_exact(runner_run, tmp_path, fmt):
    """The CLI and runner (filters, staging, resume markers, finish) with these formats, read back by each
    format's own reader: every visible masklet-frame decodes to the run's Zarr masks."""
    from pipeline.cli import main

    out, truth = runner_run
    dest = tmp_path / fmt
    assert main(["export", out, "--format", fmt, "-o", str(dest)]) == 0
    meta = json.loads((dest / "export.json").read_text())
    assert meta["random_weights"] is True and meta["label"] == RANDOM_WEIGHTS_LABEL
    decoded = {}
    if fmt == "ytvis":
        _, masks = load_ytvis(dest / ytvis.FILE)
        for (item_id, o), m in masks.items():
            np.testing.assert_array_equal(m, truth[item_id][o], err_msg=f"{item_id}/{o}")
            decoded[(item_id, o)] = True
        expected = {(i, o) for i, m in truth.items() for o in range(m.shape[0])}
    elif fmt == "coco":
        from pycocotools.coco import COCO

        gt = COCO(str(dest / coco.FILE))
        for ann in gt.loadAnns(gt.getAnnIds()):
            im = gt.imgs[ann["image_id"]]
            np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), truth[im["item_id"]][ann["object_id"], im["frame"]])
            decoded[(im["item_id"], ann["object_id"], im["frame"])] = True
        expected = {(i, o, t) for i, m in truth.items() for o in range(m.shape[0]) for t in range(m.shape[1])
                    if m[o, t].any()}
    else:
        pytest.importorskip("cvat_sdk.masks", reason="CVAT's mask codec comes with the `test` extra (cvat-sdk[masks])")
        expected = set()
        for item_id, m in truth.items():
            source = {f: t for t, f in enumerate(_source_frames(out, item_id))}  # media frame -> Zarr frame
            _, shapes = load_cvat(dest / item_id / cvat.FILE)
            for (frame, masklet_id), (mask, _, _) in shapes.items():
                o = int(masklet_id.rsplit("/", 1)[1])
                np.testing.assert_array_equal(mask, m[o, source[frame]])
                decoded[(item_id, o, source[frame])] = True
            expected |= {(item_id, o, t) for o in range(m.shape[0]) for t in range(m.shape[1]) if m[o, t].any()}
    assert set(decoded) == expected


def _source_frames(out: str, item_id: str) -> list[int]:
    from pipeline import open_run

    return list(open_run(out).masks(item_id).attrs["source_frames"])
