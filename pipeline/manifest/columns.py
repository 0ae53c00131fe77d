"""Manifest tables <-> items by Arrow columns, for manifests of a million rows.

`read_manifest` turns each row into a dict and checks it in Python (about 24 s for a million rows on a
loaded 2-core machine): right for hand-written lists, which need ids derived, kinds inferred and files
probed. A manifest as `build_manifest` writes it needs none of that; `complete_items` checks such a table
with Arrow compute kernels (ids safe and unique, paths absolute and normal, kinds known, probe columns
filled) and builds the items column by column. Anything it cannot vouch for returns None, and the row-wise
reader handles the table, with its precise per-row messages.

`items_of_table` is the trusted half: the run folder's own frozen copy (written by `items_to_table`), read
back a shard at a time by pipeline/plan.py.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest.ids import MAX_ID_LENGTH
from pipeline.manifest.table import MEDIA_KINDS, PROBE_COLUMNS
from pipeline.records import MediaItem

_SAFE_ID = rf"^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}$"
# What os.path.normpath(os.path.abspath(p)) would change: no leading '/', '//', '/./', '/../', a trailing
# '/', '/.' or '/..'. Such rows go through the row-wise reader, which normalises them.
_NOT_NORMAL = r"(^[^/])|(//)|(/\./)|(/\.\./)|(.+/$)|(/\.$)|(/\.\.$)"
_INTEGER_COLUMNS = ("num_frames", "width", "height", "bytes")


def _text(values: list) -> list:
    """The row-wise reader's rule for optional text: blank is None."""
    return [None if v is None or not v.strip() else v for v in values]


def items_of_table(table: pa.Table) -> list[MediaItem]:
    """Items from a manifest table that is already known to be complete (a run's frozen copy)."""
    n = table.num_rows
    paths = table.column("path").to_pylist()
    if "path_bytes" in table.column_names and table.column("path_bytes").null_count < n:
        for i, raw in enumerate(table.column("path_bytes").to_pylist()):
            if raw is not None:  # the exact name where the text column could only show it
                paths[i] = os.fsdecode(raw)
    fps = table.column("fps").to_pylist() if "fps" in table.column_names else [None] * n
    codec = table.column("codec").to_pylist() if "codec" in table.column_names else [None] * n
    error = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    # Optional: manifests written before ground truth was recorded have no such columns.
    gt_path = _text(table.column("gt_path").to_pylist()) if "gt_path" in table.column_names else [None] * n
    gt_layout = _text(table.column("gt_layout").to_pylist()) if "gt_layout" in table.column_names else [None] * n
    cols = zip(table.column("item_id").to_pylist(), paths, table.column("kind").to_pylist(),
               table.column("num_frames").to_pylist(), fps, table.column("width").to_pylist(),
               table.column("height").to_pylist(), _text(codec), table.column("bytes").to_pylist(), _text(error),
               gt_path, gt_layout)
    return [MediaItem(*row) for row in cols]


def _all(mask: pa.ChunkedArray | pa.Array) -> bool:
    return mask.null_count == 0 and pc.all(mask).as_py() is not False


def complete_items(table: pa.Table) -> list[MediaItem] | None:
    """The items of a complete manifest table, or None when any row needs the row-wise reader (a missing
    id, kind or probe value; a relative or unnormalised path; an unsafe or repeated id; a repeated path)."""
    names = set(table.column_names)
    if table.num_rows == 0 or not {"item_id", "path", "kind", *PROBE_COLUMNS} <= names:
        return None
    for name in _INTEGER_COLUMNS:
        if not pa.types.is_integer(table.schema.field(name).type) or table.column(name).null_count:
            return None
    if "fps" in names and not (pa.types.is_floating(table.schema.field("fps").type)
                               or pa.types.is_null(table.schema.field("fps").type)):
        return None
    for name in ("item_id", "path", "kind", "codec", "error", "gt_path", "gt_layout"):
        if name in names and not pa.types.is_string(table.schema.field(name).type):
            return None
    ids, kinds, paths = table.column("item_id"), table.column("kind"), table.column("path")
    if not (_all(pc.match_substring_regex(ids, _SAFE_ID)) and _all(pc.is_in(kinds, pa.array(MEDIA_KINDS)))
            and _all(pc.invert(pc.match_substring_regex(paths, _NOT_NORMAL)))):
        return None
    items = items_of_table(table)
    if len({it.item_id.lower() for it in items}) != len(items) or len({it.path for it in items}) != len(items):
        return None  # repeats: the row-wise reader says which rows, or keeps the first of each path
    if any(it.path != os.path.normpath(it.path) for it in items if not it.path.isascii()):
        return None  # names from path_bytes are checked one by one (the regex saw their display form)
    return items
