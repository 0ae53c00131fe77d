"""Manifests of media: discovering items, stable item ids, probing, and reading and writing manifests.

A manifest is a table with one row per item (a video, a folder of frames, or an image); its rows become
`MediaItem`s. `build_manifest` scans folders and globs and writes Parquet; `update_manifest` does the same
from an earlier manifest, keeping its ids; `read_manifest` also accepts hand-written CSV or JSONL lists with
only a `path` column and probes what they lack. Probing runs in parallel with dask (threads: PyAV and PIL
release the GIL while they read). What counts as readable media (extensions, which files of a folder are
frames) is defined once, in stages/decode.py, and shared here.

Paths are kept as Python `str` everywhere; names that are not valid UTF-8 arrive with surrogate escapes
(os.fsdecode) and are stored losslessly in the Parquet column `path_bytes` (see `MANIFEST_SCHEMA`).

    discovery.py  which files and folders are items, and the root each id is relative to
    ids.py        item ids: derived from paths, unique in a manifest, never changed by an update
    probing.py    what one item holds (frames, size, codec), in parallel
    readers.py    Parquet, CSV and JSONL manifests to items
    table.py      the Parquet schema, the atomic write, the fingerprint
    build.py      build_manifest, update_manifest
"""
from pipeline.manifest.build import ManifestUpdate, RemovedItem, build_manifest, update_manifest
from pipeline.manifest.discovery import discover
from pipeline.manifest.ids import MAX_ID_LENGTH, assign_item_ids, assign_new_ids, item_id_for
from pipeline.manifest.probing import probe, probe_many
from pipeline.manifest.readers import read_manifest
from pipeline.manifest.table import (
    MANIFEST_SCHEMA,
    MEDIA_KINDS,
    ManifestWarning,
    items_to_table,
    manifest_fingerprint,
    write_table_atomic,
)

__all__ = [
    "MANIFEST_SCHEMA", "MAX_ID_LENGTH", "MEDIA_KINDS", "ManifestUpdate", "ManifestWarning", "RemovedItem",
    "assign_item_ids", "assign_new_ids", "build_manifest", "discover", "item_id_for", "items_to_table",
    "manifest_fingerprint", "probe", "probe_many", "read_manifest", "update_manifest", "write_table_atomic",
]
