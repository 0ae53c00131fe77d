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


def _write_clip(paths, name: str, masks: np.ndarray, buffer_bytes: int, per_file: int = 4) -> MaskWriter:
    objects, frames, height, width = masks.shape
    w = MaskWriter(paths, name, objects, frames + 2, height, width, StoreConfig(frames_per_file=per_file), {"k": 1},
                   buffer_bytes=buffer_bytes)
    for t in range(frames):
        w.write(FrameMasks(t, t, tuple(range(objects)), masks[:, t].copy(), np.zeros(objects, np.float32)))
    w.finish(num_frames=frames)
    return w


def _files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bounded_buffer_writes_the_same_bytes(paths):
    """Written a frame at a time (the budget holds less than one frame), 3 frames at a time (slabs that do not
    divide the 4-frame shard files: 3 + 1 per file) or a whole shard file at a time, the files are identical."""
    rng = np.random.default_rng(2)
    masks = np.zeros((3, 10, 24, 32), bool)
    masks[:, :, 4:20, 6:28] = rng.random((3, 10, 16, 22)) > 0.4  # empty borders: some chunks compress to little
    masks[1, 5] = False  # an empty chunk (fill value)
    frame = 3 * 24 * 32
    writers = {budget: _write_clip(paths, f"b{budget}", masks, budget) for budget in (frame - 1, 3 * frame, 10**9)}
    assert [w.buffer_frames for w in writers.values()] == [1, 3, 4]
    files = {budget: _files(w.stage) for budget, w in writers.items()}
    assert len(files[10**9]) >= 4  # zarr.json and three shard files
    assert files[frame - 1] == files[3 * frame] == files[10**9]
    w = writers[3 * frame]
    w.publish()
    np.testing.assert_array_equal(open_masks(paths, "b%d" % (3 * frame))[:], masks)


def test_the_writer_holds_at_most_its_budget(paths):
    """Python-side allocations (numpy reports its buffers to tracemalloc) while one 8-frame shard file is
    written under a budget of 1 and 2 frames: the buffer, the frame in flight and Zarr's scratch, far from
    the whole file held twice (18 frames' worth measured before the budget: a list of 8 frames, then their
    np.stack)."""
    import tracemalloc

    objects, frames, side = 8, 8, 256
    frame = objects * side * side
    y, x = np.mgrid[0:side, 0:side]
    for budget in (frame, 2 * frame):
        w = MaskWriter(paths, f"peak{budget}", objects, frames, side, side, StoreConfig(frames_per_file=frames), {},
                       buffer_bytes=budget)
        tracemalloc.start()
        for t in range(frames):
            m = np.stack([(abs(x - 100 - t - o) < 40 + o) & (abs(y - 120 + o) < 50) for o in range(objects)])
            w.write(FrameMasks(t, t, tuple(range(objects)), m, np.zeros(objects, np.float32)))
            del m
        w.finish()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2 * budget + 2 * frame, (budget // frame, peak / frame)


def test_a_writer_with_room_for_more_objects_takes_them_as_they_come_and_trims_the_rest(paths):
    """Re-seeding and phase-1 linking add masklets while an item is written: frames carry a growing number of
    objects (never fewer), the array keeps the later objects empty on earlier frames, and finish() trims the
    object axis to the objects there were. Whatever the buffer, the stored bits equal the frames' masks."""
    rng = np.random.default_rng(3)
    frames, height, width = 7, 5, 6
    counts = [1, 1, 2, 2, 2, 4, 4]  # objects on each frame
    masks = rng.random((4, frames, height, width)) > 0.5
    for budget in (1, 10**6):  # a frame at a time, and the whole item in the buffer
        w = MaskWriter(paths, f"grow{budget}", 6, frames, height, width, StoreConfig(frames_per_file=3), {},
                       buffer_bytes=budget)
        for t, n in enumerate(counts):
            w.write(FrameMasks(t, t, tuple(range(n)), masks[:n, t], np.zeros(n, np.float32)))
        with pytest.raises(ValueError, match="expected"):  # an object never leaves the layout
            w.write(FrameMasks(frames, frames, (0,), masks[:1, 0], np.zeros(1, np.float32)))
        w.finish(num_objects=4)
        w.publish()
        got = open_masks(paths, f"grow{budget}")[:]
        expected = masks.copy()
        for t, n in enumerate(counts):
            expected[n:, t] = False
        assert got.shape == (4, frames, height, width)
        assert np.array_equal(got, expected)
