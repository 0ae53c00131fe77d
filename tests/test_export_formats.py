"""The SA-V (JSON, PNG) and DAVIS PNG exports, read back by code written here from the formats' definitions
(sam2 sav_dataset/README.md and sav_utils.py, vos_inference.py's PNG writers, davis2017-evaluation): on a
hand-made run with known overlaps and gaps (exact cases) and on a real small run of the model."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from pipeline import open_run
from pipeline.export.davis import MAX_OBJECTS, TooManyObjects
from pipeline.export.filters import ExportFilter
from pipeline.export.runner import export_run
from tests.exportrun import make_run


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("handmade"))


def _source_frames(out: str, item_id: str) -> list[int]:
    return list(open_run(out).masks(item_id).attrs["source_frames"])


# --- sav-json ----------------------------------------------------------------------------------------------------

def _expected_fields(masks: np.ndarray) -> dict:
    """SA-V's derived fields recomputed from the masks, independently of pipeline/export/sav.py."""
    objects, frames, h, w = masks.shape
    out = {"abs": [], "rel": [], "bucket": [], "changes": [], "first": []}
    for o in range(objects):
        areas = [int(masks[o, t].sum()) for t in range(frames)]
        seen = [a for a in areas if a > 0]
        size = sum(seen) / len(seen) if seen else 0.0
        out["abs"].append(size)
        out["rel"].append(size / (h * w))
        out["bucket"].append("large" if size >= 9216 else "medium" if size >= 1024 else "small")
        vis = np.array([a > 0 for a in areas], np.int8)
        start = int(np.argmax(vis)) if vis.any() else frames
        out["changes"].append(int(np.abs(np.diff(vis[start:])).sum()) if vis.any() else 0)
        out["first"].append(start if vis.any() else 0)  # never visible: the prompt frame (0 in the hand-made run)
    return out


def read_sav_annotation(folder: Path, video_id: str, frames: list[np.ndarray] | None = None) -> list[list[np.ndarray]]:
    """A reader that takes the steps sam2's SAVDataset takes: load `{video_id}_auto.json`, and for an annotated
    frame index i (valid only below the number of frames kept after subsampling the video), decode every RLE
    of `masklet[i]` with pycocotools and threshold at > 0. Returns masks[i][object]."""
    annot = json.loads((folder / f"{video_id}_auto.json").read_text())
    out = []
    for i in range(len(annot["masklet"])):
        if frames is not None:
            assert i < len(frames), "an annotated frame past the subsampled video"
        masks = [mask_util.decode(rle) > 0 for rle in annot["masklet"][i]]
        if frames is not None:
            assert all(m.shape == frames[i].shape[:2] for m in masks)
        out.append(masks)
    return out


def test_sav_json_holds_every_mask_bit_for_bit_and_every_derived_field(handmade, tmp_path):
    out, masks = handmade
    dest = tmp_path / "sav"
    export_run(out, "sav-json", dest)
    for item_id, m in masks.items():
        objects, frames, h, w = m.shape
        annot = json.loads((dest / f"{item_id}_auto.json").read_text())
        assert len(annot["masklet"]) == frames and all(len(row) == objects for row in annot["masklet"])
        for t in range(frames):
            for o in range(objects):
                rle = annot["masklet"][t][o]
                assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
                np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), m[o, t])
        decoded = read_sav_annotation(dest, item_id)
        assert all(np.array_equal(decoded[t][o], m[o, t]) for t in range(frames) for o in range(objects))
        want = _expected_fields(m)
        assert annot["masklet_size_abs"] == pytest.approx(want["abs"])
        assert annot["masklet_size_rel"] == pytest.approx(want["rel"])
        assert annot["masklet_size_bucket"] == want["bucket"]
        assert annot["masklet_visibility_changes"] == want["changes"]
        assert annot["masklet_first_appeared_frame"] == want["first"]
        assert annot["masklet_id"] == list(range(objects))
        assert annot["masklet_num"] == objects
        assert annot["masklet_frame_count"] == [frames] * objects
        assert annot["masklet_type"] == ["auto"] * objects
        assert annot["masklet_edited_frame_count"] == [0] * objects
        assert annot["masklet_run_id"] == [f"{item_id}/{o}" for o in range(objects)]
        assert annot["annotated_source_frames"] == _source_frames(out, item_id)
        assert annot["video_id"] == item_id and annot["video_height"] == float(h) and annot["video_width"] == float(w)
        assert annot["video_resolution"] == float(h * w)
        assert len(annot["masklet_stability_score"]) == frames
        assert "RANDOM WEIGHTS" in annot["export_info"]["label"]
    a = json.loads((dest / "a.mp4_auto.json").read_text())
    assert a["masklet_visibility_changes"] == [0, 2, 1] and a["masklet_first_appeared_frame"] == [0, 0, 1]
    assert a["video_frame_count"] == 12.0 and a["video_duration"] == pytest.approx(0.5)
    assert a["masklet_stability_score"][0] == pytest.approx([0.5, 0.6, 0.7]) and a["masklet_stability_score"][1] == [None] * 3


def test_sav_json_of_a_real_run_is_read_by_a_sav_style_reader(small_run, tmp_path):
    dest = tmp_path / "sav"
    export_run(small_run, "sav-json", dest)
    run = open_run(small_run)
    for row in run.items.to_pylist():
        arr = run.masks(row["item_id"])[:]
        if row["kind"] == "video":
            capture = cv2.VideoCapture(row["path"])
            video = []
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                video.append(frame)
            frames = video[::row["stride"]]  # SAVDataset.read_frames: every annot_sample_rate-th frame
        else:
            frames = [cv2.imread(row["path"])]
        decoded = read_sav_annotation(dest, row["item_id"], frames)
        assert len(decoded) == arr.shape[1]
        for t in range(arr.shape[1]):
            for o in range(arr.shape[0]):
                np.testing.assert_array_equal(decoded[t][o], arr[o, t])


# --- sav-png -------------------------------------------------------------------------------------------------------

def _read_sav_png(dest: Path, item_id: str, object_ids: list[int], source_frames: list[int]) -> np.ndarray:
    planes = []
    for o in object_ids:
        files = sorted((dest / item_id / f"{o:03d}").iterdir())
        assert [int(p.stem) for p in files] == source_frames
        stack = []
        for p in files:
            a = np.array(Image.open(p))
            assert a.ndim == 2 and len(np.unique(a)) <= 2  # what sav_evaluator asserts
            stack.append(a > 0)
        planes.append(np.stack(stack))
    return np.stack(planes) if planes else np.zeros((0,), bool)


def test_sav_png_reads_back_bit_for_bit(handmade, tmp_path):
    out, masks = handmade
    dest = tmp_path / "png"
    export_run(out, "sav-png", dest)
    for item_id, m in masks.items():
        got = _read_sav_png(dest, item_id, list(range(m.shape[0])), _source_frames(out, item_id))
        if m.shape[0]:
            np.testing.assert_array_equal(got, m)
        else:
            assert list((dest / item_id).iterdir()) == []
    image = Image.open(dest / "a.mp4" / "001" / "00004.png")
    assert image.mode == "P" and "RANDOM WEIGHTS" in image.info["masklet"]


def test_sav_png_of_a_real_run_equals_its_zarr_masks(small_run, tmp_path):
    dest = tmp_path / "png"
    export_run(small_run, "sav-png", dest)
    run = open_run(small_run)
    for item_id in run.item_ids():
        arr = run.masks(item_id)[:]
        got = _read_sav_png(dest, item_id, list(range(arr.shape[0])), _source_frames(small_run, item_id))
        np.testing.assert_array_equal(got, arr)


def test_a_filter_keeps_object_folders_named_by_the_runs_object_ids(handmade, tmp_path):
    out, masks = handmade
    dest = tmp_path / "png"
    export_run(out, "sav-png", dest, ExportFilter(no_flags=("tiny",)))
    assert sorted(p.name for p in (dest / "a.mp4").iterdir()) == ["000", "001"]
    assert sorted(p.name for p in (dest / "b.mp4").iterdir()) == ["001"]  # 0 is tiny; 1 (never visible) is not
    got = _read_sav_png(dest, "a.mp4", [0, 1], _source_frames(out, "a.mp4"))
    np.testing.assert_array_equal(got, masks["a.mp4"][:2])


# --- davis-png -----------------------------------------------------------------------------------------------------

def _voc_colormap() -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map as davis2017's color_map() defines it, written here from its definition."""
    def bit(value: int, i: int) -> int:
        return (value >> i) & 1

    colors = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= bit(c, 0) << (7 - j)
            g |= bit(c, 1) << (7 - j)
            b |= bit(c, 2) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


def _lower_id_wins(m: np.ndarray) -> tuple[np.ndarray, int]:
    """(objects, frames, H, W) -> ids per pixel, the first object (lowest id) covering it; and pixels lost."""
    objects, frames = m.shape[:2]
    ids = np.zeros(m.shape[1:], np.uint8)
    for o in range(objects):
        ids[(ids == 0) & m[o]] = o + 1
    count = m.sum(axis=0) if objects else np.zeros(m.shape[1:], int)
    return ids, int(np.clip(count - 1, 0, None).sum())


def test_davis_png_applies_the_lower_id_rule_and_counts_what_it_overwrote(handmade, tmp_path):
    out, masks = handmade
    dest = tmp_path / "davis"
    record = export_run(out, "davis-png", dest)
    total = 0
    colors = _voc_colormap()
    assert colors[1] == (128, 0, 0) and colors[2] == (0, 128, 0) and colors[255] == (224, 224, 192)
    for item_id, m in masks.items():
        want, lost = _lower_id_wins(m)
        total += lost
        files = sorted((dest / item_id).iterdir())
        assert [int(p.stem) for p in files] == _source_frames(out, item_id)
        for t, p in enumerate(files):
            image = Image.open(p)
            assert image.mode == "P"
            palette = image.getpalette()
            assert [tuple(palette[i:i + 3]) for i in range(0, 768, 3)] == colors
            np.testing.assert_array_equal(np.array(image), want[t])
        done = json.loads((dest / ".masklet-export" / "done" / f"{item_id}.json").read_text())
        assert done["summary"]["overwritten_pixels"] == lost
    assert total > 0
    assert record["summary"]["overwritten_pixels"] == total
    assert record["summary"]["overwritten_pixels_by_item"] == {"a.mp4": total}
    ids = [json.loads(line) for line in (dest / "objects.jsonl").read_text().splitlines()]
    assert ids[0] == {"video": "a.mp4", "ids": {"1": "a.mp4/0", "2": "a.mp4/1", "3": "a.mp4/2"}}


def test_davis_png_refuses_more_than_254_objects_naming_the_item():
    from pipeline.export.base import ItemExport, RunInfo
    from pipeline.export.davis import FORMAT

    item = ItemExport("big.mp4", {}, list(range(MAX_OBJECTS + 1)), None, None, [0], 4, 4,
                      RunInfo("r", "m", False, "f"), lambda k, t: np.zeros((4, 4), bool))
    with pytest.raises(TooManyObjects, match="item big.mp4: 255 masklets.*sav-png"):
        FORMAT.write_item(item, Path("/nonexistent"))
