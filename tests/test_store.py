"""The store's commit protocol: whole items or nothing, no duplicates in any state a kill can leave."""
import shutil

import numpy as np
import pytest

from pipeline.config import StoreConfig
from pipeline.paths import RunPaths
from pipeline.records import FrameMasks
from pipeline.store import metadata
from pipeline.store.commit import CommitRefused, commit_item, compact_shard, committed_items, read_table
from pipeline.store.lease import LeaseLost, acquire
from pipeline.store.masks import MaskWriter, open_masks


def _tables(item_id: str, status: str = "done", n_frames: int = 2) -> dict:
    row = {name: None for name in metadata.ITEMS_SCHEMA.names}
    row.update(item_id=item_id, status=status, num_frames=n_frames)
    frames = metadata.FrameRows(item_id)
    for t in range(n_frames):
        m = np.zeros((1, 4, 4), bool)
        m[0, : t + 1, : t + 1] = True
        frames.add(t, t, (0,), m, np.zeros(1, np.float32))
    return {"items": metadata.items_table([row]), "masklets": metadata.empty(metadata.MASKLETS_SCHEMA),
            "frames": frames.table()}


def _ids(paths, name="items"):
    schema = {"items": metadata.ITEMS_SCHEMA, "frames": metadata.FRAMES_SCHEMA}[name]
    return sorted(read_table(paths, name, schema)["item_id"].to_pylist())


@pytest.fixture
def paths(tmp_path):
    return RunPaths.of(tmp_path / "run").ensure()


@pytest.fixture
def leases(paths):
    """The leases of shards 0 and 1, held by this process (commits and compactions happen only under one)."""
    held = {s: acquire(paths, s) for s in (0, 1)}
    yield held
    for lease in held.values():
        lease.release()


def test_commit_then_compact_keeps_every_row_once(paths, leases):
    for i in range(5):
        commit_item(paths, 0, f"it{i}", _tables(f"it{i}"), leases[0])
    assert _ids(paths) == [f"it{i}" for i in range(5)]
    compact_shard(paths, 0, leases[0])
    shard = paths.shard_meta(0)
    assert sorted(p.name for p in shard.iterdir()) == [".compacted-0001"], "three files per shard after compaction"
    assert _ids(paths) == [f"it{i}" for i in range(5)]
    assert len(_ids(paths, "frames")) == 10


def test_redo_of_a_failed_item_overrides_the_compacted_row(paths, leases):
    commit_item(paths, 0, "a", _tables("a"), leases[0])
    commit_item(paths, 0, "b", _tables("b", status="failed"), leases[0])
    compact_shard(paths, 0, leases[0])
    assert committed_items(paths, 0) == {"a": "done", "b": "failed"}
    commit_item(paths, 0, "b", _tables("b"), leases[0])
    assert committed_items(paths, 0) == {"a": "done", "b": "done"}
    assert _ids(paths) == ["a", "b"]
    compact_shard(paths, 0, leases[0])
    assert committed_items(paths, 0) == {"a": "done", "b": "done"}
    assert [p.name for p in paths.shard_meta(0).iterdir()] == [".compacted-0002"]


def test_states_a_kill_during_compaction_can_leave_show_no_duplicates(paths, leases):
    for i in range(3):
        commit_item(paths, 1, f"x{i}", _tables(f"x{i}"), leases[1])
    compact_shard(paths, 1, leases[1])
    commit_item(paths, 1, "x3", _tables("x3"), leases[1])
    # Simulate a kill right after the new version was renamed into place: old version and item folder remain.
    old = paths.shard_meta(1) / ".compacted-0001"
    keep = paths.tmp / "keep-old"
    shutil.copytree(old, keep)
    item = paths.shard_meta(1) / "x3"
    keep_item = paths.tmp / "keep-x3"
    shutil.copytree(item, keep_item)
    compact_shard(paths, 1, leases[1])
    shutil.copytree(keep, old)
    shutil.copytree(keep_item, item)
    assert _ids(paths) == ["x0", "x1", "x2", "x3"]
    compact_shard(paths, 1, leases[1])  # the next compaction cleans the leftovers up
    assert [p.name for p in paths.shard_meta(1).iterdir()] == [".compacted-0003"]
    assert _ids(paths) == ["x0", "x1", "x2", "x3"]


def test_staged_commit_is_invisible(paths, leases):
    commit_item(paths, 0, "a", _tables("a"), leases[0])
    (paths.shard_tmp(0) / "commit.b.deadbeef").mkdir(parents=True)
    assert _ids(paths) == ["a"]


def test_a_failed_row_never_replaces_a_done_one(paths, leases):
    commit_item(paths, 0, "a", _tables("a"), leases[0])
    with pytest.raises(CommitRefused, match="committed as done"):
        commit_item(paths, 0, "a", _tables("a", status="failed"), leases[0])
    compact_shard(paths, 0, leases[0])
    with pytest.raises(CommitRefused):
        commit_item(paths, 0, "a", _tables("a", status="failed"), leases[0])
    assert committed_items(paths, 0) == {"a": "done"}
    assert not list(paths.shard_tmp(0).iterdir()), "the refused commit left nothing staged"


def test_commits_and_compactions_need_the_lease_still_held(paths, leases):
    commit_item(paths, 0, "a", _tables("a"), leases[0])
    with pytest.raises(LeaseLost, match="shard 1"):
        commit_item(paths, 0, "b", _tables("b"), leases[1])  # another shard's lease
    paths.shard_lease(0).unlink()  # broken by another worker
    with pytest.raises(LeaseLost, match="no longer owns"):
        commit_item(paths, 0, "b", _tables("b"), leases[0])
    with pytest.raises(LeaseLost):
        compact_shard(paths, 0, leases[0])
    assert committed_items(paths, 0) == {"a": "done"} and [p.name for p in paths.shard_meta(0).iterdir()] == ["a"]
    assert not list(paths.shard_tmp(0).iterdir()), "nothing staged is left behind"


def test_mask_writer_streams_shrinks_and_publishes(paths, leases):
    w = MaskWriter(paths, "clip", 2, 10, 6, 8, StoreConfig(frames_per_file=4), {"k": 1})
    rng = np.random.default_rng(0)
    written = []
    for t in range(7):  # the media held fewer frames than probed
        m = rng.random((2, 6, 8)) > 0.5
        written.append(m)
        w.write(FrameMasks(t, t * 2, (0, 1), m, np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="out of order"):
        w.write(FrameMasks(9, 18, (0, 1), m, np.zeros(2, np.float32)))
    w.finish(num_frames=7)
    assert not paths.mask_array("clip").exists(), "nothing visible before publish"
    w.publish()
    arr = open_masks(paths, "clip")
    assert arr.shape == (2, 7, 6, 8) and arr.chunks == (1, 1, 6, 8)
    np.testing.assert_array_equal(arr[:], np.stack(written, axis=1))
    assert arr.attrs["k"] == 1


def test_mask_writer_abort_leaves_nothing(paths, leases):
    w = MaskWriter(paths, "gone", 1, 3, 4, 4, StoreConfig(), {})
    w.write(FrameMasks(0, 0, (0,), np.ones((1, 4, 4), bool), np.zeros(1, np.float32)))
    w.abort()
    assert not paths.mask_array("gone").exists() and not list(paths.item_tmp("gone").iterdir())


def test_mask_stats_match_a_direct_computation():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 20, 30)) > 0.97
    masks[1] = False
    areas, boxes = metadata.mask_stats(masks)
    for o in range(3):
        assert areas[o] == masks[o].sum()
        if masks[o].any():
            ys, xs = np.nonzero(masks[o])
            assert tuple(boxes[o]) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        else:
            assert tuple(boxes[o]) == (0, 0, 0, 0)
