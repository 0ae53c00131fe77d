"""Dataset layouts in `manifest build`: DAVIS and SA-V frame folders become items named as their sequences,
with their ground truth (`gt_path`, `gt_layout`) kept through the run's frozen manifest copy; the annotation
folders are not items."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import load_config
from pipeline.manifest import build_manifest, read_manifest, update_manifest
from pipeline.plan import load_run, prepare_run


def _frames(folder, n, step=1, ext="jpg", size=(32, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0]), 40 * (i % 5), np.uint8)).save(folder / f"{i * step:05d}.{ext}")


def davis_tree(root):
    for seq in ("bear", "dog"):
        _frames(root / "JPEGImages" / "480p" / seq, 4)
        _frames(root / "Annotations" / "480p" / seq, 4, ext="png")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("bear\ndog\n")
    return root


def sav_tree(root):
    _frames(root / "JPEGImages_24fps" / "sav_000001", 9)
    for obj in ("000", "001"):
        _frames(root / "Annotations_6fps" / "sav_000001" / obj, 3, step=4, ext="png")
    return root


def test_davis_root_gives_sequences_with_their_ground_truth(tmp_path):
    root = davis_tree(tmp_path / "DAVIS")
    table = build_manifest([root], tmp_path / "m.parquet", workers=1)
    rows = sorted(table.to_pylist(), key=lambda r: r["item_id"])
    assert [r["item_id"] for r in rows] == ["bear", "dog"]  # no annotation folder became an item
    assert all(r["kind"] == "frames" and r["num_frames"] == 4 for r in rows)
    assert rows[0]["gt_path"] == str(root / "Annotations" / "480p" / "bear")
    assert {r["gt_layout"] for r in rows} == {"davis"}


def test_sav_root_and_a_single_sequence(tmp_path):
    root = sav_tree(tmp_path / "sav_val")
    rows = build_manifest([root], tmp_path / "m.parquet", workers=1).to_pylist()
    assert [(r["item_id"], r["gt_layout"], r["num_frames"]) for r in rows] == [("sav_000001", "sav", 9)]
    assert rows[0]["gt_path"] == str(root / "Annotations_6fps" / "sav_000001")
    one = build_manifest([root / "JPEGImages_24fps" / "sav_000001"], tmp_path / "one.parquet", workers=1).to_pylist()
    assert (one[0]["item_id"], one[0]["gt_path"]) == ("sav_000001", rows[0]["gt_path"])


def test_plain_frame_folders_have_no_ground_truth(tmp_path):
    _frames(tmp_path / "clips" / "a", 3)
    rows = build_manifest([tmp_path / "clips"], tmp_path / "m.parquet", workers=1).to_pylist()
    assert (rows[0]["item_id"], rows[0]["gt_path"], rows[0]["gt_layout"]) == ("a", None, None)


def test_ground_truth_survives_reading_updating_and_the_frozen_copy(tmp_path):
    root = davis_tree(tmp_path / "DAVIS")
    build_manifest([root], tmp_path / "m.parquet", workers=1)
    items = read_manifest(tmp_path / "m.parquet")
    assert {it.item_id: it.gt_layout for it in items} == {"bear": "davis", "dog": "davis"}
    update = update_manifest([root], tmp_path / "m2.parquet", tmp_path / "m.parquet", workers=1)
    assert set(update.table.column("gt_layout").to_pylist()) == {"davis"}
    prepare_run(tmp_path / "run", items, load_config(None, ["plan.max_items_per_shard=1"]))
    plan = load_run(tmp_path / "run")
    frozen = {it.item_id: it for s in range(len(plan.spans)) for it in plan.shard_items(s).values()}
    assert frozen["dog"].gt_path == str(root / "Annotations" / "480p" / "dog")
    copy = pq.read_table(plan.paths.manifest, columns=["item_id", "gt_path", "gt_layout"]).to_pylist()
    assert {r["item_id"]: r["gt_layout"] for r in copy} == {"bear": "davis", "dog": "davis"}


def test_csv_manifest_may_name_ground_truth(tmp_path):
    root = davis_tree(tmp_path / "DAVIS")
    (tmp_path / "m.csv").write_text("path,gt_path,gt_layout\nDAVIS/JPEGImages/480p/bear,DAVIS/Annotations/480p/bear,davis\n")
    (item,) = read_manifest(tmp_path / "m.csv")
    assert (item.gt_path, item.gt_layout) == (str(root / "Annotations" / "480p" / "bear"), "davis")
