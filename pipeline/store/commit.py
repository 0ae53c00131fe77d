"""Atomic per-item commits, and per-shard compaction so a shard's metadata stays a few files.

An item is committed by renaming a staged folder to meta/shard-NNNNN/<item_id>/ (items, masklets, frames
.parquet) as the very last step, after its masks are in place: after a kill at any instant a reader sees
the whole item or nothing of it, and a restarted worker skips exactly what is committed.

When a shard finishes, its item folders are merged into meta/shard-NNNNN/.compacted-VVVV/ (the same three
files) and then removed, so a shard holds three Parquet files however many items it has. Readers resolve a
shard as: the newest compacted folder, overridden per item by any item folder (an item folder is either
not yet merged, or a later redo of an item that had failed). Item ids never start with '.', so the names
cannot collide. Every step is a rename; at no instant can a reader see an item twice or lose one.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.paths import RunPaths
from pipeline.store.summary import write_summary

TABLES = ("items", "masklets", "frames")
_COMPACTED = ".compacted-"


def _discard(paths: RunPaths, path: Path) -> None:
    """Move a folder out of the store in one rename, then delete it at leisure."""
    trash = paths.tmp / f"trash.{path.name.lstrip('.')}.{uuid.uuid4().hex[:8]}"
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _stage_tables(paths: RunPaths, tag: str, tables: dict[str, pa.Table]) -> Path:
    stage = paths.tmp / f"commit.{tag}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        for name in TABLES:
            pq.write_table(tables[name], stage / f"{name}.parquet")
        write_summary(stage, tables)  # published by the same rename as the tables (for `masklet status`)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def commit_item(paths: RunPaths, shard_id: int, item_id: str, tables: dict[str, pa.Table]) -> Path:
    stage = _stage_tables(paths, item_id, tables)
    try:
        final = paths.item_commit(shard_id, item_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a redo of a failed item that was never compacted: the old row goes first
            _discard(paths, final)
        stage.rename(final)
        return final
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _shard_layout(paths: RunPaths, shard_id: int) -> tuple[Path | None, list[Path], dict[str, Path]]:
    d = paths.shard_meta(shard_id)
    if not d.exists():
        return None, [], {}
    compacted = sorted(p for p in d.iterdir() if p.name.startswith(_COMPACTED))
    items = {p.name: p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return (compacted[-1] if compacted else None), compacted[:-1], items


def read_shard_table(paths: RunPaths, shard_id: int, name: str, schema: pa.Schema) -> pa.Table:
    compacted, _, items = _shard_layout(paths, shard_id)
    parts = []
    if compacted is not None:
        t = pq.read_table(compacted / f"{name}.parquet", schema=schema)
        if items:
            t = t.filter(pc.invert(pc.is_in(t["item_id"], pa.array(sorted(items), pa.string()))))
        parts.append(t)
    parts.extend(pq.read_table(d / f"{name}.parquet", schema=schema) for _, d in sorted(items.items()))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def shard_ids_on_disk(paths: RunPaths) -> list[int]:
    if not paths.meta.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in paths.meta.glob("shard-*") if p.is_dir())


def read_table(paths: RunPaths, name: str, schema: pa.Schema) -> pa.Table:
    parts = [read_shard_table(paths, s, name, schema) for s in shard_ids_on_disk(paths)]
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def committed_items(paths: RunPaths, shard_id: int) -> dict[str, str]:
    """item_id -> status ('done' or 'failed') of every committed item of a shard."""
    from pipeline.store.metadata import ITEMS_SCHEMA

    t = read_shard_table(paths, shard_id, "items", ITEMS_SCHEMA)
    return dict(zip(t["item_id"].to_pylist(), t["status"].to_pylist()))


def compact_shard(paths: RunPaths, shard_id: int) -> Path | None:
    """Merge a shard's item folders into one new compacted folder, then remove what it replaced."""
    from pipeline.store import metadata

    schemas = {"items": metadata.ITEMS_SCHEMA, "masklets": metadata.MASKLETS_SCHEMA, "frames": metadata.FRAMES_SCHEMA}
    compacted, stale, items = _shard_layout(paths, shard_id)
    for old in stale:  # left by a kill between placing a new version and removing the old one
        _discard(paths, old)
    if not items:
        return compacted
    tables = {name: read_shard_table(paths, shard_id, name, schema) for name, schema in schemas.items()}
    version = int(compacted.name[len(_COMPACTED):]) + 1 if compacted is not None else 1
    stage = _stage_tables(paths, f"shard-{shard_id}", tables)
    final = paths.shard_meta(shard_id) / f"{_COMPACTED}{version:04d}"
    stage.rename(final)
    # The new version now wins over the old one and equals every item folder: remove them.
    if compacted is not None:
        _discard(paths, compacted)
    for d in items.values():
        _discard(paths, d)
    return final
