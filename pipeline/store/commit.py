"""Atomic per-item commits, and per-shard compaction so a shard's metadata stays a few files.

An item is committed by renaming a staged folder to meta/shard-NNNNN/<item_id>/ (items, masklets, frames
.parquet) as the very last step, after its masks are in place: after a kill at any instant a reader sees
the whole item or nothing of it, and a restarted worker skips exactly what is committed.

When a shard finishes, its item folders are merged into meta/shard-NNNNN/.compacted-VVVV/ (the same three
files) and then removed, so a shard holds three Parquet files however many items it has. Readers resolve a
shard as: the newest compacted folder, overridden per item by any item folder (an item folder is either
not yet merged, or a later redo of an item that had failed). Item ids never start with '.', so the names
cannot collide. Every step is a rename; at no instant can a reader see an item twice or lose one.

Both happen only under the shard's lease (pipeline/store/lease.py), checked just before the rename that
publishes; a done row is never replaced by a failed one. Staging and trash live in the shard's own
tmp/shards/shard-NNNNN/, which its next owner clears (`clear_staging`); the staged files are fsynced
before the rename (pipeline/store/atomic.py), so a node crash cannot publish a name without its data.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.paths import RunPaths
from pipeline.store.atomic import publish
from pipeline.store.lease import ShardLease
from pipeline.store.summary import write_summary

TABLES = ("items", "masklets", "frames")
ITEMS_ARROW = "items.arrow"  # the items rows of a committed folder, also as an Arrow IPC file (read whole)
_COMPACTED = ".compacted-"


class CommitRefused(RuntimeError):
    """A commit that would lose work (a failed row over a done one); the message says which."""


def _discard(paths: RunPaths, shard_id: int, path: Path) -> None:
    """Move a folder out of the store in one rename, then delete it at leisure (the shard's next owner
    finishes the deletion if this one is killed meanwhile)."""
    trash = paths.shard_tmp(shard_id) / f"trash.{path.name.lstrip('.')}.{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _stage_tables(paths: RunPaths, shard_id: int, tag: str, tables: dict[str, pa.Table]) -> Path:
    stage = paths.shard_tmp(shard_id) / f"commit.{tag}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        for name in TABLES:
            pq.write_table(tables[name], stage / f"{name}.parquet")
        write_summary(stage, tables)  # published by the same rename as the tables (for `masklet status`)
        # The items rows again as an uncompressed Arrow file: `open_run(...).items` reads every shard's, and an
        # Arrow file maps in a third of a small Parquet file's time (10,000 shards: 1.6 s against 4 s of CPU).
        with pa.OSFile(str(stage / ITEMS_ARROW), "wb") as sink, pa.ipc.new_file(sink, tables["items"].schema) as w:
            w.write_table(tables["items"])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def commit_item(paths: RunPaths, shard_id: int, item_id: str, tables: dict[str, pa.Table],
                lease: ShardLease) -> Path:
    """Publish one item's rows, under the shard's lease. A failed row never replaces a done one
    (CommitRefused); a done or failed row replaces a failed one (a redo)."""
    statuses = set(tables["items"]["status"].to_pylist())
    if statuses != {"done"} and committed_items(paths, shard_id).get(item_id) == "done":
        raise CommitRefused(f"item {item_id} of shard {shard_id} is committed as done; a {'/'.join(sorted(statuses))} "
                            f"row does not replace it (two workers ran the shard?)")
    stage = _stage_tables(paths, shard_id, item_id, tables)
    try:
        final = paths.item_commit(shard_id, item_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        lease.check(shard_id)
        if final.exists():  # a redo of a failed item that was never compacted: the old row goes first
            _discard(paths, shard_id, final)
        return publish(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def clear_staging(paths: RunPaths, shard_id: int, item_ids: Iterable[str], committed: dict[str, str],
                  lease: ShardLease) -> list[Path]:
    """What the shard's owner does first: remove the staging and trash that earlier workers of this shard left
    (killed, requeued), and the checkpoints of items committed since. Checkpoints of uncommitted items stay
    (tmp/partial/<item_id>/: the item goes on from them), less their half-written temporary files. Returns
    what was removed."""
    lease.check(shard_id)
    removed = []
    leftovers = [paths.shard_tmp(shard_id)]
    for item_id in item_ids:
        leftovers.append(paths.item_tmp(item_id))
        partial = paths.partial(item_id)
        if committed.get(item_id) == "done":
            leftovers.append(partial)
        elif partial.is_dir():
            leftovers.extend(p for p in partial.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


def needs_tidy(paths: RunPaths, shard_id: int) -> bool:
    """Whether a shard whose items are all committed still holds what a killed owner left: its lease, staging
    or trash, item folders not yet compacted. Running the shard again (nothing to process) tidies it. The
    items' own staging is not looked at (a stat per item, at every launch): an owner killed while any of it
    existed also left its lease."""
    compacted, stale, items = _shard_layout(paths, shard_id)
    return bool(stale or items) or paths.shard_lease(shard_id).exists() or paths.shard_tmp(shard_id).exists()


def release_staging(paths: RunPaths, shard_id: int, item_ids: Iterable[str]) -> None:
    """Remove the shard's and its items' (by now empty) staging folders when its owner is done with them."""
    for folder in (paths.shard_tmp(shard_id), *(paths.item_tmp(i) for i in item_ids)):
        shutil.rmtree(folder, ignore_errors=True)


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


def compact_shard(paths: RunPaths, shard_id: int, lease: ShardLease) -> Path | None:
    """Merge a shard's item folders into one new compacted folder, then remove what it replaced; under the
    shard's lease (two compactions would otherwise race for one version's name)."""
    from pipeline.store import metadata

    schemas = {"items": metadata.ITEMS_SCHEMA, "masklets": metadata.MASKLETS_SCHEMA, "frames": metadata.FRAMES_SCHEMA}
    lease.check(shard_id)
    compacted, stale, items = _shard_layout(paths, shard_id)
    for old in stale:  # left by a kill between placing a new version and removing the old one
        _discard(paths, shard_id, old)
    if not items:
        return compacted
    tables = {name: read_shard_table(paths, shard_id, name, schema) for name, schema in schemas.items()}
    version = int(compacted.name[len(_COMPACTED):]) + 1 if compacted is not None else 1
    stage = _stage_tables(paths, shard_id, "compacted", tables)
    final = paths.shard_meta(shard_id) / f"{_COMPACTED}{version:04d}"
    try:
        lease.check(shard_id)
        publish(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # The new version now wins over the old one and equals every item folder: remove them.
    if compacted is not None:
        _discard(paths, shard_id, compacted)
    for d in items.values():
        _discard(paths, shard_id, d)
    return final
