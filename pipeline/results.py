"""Reading a run: `open_run(OUT)` gives the items, masklets and per-frame tables (committed items only)
and each item's masks as a lazy Zarr array.

A run of a million videos of 300 frames and 20 objects holds 6 billion frame rows: they are never loaded
whole. The tables are exposed as pyarrow datasets over the committed Parquet files (`dataset(name)`), with
filters and column selections pushed down (`scan(name, filter=..., columns=...)`), and the rows of one item
read from its shard's files only (`frames_for(item_id)`, `masklets_for(item_id)`: the plan says which
shard). `.masklets` and `.frames` stay for small runs and refuse past TABLE_ROWS_LIMIT rows, naming the lazy
way instead.

`.items` (one row per item) is read from every shard's file: 10,000 small files cost about 8 CPU seconds,
most of it per file, not per row. The table is then kept in one file under cache/, named by a hash of
the committed folders it came from (path, inode, mtime: a commit, a redo or a compaction changes it), so the
next `open_run(...).items` on an unchanged run reads one file. A run folder that cannot be written is read
the long way each time.

Which files hold a shard's rows is the store's rule (pipeline/store/commit.py: the newest compacted folder,
overridden per item by item folders). Where an item folder overrides rows of a compacted file (a redo of
failed items, or a compaction cut short), that file's other rows are read into memory and joined to the
dataset; there are few such shards, and none in a finished run.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import zarr

from pipeline.paths import RunPaths
from pipeline.plan import RunPlan, load_run
from pipeline.store import metadata
from pipeline.store.commit import ITEMS_ARROW, _shard_layout, shard_ids_on_disk
from pipeline.store.masks import open_masks

SCHEMAS = {"items": metadata.ITEMS_SCHEMA, "masklets": metadata.MASKLETS_SCHEMA, "frames": metadata.FRAMES_SCHEMA}
log = logging.getLogger("masklet.results")
TABLE_ROWS_LIMIT = 20_000_000  # `.masklets` / `.frames` load whole up to this (about a GB); past it, scan


@dataclass(frozen=True)
class ShardFiles:
    """The committed folders of one shard, resolved: whole folders, and a compacted folder whose rows of
    `overridden` items are superseded by item folders."""

    whole: tuple[Path, ...] = ()
    partly: Path | None = None
    overridden: tuple[str, ...] = ()


def shard_files(paths: RunPaths, shard_id: int) -> ShardFiles:
    compacted, _, items = _shard_layout(paths, shard_id)
    folders = tuple(items[k] for k in sorted(items))
    if compacted is None:
        return ShardFiles(folders)
    if not items:
        return ShardFiles((compacted,))
    return ShardFiles(folders, compacted, tuple(sorted(items)))


def _dataset(shards: list[ShardFiles], name: str) -> ds.Dataset:
    schema = SCHEMAS[name]
    files = [str(d / f"{name}.parquet") for s in shards for d in s.whole]
    whole = ds.dataset(files, schema=schema, format="parquet")
    partly = [s for s in shards if s.partly is not None]
    if not partly:
        return whole
    kept = []
    for s in partly:
        t = pq.read_table(s.partly / f"{name}.parquet", schema=schema)
        kept.append(t.filter(pc.invert(pc.is_in(t["item_id"], pa.array(s.overridden, pa.string())))))
    return ds.dataset([whole, ds.InMemoryDataset(pa.concat_tables(kept), schema=schema)])


def _layout_key(shards: list[ShardFiles]) -> str:
    """A name for the committed state of a run: every resolved folder's path, inode and mtime."""
    digest = hashlib.sha256()
    for s in shards:
        for d in (*s.whole, *((s.partly,) if s.partly else ())):
            st = os.stat(d)
            digest.update(f"{d.parent.name}/{d.name}:{st.st_ino}:{st.st_mtime_ns}\n".encode())
        digest.update(("|".join(s.overridden) + "\n").encode())
    return digest.hexdigest()[:32]


def _keep(table: pa.Table, path: Path) -> None:
    """Write the cache file atomically and drop older ones; a folder we cannot write to is no error."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, use_dictionary=False)  # reads back in a third of the time (measured)
        os.replace(tmp, path)
        for old in path.parent.glob("items-*.parquet"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.info("not caching the items table in %s (%s)", path.parent, e)


def _read_files(files: list[str]) -> list[pa.Table]:
    # Small files read whole, one thread each: the dataset scanner's per-file set-up costs more than the rows
    # of a 100-item shard (measured: 1.5 CPU s per 3,000 files against 2.7 s).
    return [_read_file(f) for f in files]


def _read_file(path: str) -> pa.Table:
    """A committed folder's table; its items rows from the folder's Arrow copy where there is one (a folder
    committed before there were any has only the Parquet file)."""
    if path.endswith("/items.parquet"):
        try:
            with pa.OSFile(path[: -len("items.parquet")] + ITEMS_ARROW) as source:  # read, not mapped: no fd kept
                return pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            pass
    return pq.ParquetFile(path, pre_buffer=False).read(use_threads=False)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A committed table in today's schema: columns a run made by an older version lacks (the quality
    signals, for one) come back as nulls, as the dataset reader gives them."""
    missing = [f for f in schema if f.name not in table.column_names]
    for f in missing:
        table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)


def _read_all(shards: list[ShardFiles], name: str) -> pa.Table:
    """Every committed row of `name`, in memory: the whole files by a few threads, the rest as `_dataset`."""
    schema = SCHEMAS[name]
    files = [str(d / f"{name}.parquet") for s in shards for d in s.whole]
    threads = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        step = max(1, -(-len(files) // threads))  # contiguous runs of files: rows stay in shard order
        parts = [t for run in pool.map(_read_files, [files[i:i + step] for i in range(0, len(files), step)])
                 for t in run]
    parts = [t if t.schema == schema else _conform(t, schema) for t in parts]
    partly = [s for s in shards if s.partly is not None]
    if partly:
        parts.append(_dataset([ShardFiles((), s.partly, s.overridden) for s in partly], name).to_table())
    # One chunk, not one per shard file: 10,000 chunks make every later filter, and the cache's write, slow.
    return pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()


VERSION_VIEWS = ("latest", "original", "all")


@dataclass
class RunResults:
    plan: RunPlan
    versions: str = "latest"  # how `.masklets` shows reviewed masklets: see `masklets`

    def __post_init__(self):
        if self.versions not in VERSION_VIEWS:
            raise ValueError(f"versions={self.versions!r}: use one of {', '.join(VERSION_VIEWS)}")

    @property
    def paths(self) -> RunPaths:
        return self.plan.paths

    @property
    def random_weights(self) -> bool:
        """True when the masks came from a random-weight model: plumbing checks, never results."""
        return self.plan.random_weights

    @cached_property
    def _layout(self) -> list[ShardFiles]:
        return [shard_files(self.paths, s) for s in shard_ids_on_disk(self.paths)]

    def dataset(self, name: str) -> ds.Dataset:
        """A pyarrow dataset over the committed rows of `name` (items, masklets or frames); nothing is read
        until it is scanned. The committed set is the one on disk when this RunResults was opened."""
        if name not in SCHEMAS:
            raise KeyError(f"no table {name!r} in a run; the tables are {', '.join(SCHEMAS)}")
        return _dataset(self._layout, name)

    def scan(self, name: str, filter: ds.Expression | None = None, columns: list[str] | None = None) -> pa.Table:
        """The rows of `name` that pass `filter`, with only `columns`: both pushed down to the Parquet reader,
        e.g. scan("frames", ds.field("object_score") < 0, ["item_id", "frame"])."""
        return self.dataset(name).to_table(filter=filter, columns=columns)

    def _shard_dataset(self, item_id: str, name: str) -> ds.Dataset:
        shard_id = self.plan.shard_of(item_id)
        return _dataset([shard_files(self.paths, shard_id)], name)

    def item_rows(self, name: str, item_id: str) -> pa.Table:
        """One item's rows of `name`, read from its shard's files only."""
        return self._shard_dataset(item_id, name).to_table(filter=ds.field("item_id") == item_id)

    def frames_for(self, item_id: str) -> pa.Table:
        return self.item_rows("frames", item_id)

    def masklets_for(self, item_id: str) -> pa.Table:
        return self.item_rows("masklets", item_id)

    @cached_property
    def items(self) -> pa.Table:
        key = _layout_key(self._layout)
        cached = self.paths.table_cache / f"items-{key}.parquet"
        try:
            return pq.read_table(cached, schema=SCHEMAS["items"])
        except FileNotFoundError:  # none yet for this state of the run (or another reader just replaced it)
            pass
        table = _read_all(self._layout, "items")
        _keep(table, cached)
        return table

    def _whole(self, name: str) -> pa.Table:
        dataset = self.dataset(name)
        rows = dataset.count_rows()  # Parquet footers only
        if rows > TABLE_ROWS_LIMIT:
            raise MemoryError(
                f"{self.paths.root}: the {name} table has {rows:,} rows, too many to load whole (limit "
                f"{TABLE_ROWS_LIMIT:,}); read it lazily: {name}_for(item_id), scan({name!r}, filter=..., "
                f"columns=...) or dataset({name!r})")
        return dataset.to_table()

    @cached_property
    def masklets(self) -> pa.Table:
        """Every masklet row with the version columns (pipeline/review/records.py VERSION_COLUMNS). With
        versions="latest" (the default): each masklet's newest version (`masklet refine`), without those a
        review decision rejects (reject or duplicate); "original": the run's own rows (version 0), all of
        them; "all": the run's rows and every published version's. A run never reviewed reads as before,
        plus the constant version-0 columns (one stat of OUT/review and OUT/versions)."""
        from pipeline.review.versions import with_version_zero

        table = with_version_zero(self._whole("masklets"))
        if self.versions == "original" or not (self.paths.review.exists() or self.paths.versions.exists()):
            return table
        from pipeline.review.versions import version_rows

        rows = version_rows(self.paths.root).select(table.column_names)
        if self.versions == "all":
            return pa.concat_tables([table, rows]).sort_by(
                [("item_id", "ascending"), ("object_id", "ascending"), ("version", "ascending")])
        return _latest_not_rejected(table, rows, self.paths.root)

    @cached_property
    def frames(self) -> pa.Table:
        return self._whole("frames")

    def item_ids(self, status: str = "done") -> list[str]:
        return self.items.filter(pc.equal(self.items["status"], status))["item_id"].to_pylist()

    def masks(self, item_id: str) -> zarr.Array:
        """bool (objects, frames, H, W), read lazily chunk by chunk (`[o, t]` reads one masklet-frame)."""
        try:
            row = self.item_rows("items", item_id).select(["status"]).to_pylist()
        except KeyError:
            row = []
        if not row or row[0]["status"] != "done":
            raise KeyError(f"item {item_id!r} has no committed masks in {self.paths.root} (see `masklet status`)")
        return open_masks(self.paths, item_id)

    def masklet_masks(self, item_id: str, object_id: int, version: int | None = None):
        """One masklet's masks, bool (frames, H, W): `version` None: its newest version; 0: the run's own
        (the plane `masks(item_id)[object_id]`)."""
        from pipeline.review.versions import masklet_mask

        self.masks(item_id)  # refuses an item that is not committed, naming it
        return masklet_mask(self.paths.root, item_id, object_id, version)

    def masks_dask(self, item_id: str):
        import dask.array as da

        return da.from_zarr(self.masks(item_id))


def _latest_not_rejected(table: pa.Table, versions: pa.Table, root: Path) -> pa.Table:
    """The run's rows with each reviewed masklet's newest version in place of its row, less the masklets a
    decision rejects (reject, duplicate)."""
    from pipeline.review.store import decisions

    if versions.num_rows:
        ids = versions.column("masklet_id").to_pylist()
        newest = {m: i for i, m in enumerate(ids)}  # sorted by version: the last is the newest
        versions = versions.take(pa.array(sorted(newest.values()), pa.int64()))
        table = table.filter(pc.invert(pc.is_in(table["masklet_id"], value_set=versions["masklet_id"])))
        table = pa.concat_tables([table, versions])
    d = decisions(root)
    rejected = d.filter(pc.is_in(d["decision"], value_set=pa.array(["reject", "duplicate"])))["masklet_id"]
    if len(rejected):
        table = table.filter(pc.invert(pc.is_in(table["masklet_id"], value_set=rejected)))
    return table.sort_by([("item_id", "ascending"), ("object_id", "ascending")])


def open_run(out: str | Path, versions: str = "latest") -> RunResults:
    """`versions`: which masklet rows `.masklets` gives once a review exists: "latest" (each masklet's newest
    version, rejected ones left out), "original" (the run's own rows) or "all" (every version)."""
    return RunResults(load_run(out), versions)
