"""manifest build -> run -> status -> open_run on a mixed manifest (two videos, a frame folder, an image),
with the random-weight model: masks are checked against the metadata, not for quality."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import open_run
from pipeline.cli import main
from pipeline.samples import make_frame_folder, make_image, make_video


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, demo_config, fast_overrides):
    root = tmp_path_factory.mktemp("e2e")
    media = root / "media"
    make_video(media / "a_clip.mp4", frames=8, width=160, height=120, seed=1)
    make_video(media / "b_clip.avi", frames=7, width=128, height=96, seed=2)
    make_frame_folder(media / "c_frames", frames=5, width=144, height=112, ext="png", seed=3)
    make_image(media / "d_photo.jpg", width=200, height=150, seed=4)
    manifest = root / "manifest.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = root / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    return manifest, out


def test_every_item_done_and_status_reports_it(mixed_run, capsys):
    manifest, out = mixed_run
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 done, 0 failed, 0 pending of 4" in text
    assert "RANDOM WEIGHTS" in text


def test_frame_counts_and_resolutions_match_manifest(mixed_run):
    manifest, out = mixed_run
    res = open_run(out)
    man = {r["item_id"]: r for r in pq.read_table(manifest).to_pylist()}
    items = {r["item_id"]: r for r in res.items.to_pylist()}
    assert set(items) == set(man) and len(items) == 4
    kinds = sorted(r["kind"] for r in man.values())
    assert kinds == ["frames", "image", "video", "video"]
    for item_id, row in items.items():
        m = man[item_id]
        assert row["status"] == "done", row["error"]
        assert row["num_frames"] == m["num_frames"], item_id
        assert (row["width"], row["height"]) == (m["width"], m["height"])
        assert row["random_weights"] is True
        masks = res.masks(item_id)
        assert masks.shape == (row["num_objects"], m["num_frames"], m["height"], m["width"])
        assert row["num_objects"] >= 1, f"{item_id}: the demo settings should keep at least one object"


def test_parquet_rows_equal_stats_recomputed_from_zarr(mixed_run):
    _, out = mixed_run
    res = open_run(out)
    frames = res.frames
    checked = 0
    for item_id in res.item_ids():
        masks = res.masks(item_id)[:]
        rows = frames.filter(pc.equal(frames["item_id"], item_id)).to_pylist()
        n_obj, n_frames = masks.shape[:2]
        assert len(rows) == n_obj * n_frames, "one row per object per frame"
        for r in rows:
            m = masks[r["object_id"], r["frame"]]
            assert r["area"] == int(m.sum())
            if m.any():
                ys, xs = np.nonzero(m)
                box = (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            else:
                box = (0, 0, 0, 0)
            assert (r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]) == tuple(int(v) for v in box)
            checked += 1
        ml = res.masklets.filter(pc.equal(res.masklets["item_id"], item_id)).to_pylist()
        assert len(ml) == n_obj
        for row in ml:
            visible = [t for t in range(n_frames) if masks[row["object_id"], t].any()]
            assert row["frames_visible"] == len(visible)
            assert row["first_frame"] == (visible[0] if visible else -1)
            assert row["masklet_id"] == f"{item_id}/{row['object_id']}"
    assert checked > 0


def test_rerun_is_a_no_op_and_changed_config_is_refused(mixed_run, demo_config, fast_overrides, capsys):
    manifest, out = mixed_run
    before = open_run(out).frames.num_rows
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    assert open_run(out).frames.num_rows == before, "a rerun must add no rows"
    capsys.readouterr()
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides, "prompt.points_per_side=4"]) == 2
    assert "another config" in capsys.readouterr().err


def test_a_bad_item_is_a_failed_row_and_the_shard_goes_on(tmp_path, demo_config, fast_overrides, capsys):
    media = tmp_path / "media"
    make_image(media / "good.png", width=96, height=64, seed=5)
    (media / "fake.mp4").write_text("this is not a video")
    manifest = tmp_path / "m.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides, "plan.max_items_per_shard=4"]) == 0
    res = open_run(out)
    rows = {r["item_id"]: r for r in res.items.to_pylist()}
    assert rows["good.png"]["status"] == "done"
    assert rows["fake.mp4"]["status"] == "failed" and "fake.mp4" in rows["fake.mp4"]["error"]
    capsys.readouterr()
    main(["status", str(out)])
    text = capsys.readouterr().out
    assert "1 done, 1 failed, 0 pending of 2" in text and "fake.mp4:" in text
    with pytest.raises(KeyError, match="no committed masks"):
        res.masks("fake.mp4")
