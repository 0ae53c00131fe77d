"""Building manifests from folders and globs: `build_manifest` from scratch, `update_manifest` from an earlier
manifest, keeping every id it holds as the dataset grows."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest.discovery import discover
from pipeline.manifest.ids import assign_item_ids, assign_new_ids
from pipeline.manifest.layouts import ground_truth_of
from pipeline.manifest.probing import probe_many
from pipeline.manifest.readers import read_manifest
from pipeline.manifest.table import drop_duplicate_paths, items_to_table, write_table_atomic
from pipeline.records import MediaItem, MediaKind
from pipeline.stages.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, display_path

# Parquet schema metadata of an updated manifest: the items removed by updates ({id: path}, JSON), kept so
# that a file added later never takes an id that earlier runs' outputs use for another file; a file that
# comes back at the same path gets its old id back.
RETIRED_IDS_KEY = b"masklet.retired_ids"


@dataclass(frozen=True)
class RemovedItem:
    item_id: str
    path: str
    on_disk: bool  # still there, only not under the paths given to this update


@dataclass(frozen=True)
class ManifestUpdate:
    table: pa.Table  # what was written
    kept: int  # rows of the old manifest kept as they were (id and probe)
    added: list[str]  # ids of the new rows
    removed: list[RemovedItem]  # rows of the old manifest whose file this scan did not find


def _discover_all(paths: Sequence[str | os.PathLike[str]], out_path: str) -> list[tuple[str, str, MediaKind]]:
    if os.path.splitext(out_path)[1].lower() not in (".parquet", ".pq"):
        raise ValueError(f"manifest output {out_path!r} must end in .parquet; build_manifest writes Parquet")
    found = drop_duplicate_paths(discover(paths), where="among the inputs (they overlap)")
    if not found:
        raise ValueError(
            f"no media found under {[display_path(os.fsdecode(p)) for p in paths]}; expected videos "
            f"({', '.join(sorted(VIDEO_EXTENSIONS))}), images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"or folders of frames"
        )
    return found


def build_manifest(
    paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str], workers: int | None = None
) -> pa.Table:
    """Discover media under `paths`, give each item an id, probe them in parallel and write Parquet.

    Returns the table that was written (schema `MANIFEST_SCHEMA`). Items that fail to probe are rows with
    `error` set. A path reached twice (two inputs overlap) is kept once, the first time, with a warning.
    Ids depend on the whole set of files (see `assign_item_ids`); `update_manifest` keeps earlier ones.
    """
    out_path = os.fspath(out_path)
    found = _discover_all(paths, out_path)
    ids = assign_item_ids([(p, r) for p, r, _ in found])
    probed = probe_many([(p, k) for p, _, k in found], workers=workers)
    items = [with_ground_truth(replace(item, item_id=item_id)) for item, item_id in zip(probed, ids)]
    table = items_to_table(items)
    write_table_atomic(table, out_path)
    return table


def with_ground_truth(item: MediaItem) -> MediaItem:
    """The item with `gt_path`/`gt_layout` set when it is a frame folder of a DAVIS or SA-V layout (kept as is
    when already set, or when it is not such a folder)."""
    if item.gt_path is not None or item.kind != "frames":
        return item
    found = ground_truth_of(item.path)
    return replace(item, gt_path=found[0], gt_layout=found[1]) if found else item


def _path_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def retired_ids(manifest: str) -> dict[str, str]:
    """{id: path} of the items earlier updates of this (Parquet) manifest removed; empty for CSV/JSONL or a
    fresh build."""
    if os.path.splitext(manifest)[1].lower() not in (".parquet", ".pq"):
        return {}
    meta = pq.read_schema(manifest).metadata or {}
    return dict(json.loads(meta[RETIRED_IDS_KEY])) if RETIRED_IDS_KEY in meta else {}


def update_manifest(
    paths: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    old: str | os.PathLike[str],
    workers: int | None = None,
) -> ManifestUpdate:
    """Scan `paths` again and write a manifest in which every item of `old` that is still found keeps its row
    (its id and its probe: it is not probed again) and every new file gets a new id that no item of `old`, and
    no item an earlier update removed, has had (`assign_new_ids`); a file that an earlier update removed and
    that is back at the same path gets its old id. Rows whose file this scan does not find are left out (a
    manifest lists what can be read; a kept row would be a failed item in every run) and returned as
    `removed`; their ids stay reserved in the new file's metadata.

    Old rows come first in their old order, then the new ones in discovery order. `out_path` may be `old`.
    """
    out_path, old = os.fspath(out_path), os.fspath(old)
    before = read_manifest(old, workers=workers)
    reserved = retired_ids(old)
    found = _discover_all(paths, out_path)
    known = {_path_key(item.path) for item in before}
    seen: set[str] = set()
    new: list[tuple[str, str, MediaKind]] = []
    for entry in found:
        key = _path_key(entry[0])
        if key in known:
            seen.add(key)
        else:
            new.append(entry)
    kept = [item for item in before if _path_key(item.path) in seen]
    removed = [RemovedItem(item.item_id, item.path, os.path.lexists(item.path))
               for item in before if _path_key(item.path) not in seen]

    back = {_path_key(path): item_id for item_id, path in reserved.items()}
    returning = [back.get(_path_key(p)) for p, _, _ in new]
    fresh = [i for i, item_id in enumerate(returning) if item_id is None]
    taken = [item.item_id for item in before] + list(reserved)
    ids = [item_id or "" for item_id in returning]
    for i, item_id in zip(fresh, assign_new_ids([new[i][:2] for i in fresh], taken=taken)):
        ids[i] = item_id
    probed = probe_many([(p, k) for p, _, k in new], workers=workers)
    added: list[MediaItem] = [replace(item, item_id=item_id) for item, item_id in zip(probed, ids)]
    table = items_to_table([with_ground_truth(item) for item in kept + added])
    retired = {item_id: path for item_id, path in reserved.items() if item_id not in set(ids)}
    retired.update((r.item_id, r.path) for r in removed)
    if retired:
        table = table.replace_schema_metadata({RETIRED_IDS_KEY: json.dumps(retired, sort_keys=True).encode()})
    write_table_atomic(table, out_path)
    return ManifestUpdate(table, len(kept), ids, removed)
