"""What a manifest is on disk: its Parquet schema, items to table, the atomic write, and its fingerprint."""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.records import MediaItem, MediaKind
from pipeline.stages.decode import display_path, utf8_text
from pipeline.store.atomic import publish

MEDIA_KINDS: tuple[MediaKind, ...] = ("video", "frames", "image")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        # A readable form of the path; for names that are not valid UTF-8 the undecodable bytes are shown
        # as \xNN and the exact name is in path_bytes (Arrow strings must be UTF-8).
        pa.field("path", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("num_frames", pa.int64(), nullable=False),
        pa.field("fps", pa.float64(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("codec", pa.string(), nullable=True),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
        # The exact file-system name (os.fsencode) where `path` could not hold it; null otherwise.
        pa.field("path_bytes", pa.binary(), nullable=True),
        # The item's ground truth when it sits in a DAVIS or SA-V layout (pipeline/manifest/layouts.py).
        pa.field("gt_path", pa.string(), nullable=True),
        pa.field("gt_layout", pa.string(), nullable=True),
    ]
)
PROBE_COLUMNS = ("num_frames", "width", "height", "bytes")


class ManifestWarning(UserWarning):
    """Something in the input was dropped or skipped; the manifest is still usable."""


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def drop_duplicate_paths(entries: Iterable[tuple], where: str) -> list:
    """`entries` (path first) without repeated paths, keeping the first of each, with a warning per repeat."""
    kept: list = []
    seen: set[str] = set()
    for entry in entries:
        key = os.path.normpath(os.path.abspath(entry[0]))
        if key in seen:
            warnings.warn(
                f"{display_path(key)!r} is listed more than once {where}; keeping the first",
                ManifestWarning,
                stacklevel=3,
            )
            continue
        seen.add(key)
        kept.append(entry)
    return kept


def items_to_table(items: Sequence[MediaItem]) -> pa.Table:
    """The manifest table for `items`, with the explicit `MANIFEST_SCHEMA` (built column by column: a million
    items take seconds, not the half minute of row-wise appends)."""
    columns: dict[str, list[Any]] = {
        "item_id": [it.item_id for it in items],
        "path": [it.path if it.path.isascii() else display_path(it.path) for it in items],
        "kind": [it.kind for it in items],
        "num_frames": [int(it.num_frames) for it in items],
        "fps": [it.fps for it in items],
        "width": [int(it.width) for it in items],
        "height": [int(it.height) for it in items],
        "codec": [utf8_text(it.codec) if it.codec is not None else None for it in items],
        "bytes": [int(it.bytes) for it in items],
        "error": [utf8_text(it.error) if it.error is not None else None for it in items],
        "path_bytes": [None if it.path.isascii() or _is_utf8(it.path) else os.fsencode(it.path) for it in items],
        "gt_path": [None if it.gt_path is None else display_path(it.gt_path) for it in items],
        "gt_layout": [it.gt_layout for it in items],
    }
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_table_atomic(table: pa.Table, out_path: str, row_group_size: int | None = None) -> None:
    """Write Parquet to a temporary name beside `out_path`, then rename: readers never see half a file."""
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        publish(Path(tmp), Path(out_path))  # fsynced before the rename: a node crash cannot leave half a file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def manifest_fingerprint(items: Sequence[MediaItem]) -> str:
    """sha256 over the items' id, path, frames, size and bytes; independent of row order.

    A changed file (size or frame count), a moved file or a renamed id changes it; reordering rows does not,
    since the same items make the same plan.
    """
    digest = hashlib.sha256()
    length = struct.Struct("<Q").pack
    chunk: list[bytes] = []
    for item in sorted(items, key=lambda it: it.item_id):
        i, p = item.item_id.encode("utf-8"), os.fsencode(item.path)
        n, w, h, b = (b"%d" % int(v) for v in (item.num_frames, item.width, item.height, item.bytes))
        # Length prefixes make the encoding unambiguous: no choice of separator can be forged by a name.
        chunk += (length(len(i)), i, length(len(p)), p, length(len(n)), n, length(len(w)), w,
                  length(len(h)), h, length(len(b)), b)
        if len(chunk) > 120_000:  # the same bytes as one update per field, hashed in fewer, larger calls
            digest.update(b"".join(chunk))
            chunk.clear()
    digest.update(b"".join(chunk))
    return digest.hexdigest()


def table_fingerprint(table: pa.Table) -> str:
    """`manifest_fingerprint` of the items of a manifest table (`MANIFEST_SCHEMA`), by Arrow kernels: the same
    bytes hashed (checked in tests/test_scale.py), a million rows in about a second instead of ten."""
    n = table.num_rows
    order = pc.sort_indices(table["item_id"])  # UTF-8 byte order is code point order, Python's str order
    rows = table.take(order)
    path = rows["path"].cast(pa.binary())
    if "path_bytes" in rows.column_names and rows["path_bytes"].null_count < n:
        path = pc.coalesce(rows["path_bytes"], path)  # the exact name (os.fsencode) where it differs
    fields = [rows["item_id"].cast(pa.binary()), path]
    fields += [rows[name].cast(pa.string()).cast(pa.binary()) for name in ("num_frames", "width", "height", "bytes")]
    parts = []
    for f in fields:
        lengths = np.asarray(pc.binary_length(f).to_numpy(zero_copy_only=False), dtype="<u8")
        prefix = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), n, [None, pa.py_buffer(lengths.tobytes())])
        parts += [prefix.cast(pa.binary()), f]
    joined = pc.binary_join_element_wise(*parts, b"").combine_chunks() if n else pa.array([], pa.binary())
    digest = hashlib.sha256()
    if n:
        offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:joined.offset + n + 1]
        digest.update(memoryview(joined.buffers()[2])[offsets[0]:offsets[-1]])
    return digest.hexdigest()
