"""`masklet manifest build PATH... --update OLD`: ids never change as a dataset grows.

A plain rebuild derives ids from the whole file set, so a colliding newcomer can rename an item already
listed; these tests show that happening and that --update keeps every old row (id and probe) instead."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline import samples
from pipeline.cli import main
from pipeline.manifest import build, build_manifest, read_manifest


def _video(path, seed=1):
    return samples.make_video(path, frames=3, width=64, height=48, seed=seed)


def _rows(path) -> dict[str, dict]:
    """{path: row} of a written manifest."""
    return {r["path"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture
def probed(monkeypatch) -> list[str]:
    """The paths that update_manifest probes."""
    calls: list[str] = []
    real = build.probe_many

    def spy(entries, workers=None):
        calls.extend(p for p, _ in entries)
        return real(entries, workers=workers)

    monkeypatch.setattr(build, "probe_many", spy)
    return calls


def test_a_real_collision_renames_on_rebuild_but_not_with_update(tmp_path, probed, capsys):
    media = tmp_path / "media"
    old_clip = str(_video(media / "sub" / "clip.mp4"))
    other = str(_video(media / "other.mp4", seed=2))
    old = tmp_path / "old.parquet"
    build_manifest([str(media)], str(old))
    assert {r["path"]: r["item_id"] for r in _rows(old).values()} == {old_clip: "sub__clip.mp4",
                                                                       other: "other.mp4"}
    newcomer = str(_video(media / "sub__clip.mp4", seed=3))  # its plain name is the id sub/clip.mp4 has

    # Without --update the newcomer takes the plain id and the item already listed is renamed.
    rebuilt = build_manifest([str(media)], str(tmp_path / "rebuilt.parquet"))
    ids = dict(zip(rebuilt.column("path").to_pylist(), rebuilt.column("item_id").to_pylist()))
    assert ids[newcomer] == "sub__clip.mp4" and ids[old_clip] != "sub__clip.mp4"

    probed.clear()
    new = tmp_path / "new.parquet"
    assert main(["manifest", "build", str(media), "-o", str(new), "--update", str(old)]) == 0
    assert "2 items kept with their ids, 1 added, 0 removed" in capsys.readouterr().out
    before, after = _rows(old), _rows(new)
    for path, row in before.items():
        assert after[path] == row  # the same id and the same probe values
    assert probed == [newcomer]  # only the new file was probed
    new_id = after[newcomer]["item_id"]
    assert new_id.startswith("sub__clip.mp4-") and new_id.lower() not in {r["item_id"].lower() for r in before.values()}
    assert [i.item_id for i in read_manifest(str(new))] == ["other.mp4", "sub__clip.mp4", new_id]  # old rows first


def test_a_case_only_clash_renames_both_on_rebuild_but_neither_old_one_with_update(tmp_path):
    media = tmp_path / "media"
    first = str(_video(media / "Clip.mp4"))
    old = tmp_path / "old.parquet"
    build_manifest([str(media)], str(old))
    assert _rows(old)[first]["item_id"] == "Clip.mp4"
    second = str(_video(media / "clip.mp4", seed=2))
    if len(os.listdir(media)) < 2:
        pytest.skip("this file system folds case: 'clip.mp4' replaced 'Clip.mp4'")

    rebuilt = {r["path"]: r["item_id"] for r in build_manifest([str(media)], str(tmp_path / "r.parquet")).to_pylist()}
    assert rebuilt[first] != "Clip.mp4" and rebuilt[second] != "clip.mp4"  # both renamed

    new = tmp_path / "new.parquet"
    assert main(["manifest", "build", str(media), "-o", str(new), "--update", str(old)]) == 0
    after = _rows(new)
    assert after[first]["item_id"] == "Clip.mp4"
    assert after[second]["item_id"].startswith("clip.mp4-")


def test_removed_files_are_listed_left_out_and_their_ids_never_reused(tmp_path, capsys):
    media = tmp_path / "media"
    keep = str(_video(media / "a" / "keep.mp4"))
    gone = _video(media / "a" / "gone.mp4", seed=2)
    aside = str(_video(media / "b" / "aside.mp4", seed=3))
    manifest = tmp_path / "m.parquet"
    build_manifest([str(media)], str(manifest))
    os.remove(gone)

    # In place (OUTPUT is OLD), scanning only a/: b/aside.mp4 is still on disk but not under the paths given.
    assert main(["manifest", "build", str(media / "a"), "-o", str(manifest), "--update", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "1 items kept with their ids, 0 added, 2 removed" in out
    assert f"removed: a__gone.mp4 ({gone}: no longer on disk)" in out
    assert f"removed: b__aside.mp4 ({aside}: still on disk, but not under the paths given)" in out
    assert list(_rows(manifest)) == [keep]

    # A different file that would get a removed id does not get it; the removed file coming back does.
    _video(media / "a__gone.mp4", seed=4)
    _video(gone, seed=2)
    assert main(["manifest", "build", str(media), "-o", str(manifest), "--update", str(manifest)]) == 0
    ids = {path: row["item_id"] for path, row in _rows(manifest).items()}
    assert ids[str(gone)] == "a__gone.mp4" and ids[aside] == "b__aside.mp4" and ids[keep] == "a__keep.mp4"
    assert ids[str(media / "a__gone.mp4")].startswith("a__gone.mp4-")
