"""Atomic per-item commits: an item's three tables are written to a staging folder under tmp/ and the
folder is renamed to meta/shard-NNNNN/<item_id>/ as the very last step, after its masks are in place.

An item is committed if and only if that folder exists, so after a kill at any instant a reader sees the
whole item or nothing of it, and a restarted worker skips exactly what is committed.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.paths import RunPaths

TABLES = ("items", "masklets", "frames")


def commit_item(paths: RunPaths, shard_id: int, item_id: str, tables: dict[str, pa.Table]) -> Path:
    stage = paths.tmp / f"commit.{item_id}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        for name in TABLES:
            pq.write_table(tables[name], stage / f"{name}.parquet")
        final = paths.item_commit(shard_id, item_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # replacing a failed attempt (retry of failed items): move the old one away first
            trash = paths.tmp / f"replaced.{item_id}.{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        stage.rename(final)
        return final
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def committed_items(paths: RunPaths, shard_id: int) -> set[str]:
    d = paths.shard_meta(shard_id)
    return {p.name for p in d.iterdir() if p.is_dir()} if d.exists() else set()


def read_table(paths: RunPaths, name: str, schema: pa.Schema) -> pa.Table:
    files = [d / f"{name}.parquet" for d in paths.committed_dirs()]
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
