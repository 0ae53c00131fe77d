"""Manifests: discovery, stable ids, probing failures as rows, reading hand-written lists."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import pyarrow.parquet as pq
import pytest

from pipeline import samples
from pipeline.manifest import (
    MANIFEST_SCHEMA,
    MAX_ID_LENGTH,
    ManifestWarning,
    assign_item_ids,
    build_manifest,
    discover,
    item_id_for,
    manifest_fingerprint,
    probe,
    read_manifest,
)
from pipeline.stages.decode import open_frames

SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def _small_video(path, frames=4):
    return samples.make_video(path, frames=frames, width=64, height=48)


def _small_frames(path, frames=3):
    return samples.make_frame_folder(path, frames=frames, width=64, height=48)


@pytest.fixture
def dataset(tmp_path):
    """A tree with every kind and the discovery corner cases."""
    root = tmp_path / "data"
    _small_video(root / "clip.mp4")
    _small_video(root / "nested" / "deeper" / "CLIP2.MKV")  # upper-case extension
    _small_frames(root / "davis" / "bear")
    _small_frames(root / "davis" / "blackswan")
    samples.make_image(root / "photos" / "only.jpg", 64, 48)  # a lone image: an image, not frames
    _small_video(root / "mixed" / "v.avi")
    samples.make_image(root / "mixed" / "a.png", 64, 48)  # images beside a video: single images
    samples.make_image(root / "mixed" / "b.png", 64, 48)
    (root / "mixed" / "notes.txt").write_text("not media")
    (root / "davis" / "bear" / "._00000.jpg").write_bytes(b"AppleDouble, not a JPEG")  # hidden: ignored
    (root / ".cache").mkdir()
    _small_video(root / ".cache" / "hidden.mp4")
    return root


def _relative(found, root):
    return [(os.path.relpath(p, root), kind) for p, _, kind in found]


def test_discover_each_kind(dataset):
    found = discover([str(dataset)])
    assert _relative(found, dataset) == [
        ("clip.mp4", "video"),
        ("davis/bear", "frames"),
        ("davis/blackswan", "frames"),
        ("mixed/a.png", "image"),
        ("mixed/b.png", "image"),
        ("mixed/v.avi", "video"),
        ("nested/deeper/CLIP2.MKV", "video"),
        ("photos/only.jpg", "image"),
    ]
    assert all(root == str(dataset) and os.path.isabs(path) for path, root, _ in found)


def test_discover_files_globs_and_frame_folders_given_directly(dataset):
    direct_file = discover([str(dataset / "clip.mp4")])
    assert direct_file == [(str(dataset / "clip.mp4"), str(dataset), "video")]
    # A frame folder named itself is one item, rooted at its parent so its id is its name.
    bear = discover([str(dataset / "davis" / "bear")])
    assert bear == [(str(dataset / "davis" / "bear"), str(dataset / "davis"), "frames")]
    # Globs: matches are items (files) or scanned (folders), rooted at the fixed prefix.
    globbed = discover([str(dataset / "davis" / "*")])
    assert [(os.path.basename(p), r, k) for p, r, k in globbed] == [
        ("bear", str(dataset / "davis"), "frames"),
        ("blackswan", str(dataset / "davis"), "frames"),
    ]
    frames_as_images = discover([str(dataset / "davis" / "bear" / "*.jpg")])
    assert [k for _, _, k in frames_as_images] == ["image"] * 3
    recursive = discover([str(dataset / "**" / "*.mp4")])
    assert [os.path.basename(p) for p, _, _ in recursive] == ["clip.mp4"]


def test_discover_bad_inputs_raise_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        discover([str(tmp_path / "no_such_dir")])
    with pytest.raises(ValueError, match=r"matched nothing"):
        discover([str(tmp_path / "*.mp4")])


def test_build_manifest_writes_the_explicit_schema(dataset, tmp_path):
    out = tmp_path / "m" / "manifest.parquet"
    table = build_manifest([str(dataset)], str(out), workers=4)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert pq.read_schema(out).remove_metadata().equals(MANIFEST_SCHEMA)
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert set(rows) == {
        "clip.mp4", "davis__bear", "davis__blackswan", "mixed__a.png", "mixed__b.png", "mixed__v.avi",
        "nested__deeper__CLIP2.MKV", "photos__only.jpg",
    }
    clip = rows["clip.mp4"]
    assert (clip["kind"], clip["num_frames"], clip["width"], clip["height"]) == ("video", 4, 64, 48)
    assert clip["codec"] in ("h264", "mpeg4")
    assert clip["fps"] == pytest.approx(24) and clip["bytes"] == os.path.getsize(dataset / "clip.mp4")
    assert rows["nested__deeper__CLIP2.MKV"]["num_frames"] == 4  # Matroska has no count: demuxed
    bear = rows["davis__bear"]
    assert (bear["kind"], bear["num_frames"], bear["width"], bear["height"], bear["codec"], bear["fps"]) == (
        "frames", 3, 64, 48, "jpeg", None,
    )
    assert rows["photos__only.jpg"]["num_frames"] == 1
    assert all(r["error"] is None for r in rows.values())
    assert not [name for name in os.listdir(out.parent) if name != "manifest.parquet"]  # no temp files left

    items = read_manifest(str(out))
    assert [i.item_id for i in items] == table.column("item_id").to_pylist()
    assert items[0].path == str(dataset / "clip.mp4")


def test_ids_are_stable_across_rebuilds_and_additions(dataset, tmp_path):
    first = build_manifest([str(dataset)], str(tmp_path / "a.parquet"), workers=1)
    second = build_manifest([str(dataset)], str(tmp_path / "b.parquet"), workers=8)
    assert first.equals(second)
    assert manifest_fingerprint(read_manifest(str(tmp_path / "a.parquet"))) == manifest_fingerprint(
        read_manifest(str(tmp_path / "b.parquet"))
    )
    # A new file whose id collides with none ('clip .mp4' is 'clip_.mp4') leaves the existing ids alone; one
    # that collides can rename an existing item here: tests/test_manifest_update.py covers that and --update.
    shutil.copy(dataset / "clip.mp4", dataset / "clip .mp4")
    shutil.copy(dataset / "clip.mp4", dataset / "new.mp4")
    third = build_manifest([str(dataset)], str(tmp_path / "c.parquet"))
    before = set(first.column("item_id").to_pylist())
    after = set(third.column("item_id").to_pylist())
    assert before <= after and len(after) == len(before) + 2


def test_id_rules():
    assert item_id_for("/r/a b/c.mp4", "/r") == "a_b__c.mp4"
    assert item_id_for("/r/.hidden.mp4", "/r") == "_hidden.mp4"
    assert item_id_for("/r/..x", "/r") == "__x"
    assert item_id_for("/r/café.mp4", "/r") == "cafe.mp4"
    assert item_id_for("/r/视频.mp4", "/r") == "__.mp4"
    assert item_id_for("/r/bear", "/r/bear") == "bear"  # an item that is its own root
    with pytest.raises(ValueError, match="not under its root"):
        item_id_for("/elsewhere/a.mp4", "/r")


def test_id_collisions_get_hash_suffixes_deterministically():
    entries = [("/r/a b.mp4", "/r"), ("/r/a_b.mp4", "/r"), ("/r/a?b.mp4", "/r"), ("/r/A_B.mp4", "/r")]
    ids = assign_item_ids(entries)
    assert ids == assign_item_ids(entries)  # deterministic
    assert len({i.lower() for i in ids}) == 4  # unique, even ignoring case
    assert all(SAFE_ID.match(i) for i in ids)
    # Exact names that differ only in case both get hashes; the lossy ones too.
    assert all(re.fullmatch(r"a_b\.mp4-[0-9a-f]{8}", i, re.I) for i in ids)
    # With one exact name in the group, it keeps its plain id.
    assert assign_item_ids([("/r/a b.mp4", "/r"), ("/r/a_b.mp4", "/r")])[1] == "a_b.mp4"
    # Same relative path under two roots: the absolute path tells them apart.
    twins = assign_item_ids([("/x/clip.mp4", "/x"), ("/y/clip.mp4", "/y")])
    assert twins[0] != twins[1] and all(t.startswith("clip.mp4-") for t in twins)
    with pytest.raises(ValueError, match="listed twice"):
        assign_item_ids([("/x/clip.mp4", "/x"), ("/x/clip.mp4", "/x")])


def test_long_names_are_bounded_and_unique(tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    stem = "x" * 200
    a = _small_video(root / f"{stem}_one.mp4", frames=2)
    shutil.copy(a, root / f"{stem}_two.mp4")
    table = build_manifest([str(root)], str(tmp_path / "m.parquet"))
    ids = table.column("item_id").to_pylist()
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(len(i) <= MAX_ID_LENGTH and SAFE_ID.match(i) and re.search(r"-[0-9a-f]{8}$", i) for i in ids)
    assert table.column("error").to_pylist() == [None, None]


def test_non_utf8_names_round_trip(tmp_path):
    root = os.fsencode(str(tmp_path / "raw"))
    os.mkdir(root)
    video = os.path.join(root, b"clip\xff\xfe.mp4")
    os.rename(os.fsencode(_small_video(tmp_path / "v.mp4", frames=3)), video)
    frames = os.path.join(root, b"frames\xe9")
    os.rename(os.fsencode(_small_frames(tmp_path / "f", frames=2)), frames)

    out = tmp_path / "m.parquet"
    table = build_manifest([root], str(out))
    rows = table.to_pylist()
    assert [r["error"] for r in rows] == [None, None]
    assert all(SAFE_ID.match(r["item_id"]) for r in rows)
    assert {r["path_bytes"] for r in rows} == {video, frames}  # exact names kept
    assert all("\\x" in r["path"] for r in rows)  # readable stand-in in the text column

    items = read_manifest(str(out))
    assert {os.fsencode(i.path) for i in items} == {video, frames}
    rebuilt = build_manifest([root], str(tmp_path / "again.parquet"))
    assert rebuilt.column("item_id").to_pylist() == table.column("item_id").to_pylist()
    for item in items:
        assert len(list(open_frames(item))) == item.num_frames


def test_probe_failures_become_rows(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    clean = _small_video(tmp_path / "clean.mp4", frames=10)
    data = open(clean, "rb").read()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the mp4 index is at the end: gone
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    table = build_manifest([str(root)], str(tmp_path / "m.parquet"))
    errors = dict(zip(table.column("item_id").to_pylist(), table.column("error").to_pylist()))
    assert set(errors) == {"empty.mp4", "text.mp4", "truncated.mp4", "broken.png"}
    assert "empty file (0 bytes)" in errors["empty.mp4"]
    assert "not a readable video" in errors["text.mp4"]
    assert "not a readable video" in errors["truncated.mp4"]
    assert "cannot probe image" in errors["broken.png"]
    for item_id, error in errors.items():
        assert str(root / item_id) in error  # each message names its file

    missing = probe(str(tmp_path / "gone.mp4"), "video")
    assert missing.error == f"{tmp_path / 'gone.mp4'}: file not found"
    assert "no frames" in probe(str(tmp_path), "frames").error  # a folder without frames
    assert "is a folder" in probe(str(tmp_path), "video").error


def test_csv_manifest_with_only_paths(tmp_path):
    media = tmp_path / "media"
    _small_video(media / "a.mp4")
    _small_frames(media / "seq")
    samples.make_image(media / "img.png", 64, 48)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nmedia/a.mp4\nmedia/seq\n media/img.png \nmedia/missing.mp4\n")
    items = read_manifest(str(manifest), workers=4)
    assert [(i.item_id, i.kind) for i in items] == [
        ("media__a.mp4", "video"),
        ("media__seq", "frames"),
        ("media__img.png", "image"),
        ("media__missing.mp4", "video"),
    ]
    assert [i.num_frames for i in items] == [4, 3, 1, 0]
    assert items[0].path == str(media / "a.mp4") and items[0].width == 64
    assert items[3].error.endswith("file not found")


def test_jsonl_manifest_with_absolute_paths_and_given_ids(tmp_path):
    media = tmp_path / "media"
    _small_video(media / "x" / "a.webm")
    _small_video(media / "y" / "b.mp4")
    manifest = tmp_path / "elsewhere" / "list.jsonl"
    manifest.parent.mkdir()
    lines = [
        {"path": str(media / "x" / "a.webm")},
        {"path": str(media / "y" / "b.mp4"), "item_id": "custom-b"},
        {"path": str(media / "x" / "a.webm"), "item_id": "dup"},  # same path again: dropped
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    with pytest.warns(ManifestWarning, match="more than once"):
        items = read_manifest(str(manifest))
    # Absolute paths are named relative to their common parent.
    assert [i.item_id for i in items] == ["x__a.webm", "custom-b"]
    assert [i.num_frames for i in items] == [4, 4]


def test_manifest_rows_with_probe_columns_are_not_probed(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,item_id,kind,num_frames,width,height,bytes,fps\nnot/here.mp4,v1,video,10,64,48,1000,\n")
    (item,) = read_manifest(str(manifest))
    assert (item.item_id, item.num_frames, item.width, item.height, item.bytes, item.fps, item.error) == (
        "v1", 10, 64, 48, 1000, None, None,
    )


def test_manifest_errors_name_the_file_and_the_fix(tmp_path):
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("video,label\na.mp4,cat\n")
    expected = r"no_path\.csv.*no 'path' column \(found \['label', 'video'\]\); add a 'path'"
    with pytest.raises(ValueError, match=expected):
        read_manifest(str(no_path))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv.* is empty"):
        read_manifest(str(empty))
    header_only = tmp_path / "header.jsonl"
    header_only.write_text("\n")
    with pytest.raises(ValueError, match=r"header\.jsonl.* is empty"):
        read_manifest(str(header_only))
    dup_ids = tmp_path / "dup.csv"
    dup_ids.write_text("path,item_id\na.mp4,same\nb.mp4,SAME\n")
    with pytest.raises(ValueError, match=r"dup\.csv.*item_id 'SAME' is used by rows 1 and 2; make the ids unique"):
        read_manifest(str(dup_ids))
    unsafe = tmp_path / "unsafe.csv"
    unsafe.write_text("path,item_id\na.mp4,../escape\n")
    with pytest.raises(ValueError, match="not a safe file name"):
        read_manifest(str(unsafe))
    bad_kind = tmp_path / "kind.csv"
    bad_kind.write_text("path,kind\na.mp4,movie\n")
    with pytest.raises(ValueError, match="kind 'movie' is not one of video, frames, image"):
        read_manifest(str(bad_kind))
    with pytest.raises(ValueError, match=r"unknown format '\.txt'"):
        (tmp_path / "m.txt").write_text("path\n")
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ValueError, match="must end in .parquet"):
        build_manifest([str(tmp_path)], str(tmp_path / "out.csv"))


def test_duplicate_paths_keep_the_first(dataset, tmp_path):
    csv_manifest = dataset / "list.csv"
    csv_manifest.write_text(f"path,item_id\nclip.mp4,first\n{dataset / 'clip.mp4'},second\n")
    with pytest.warns(ManifestWarning, match="clip.mp4.*more than once"):
        items = read_manifest(str(csv_manifest))
    assert [i.item_id for i in items] == ["first"]
    # Overlapping inputs to build_manifest: the file is reached twice, kept once.
    with pytest.warns(ManifestWarning, match="more than once"):
        table = build_manifest([str(dataset / "clip.mp4"), str(dataset)], str(tmp_path / "m.parquet"))
    ids = table.column("item_id").to_pylist()
    assert ids.count("clip.mp4") == 1 and len(ids) == len(set(ids))


def test_fingerprint_tracks_content_not_order(dataset, tmp_path):
    build_manifest([str(dataset)], str(tmp_path / "m.parquet"))
    items = read_manifest(str(tmp_path / "m.parquet"))
    fingerprint = manifest_fingerprint(items)
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert manifest_fingerprint(list(reversed(items))) == fingerprint
    from dataclasses import replace

    changed = [replace(items[0], bytes=items[0].bytes + 1)] + items[1:]
    assert manifest_fingerprint(changed) != fingerprint


def test_no_media_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no media found"):
            build_manifest([str(tmp_path)], str(tmp_path / "m.parquet"))


def test_discover_warns_on_broken_links_and_skips_loops(tmp_path):
    root = tmp_path / "links"
    _small_frames(root / "seq")
    os.symlink(tmp_path / "nowhere.mp4", root / "gone.mp4")
    os.symlink(root, root / "seq" / "loop")  # a folder linking back to its grandparent
    with pytest.warns(ManifestWarning) as record:
        found = discover([str(root)])
    messages = " ".join(str(w.message) for w in record)
    assert "gone.mp4" in messages and "broken link" in messages
    assert "links back to a parent folder" in messages
    assert [(os.path.basename(p), k) for p, _, k in found] == [("seq", "frames")]


def test_relative_paths_outside_the_manifest_folder(tmp_path):
    _small_video(tmp_path / "media" / "a.mp4")
    manifest = tmp_path / "manifests" / "list.csv"
    manifest.parent.mkdir()
    manifest.write_text("path\n../media/a.mp4\n")
    (item,) = read_manifest(str(manifest))
    assert (item.item_id, item.path, item.num_frames) == ("a.mp4", str(tmp_path / "media" / "a.mp4"), 4)
