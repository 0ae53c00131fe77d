"""A million items (issue 8, point 9): a worker reads only its shard's rows, status reads per-folder summaries
and prints a screen, open_run is lazy, old (version 1) run folders still open. Small runs stand in for big
ones here; benchmarks/bench_orchestration.py measures the big one (its --quick variant runs below)."""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import open_run, plan as plan_module, results as results_module
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.manifest import items_to_table, manifest_fingerprint, read_manifest, write_table_atomic
from pipeline.manifest.columns import complete_items
from pipeline.manifest.table import table_fingerprint
from pipeline.plan import load_run, make_plan, prepare_run
from pipeline.records import MediaItem
from pipeline.status import StatusCache, format_status, run_status
from pipeline.store import commit as commit_module
from pipeline.store import metadata
from pipeline.store.commit import commit_item, compact_shard, read_shard_table
from pipeline.store.lease import acquire
from pipeline.store.summary import SUMMARY_FILE, shard_summary, summarize


def _items(n: int) -> list[MediaItem]:
    return [MediaItem(f"it{i:04d}", f"/data/v/{i}.mp4", "video", 10 + i % 7, 25.0 if i % 3 else None, 64, 48,
                      None if i % 4 else "h264", 1000 + i, "probe failed: bad header" if i == 5 else None)
            for i in range(n)]


def _cfg(shards: int):
    return load_config(None, [f"plan.num_shards={shards}"])


def _tables(item_id: str, shard_id: int, status: str = "done", n_frames: int = 2, objects: int = 1) -> dict:
    row = {name: None for name in metadata.ITEMS_SCHEMA.names}
    row.update(item_id=item_id, shard_id=shard_id, status=status, num_frames=n_frames if status == "done" else 0,
               error=None if status == "done" else f"ValueError: {item_id} is broken",
               finished_at=pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC")).as_py())
    frames = metadata.FrameRows(item_id)
    if status == "done":
        for t in range(n_frames):
            m = np.zeros((objects, 4, 4), bool)
            m[:, : t + 1, : t + 1] = True
            frames.add(t, t, tuple(range(objects)), m, np.zeros(objects, np.float32))
    return {"items": metadata.items_table([row]), "masklets": metadata.empty(metadata.MASKLETS_SCHEMA),
            "frames": frames.table()}


def _commit(paths, shard_id, item_id, tables) -> None:
    """Commit as a worker does: under the shard's lease."""
    lease = acquire(paths, shard_id)
    try:
        commit_item(paths, shard_id, item_id, tables, lease)
    finally:
        lease.release()


def _compact(paths, shard_id) -> None:
    lease = acquire(paths, shard_id)
    try:
        compact_shard(paths, shard_id, lease)
    finally:
        lease.release()


def _commit_all(plan, failed=(), compact=True) -> None:
    for sid in plan.shard_ids:
        for item_id in plan.shard(sid).item_ids:
            _commit(plan.paths, sid, item_id, _tables(item_id, sid, "failed" if item_id in failed else "done"))
        if compact:
            _compact(plan.paths, sid)


# --- the plan: a worker reads its shard's rows only ----------------------------------------------------------

def test_a_worker_reads_only_the_row_groups_of_its_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "MANIFEST_ROW_GROUP", 8)
    items = _items(64)
    prepare_run(tmp_path / "run", items, _cfg(8))
    read_rows = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, groups, *a, **k):
        table = real(self, groups, *a, **k)
        read_rows.append(table.num_rows)
        return table

    def whole_file(*a, **k):
        raise AssertionError("a worker read the whole manifest copy")

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    monkeypatch.setattr(plan_module.pq, "read_table", whole_file)
    plan = load_run(tmp_path / "run")
    shard = plan.shard(3)
    by_id = {it.item_id: it for it in items}
    assert [plan.items[i] for i in shard.item_ids] == [by_id[i] for i in shard.item_ids]
    assert read_rows and sum(read_rows) <= 16, "one or two row groups of 8 rows"
    assert shard == make_plan(items, _cfg(8).plan)[3]


def test_the_frozen_copy_is_in_shard_order_and_round_trips_every_field(tmp_path):
    items = _items(40) + [MediaItem("odd", os.fsdecode(b"/data/caf\xe9.mp4"), "video", 3, 30.0, 8, 8, "vp9", 9)]
    plan = prepare_run(tmp_path / "run", items, _cfg(6))
    frozen = json.loads(plan.paths.plan.read_text())
    assert frozen["version"] == 2 and "item_ids" not in json.dumps(frozen)
    copy = pq.read_table(plan.paths.manifest).column("item_id").to_pylist()
    assert copy == [i for s in plan.shards for i in s.item_ids]
    by_id = {it.item_id: it for it in items}
    for sid in plan.shard_ids:
        assert list(plan.shard_items(sid).values()) == [by_id[i] for i in plan.shard(sid).item_ids]
        for item_id in plan.shard(sid).item_ids:
            assert plan.shard_of(item_id) == sid
    with pytest.raises(KeyError, match="not in the plan"):
        plan.shard_of("nope")
    assert dict(load_run(plan.paths.root).items) == by_id


def test_the_fingerprint_is_the_one_old_runs_recorded():
    """A guard: the faster hashing must give the digest that version 1 snapshots hold."""
    items = _items(30)
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda it: it.item_id):
        for f in (item.item_id.encode(), os.fsencode(item.path), str(item.num_frames).encode(),
                  str(item.width).encode(), str(item.height).encode(), str(item.bytes).encode()):
            digest.update(len(f).to_bytes(8, "little"))
            digest.update(f)
    assert manifest_fingerprint(items) == digest.hexdigest()
    odd = [MediaItem("odd", os.fsdecode(b"/d/caf\xe9.mp4"), "video", 3, 30.0, 8, 8, "vp9", 9),
           MediaItem("Ze", "/d/\u00e9t\u00e9.mp4", "video", 3, None, 8, 8, None, 0)]
    assert table_fingerprint(items_to_table(items + odd)) == manifest_fingerprint(items + odd)


def _as_version_1(plan) -> None:
    """Rewrite a run folder as masklet wrote it before plan version 2: ids listed, copy in manifest order."""
    shards = [{"shard_id": s.shard_id, "item_ids": list(s.item_ids), "cost": s.cost} for s in plan.shards]
    plan.paths.plan.write_text(json.dumps({"version": 1, "shards": shards}, indent=1))
    items = sorted(plan.items.values(), key=lambda it: it.item_id)
    write_table_atomic(items_to_table(items), str(plan.paths.manifest))


def test_a_version_1_run_folder_still_opens(tmp_path):
    items = _items(20)
    plan = prepare_run(tmp_path / "run", items, _cfg(4))
    shards = plan.shards
    _as_version_1(plan)
    old = load_run(tmp_path / "run")
    assert old.listed is not None and old.shards == shards
    assert old.shard(2) == shards[2] and old.shard_size(2) == len(shards[2].item_ids)
    assert old.shard_of(shards[1].item_ids[0]) == 1 and len(old.items) == 20
    assert prepare_run(tmp_path / "run", items, _cfg(4)).listed is not None, "resumes, never re-plans"
    _commit_all(old, failed={"it0003"})
    _, statuses = run_status(tmp_path / "run")
    assert sum(s.done for s in statuses) == 19 and sum(s.failed for s in statuses) == 1
    res = open_run(tmp_path / "run")
    assert res.items.num_rows == 20 and res.frames_for("it0007").num_rows == 2


# --- reading manifests by columns ------------------------------------------------------------------------------

def test_a_built_manifest_is_read_by_columns_with_the_same_items(tmp_path, monkeypatch):
    items = _items(30)
    path = tmp_path / "m.parquet"
    write_table_atomic(items_to_table(items), str(path))
    assert complete_items(pq.read_table(path)) == items
    assert read_manifest(path) == items


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.set_column(1, "path", pa.array(["rel/a.mp4"] + t["path"].to_pylist()[1:])), "relative"),
    (lambda t: t.set_column(0, "item_id", pa.array(["it0001"] + t["item_id"].to_pylist()[1:])), "repeated id"),
    (lambda t: t.set_column(3, "num_frames", pa.array([None] + t["num_frames"].to_pylist()[1:], pa.int64())),
     "to probe"),
    (lambda t: t.set_column(2, "kind", pa.array(["Video"] + t["kind"].to_pylist()[1:])), "kind to normalise"),
])
def test_tables_the_columns_cannot_vouch_for_go_to_the_row_reader(change, expected):
    table = change(items_to_table(_items(5)))
    assert complete_items(table) is None, expected


# --- status from summaries ------------------------------------------------------------------------------------

def _forbid_parquet(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("status read a shard's Parquet")

    monkeypatch.setattr(commit_module, "read_shard_table", refuse)


def test_status_reads_summaries_that_equal_the_tables(tmp_path, monkeypatch):
    plan = prepare_run(tmp_path / "run", _items(30), _cfg(5))
    _commit_all(plan, failed={"it0004", "it0017"}, compact=False)
    for sid in plan.shard_ids[:-1]:  # the last shard keeps its item folders (a shard still running)
        _compact(plan.paths, sid)
    sid = plan.shard_of("it0004")
    assert (sorted(plan.paths.shard_meta(sid).iterdir())[0] / SUMMARY_FILE).exists()
    expected = {s: summarize({"items": read_shard_table(plan.paths, s, "items", metadata.ITEMS_SCHEMA)})
                for s in plan.shard_ids}
    _forbid_parquet(monkeypatch)
    for s in plan.shard_ids:
        got = shard_summary(plan.paths, s)
        assert (got.done, got.failed, got.frames_done, got.errors) == \
               (expected[s].done, expected[s].failed, expected[s].frames_done, expected[s].errors)
        assert sorted(got.finished_s) == sorted(expected[s].finished_s)
    _, statuses = run_status(plan.paths.root)
    assert sum(s.done for s in statuses) == 28 and sum(s.failed for s in statuses) == 2


def test_status_falls_back_to_parquet_where_summaries_cannot_say(tmp_path):
    plan = prepare_run(tmp_path / "run", _items(10), _cfg(1))
    _commit_all(plan, failed={"it0002"})
    _commit(plan.paths, 0, "it0002", _tables("it0002", 0))  # a redo overrides a compacted failed row
    st = run_status(plan.paths.root)[1][0]
    assert (st.done, st.failed, st.errors) == (10, 0, {})
    for summary in plan.paths.shard_meta(0).rglob(SUMMARY_FILE):  # folders written before summaries existed
        summary.unlink()
    st = run_status(plan.paths.root)[1][0]
    assert (st.done, st.failed, st.frames_done) == (10, 0, 20)


def test_status_is_a_screen_with_shards_and_failed_on_request(tmp_path, capsys):
    plan = prepare_run(tmp_path / "run", _items(120), _cfg(40))
    failed = {f"it{i:04d}" for i in range(0, 120, 5)}  # 24 failed items
    _commit_all(plan, failed=failed)
    capsys.readouterr()
    assert main(["status", str(plan.paths.root)]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 25
    assert "96 done, 24 failed, 0 pending of 120" in text and "... and 14 more failed item(s)" in text
    assert f"masklet status {plan.paths.root} --shards" in text
    assert main(["status", str(plan.paths.root), "--shards", "--failed"]) == 0
    text = capsys.readouterr().out
    assert sum(1 for line in text.splitlines() if line.rstrip().endswith("done") and "failed items" not in line) == 40
    assert all(f"{i}: ValueError" in text for i in failed)


def test_the_progress_bar_rereads_only_changed_shards(tmp_path, monkeypatch):
    plan = prepare_run(tmp_path / "run", _items(24), _cfg(6))
    redo = plan.shard(2).item_ids[0]
    _commit_all(plan, failed={redo})
    monkeypatch.setattr(StatusCache, "SETTLE_NS", 0)
    cache = StatusCache(plan)
    assert sum(s.done for s in cache.refresh()) == 23 and cache.reads == 6
    assert sum(s.done for s in cache.refresh()) == 23 and cache.reads == 6, "nothing changed: nothing read"
    time.sleep(0.02)
    _commit(plan.paths, 2, redo, _tables(redo, 2))  # a redo of the failed item
    states = cache.refresh()
    assert cache.reads == 7 and states[2].failed == 0 and sum(s.done for s in states) == 24


def test_status_text_of_ten_thousand_shards_is_fast(tmp_path):
    plan = prepare_run(tmp_path / "run", _items(50), _cfg(5))
    from pipeline.status import ShardStatus

    t0 = time.time()
    shards = [ShardStatus(i, 100, 99, 1, 990, {f"x{i}": "e"}, [t0 + i + k / 100 for k in range(100)], [10] * 100)
              for i in range(10_000)]
    start = time.perf_counter()
    text = format_status(plan, shards)
    assert time.perf_counter() - start < 5, "merging 10,000 shards must be linear"
    assert "990000 done, 10000 failed, 0 pending of 1000000" in text and len(text.splitlines()) < 30


# --- open_run: lazy tables --------------------------------------------------------------------------------------

def test_open_run_scans_lazily_and_reads_one_item_from_its_shard(tmp_path, monkeypatch):
    plan = prepare_run(tmp_path / "run", _items(24), _cfg(4))
    _commit_all(plan, failed={"it0001"})
    _commit(plan.paths, plan.shard_of("it0001"), "it0001", _tables("it0001", plan.shard_of("it0001")))
    _commit(plan.paths, 0, plan.shard(0).item_ids[0], _tables(plan.shard(0).item_ids[0], 0, n_frames=5))
    res = open_run(plan.paths.root)
    whole = commit_module.read_table(plan.paths, "frames", metadata.FRAMES_SCHEMA)
    assert res.dataset("frames").count_rows() == whole.num_rows == 24 * 2 + 3
    assert res.items.num_rows == 24 and set(res.item_ids("done")) == {it.item_id for it in _items(24)}
    first = plan.shard(0).item_ids[0]
    assert res.frames_for(first).num_rows == 5 and res.frames_for("it0001").num_rows == 2
    late = res.scan("frames", ds.field("frame") >= 3, ["item_id", "frame"])
    assert late.column_names == ["item_id", "frame"] and late["item_id"].to_pylist() == [first, first]
    assert res.masklets_for(first).num_rows == 0
    monkeypatch.setattr(results_module, "TABLE_ROWS_LIMIT", 10)
    with pytest.raises(MemoryError, match=r"frames_for\(item_id\), scan\('frames'"):
        open_run(plan.paths.root).frames
    with pytest.raises(KeyError, match="has no committed masks"):
        res.masks("it9999")


def test_a_run_with_nothing_committed_has_empty_tables(tmp_path):
    plan = prepare_run(tmp_path / "run", _items(4), _cfg(2))
    res = open_run(plan.paths.root)
    assert res.items.num_rows == 0 and res.frames.num_rows == 0 and res.frames_for("it0001").num_rows == 0


def test_items_are_read_from_one_cached_file_until_a_commit_changes_the_run(tmp_path, monkeypatch):
    plan = prepare_run(tmp_path / "run", _items(24), _cfg(4))
    _commit_all(plan, failed={"it0003"})
    first = open_run(plan.paths.root).items
    assert len(list(plan.paths.table_cache.glob("items-*.parquet"))) == 1
    real = results_module._dataset
    monkeypatch.setattr(results_module, "_dataset", lambda *a: pytest.fail("read every shard again"))
    assert open_run(plan.paths.root).items.equals(first)
    monkeypatch.setattr(results_module, "_dataset", real)
    sid = plan.shard_of("it0003")
    _commit(plan.paths, sid, "it0003", _tables("it0003", sid))  # a redo: the run changed
    items = open_run(plan.paths.root).items
    assert dict(zip(items["item_id"].to_pylist(), items["status"].to_pylist()))["it0003"] == "done"
    _compact(plan.paths, sid)
    assert open_run(plan.paths.root).items.sort_by("item_id").equals(items.sort_by("item_id"))
    assert len(list(plan.paths.table_cache.glob("items-*.parquet"))) == 1, "older versions are removed"


def test_the_benchmark_quick_variant_runs_and_meets_its_targets(capsys):
    from benchmarks.bench_orchestration import main as bench

    assert bench(["--quick"]) == 0
    out = capsys.readouterr().out
    for step in ("read the manifest", "plan and freeze the run", "worker start-up", "masklet status OUT",
                 "open_run(OUT).items", "peak memory"):
        assert step in out, step
    assert "targets (wall seconds): met" in out and "targets (CPU seconds): met" in out


def test_items_are_read_from_each_folders_arrow_copy_and_from_parquet_where_there_is_none(tmp_path):
    import pyarrow.ipc as ipc

    from pipeline.results import open_run

    plan = prepare_run(tmp_path / "run", _items(12), _cfg(3))
    _commit_all(plan, failed={"it0005"})
    folders = sorted(plan.paths.meta.glob("shard-*/.compacted-*"))
    assert len(folders) == 3
    for d in folders:
        with pa.OSFile(str(d / "items.arrow")) as f:
            assert ipc.open_file(f).read_all().equals(pq.read_table(d / "items.parquet"))
    # The Arrow copy is what open_run reads: a changed copy shows ...
    d = folders[0]
    changed = pq.read_table(d / "items.parquet")
    changed = changed.set_column(changed.schema.get_field_index("error"), "error",
                                 pa.array(["from arrow"] * changed.num_rows, pa.string()))
    with pa.OSFile(str(d / "items.arrow"), "wb") as sink, ipc.new_file(sink, changed.schema) as w:
        w.write_table(changed)
    assert "from arrow" in open_run(plan.paths.root).items["error"].to_pylist()
    # ... and a folder committed before there were Arrow copies is read from its Parquet file.
    (d / "items.arrow").unlink()
    for cache in plan.paths.table_cache.glob("*"):
        cache.unlink()
    items = open_run(plan.paths.root).items
    assert items.num_rows == 12 and "from arrow" not in items["error"].to_pylist()
    assert sorted(items["item_id"].to_pylist()) == sorted(pq.read_table(d / "items.parquet")["item_id"].to_pylist()
                                                          + [i for f in folders[1:] for i in
                                                             pq.read_table(f / "items.parquet")["item_id"].to_pylist()])
