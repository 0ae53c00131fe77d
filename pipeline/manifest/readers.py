"""Reading manifests: Parquet (as built), or hand-written CSV or JSONL lists with only a `path` column;
missing ids are derived and missing probe columns probed."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest.columns import complete_items
from pipeline.manifest.ids import MAX_ID_LENGTH, assign_item_ids, safe_id
from pipeline.manifest.probing import probe_many
from pipeline.manifest.table import PROBE_COLUMNS, MEDIA_KINDS, drop_duplicate_paths
from pipeline.records import MediaItem, MediaKind
from pipeline.stages.decode import display_path, media_kind_of_name


def read_manifest(path: str | os.PathLike[str], workers: int | None = None) -> list[MediaItem]:
    """The items of a Parquet, CSV or JSONL manifest (by extension), in file order.

    Only `path` is required. Relative paths are relative to the manifest's folder. Rows without `item_id` get
    one from `assign_item_ids`, relative to the manifest's folder (relative paths) or to the common parent of
    the absolute paths. Rows without probe columns (num_frames, width, height, bytes) are probed in parallel.
    Without `kind`, a folder is 'frames', an image extension 'image', anything else 'video'.
    A path listed twice is kept once (the first) with a warning; a repeated item_id is an error.
    """
    manifest = os.path.abspath(os.fspath(path))
    shown = display_path(manifest)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {shown!r} does not exist; build one with build_manifest or check the path")
    ext = os.path.splitext(manifest)[1].lower()
    if ext in (".parquet", ".pq"):
        table = _read_parquet(manifest)
        items = complete_items(table)  # a built manifest: by columns, in seconds for a million rows
        if items is not None:
            return items
        columns, rows = _parquet_rows(table)
    elif ext == ".csv":
        columns, rows = _read_csv_rows(manifest)
    elif ext in (".jsonl", ".ndjson"):
        columns, rows = _read_jsonl_rows(manifest)
    else:
        raise ValueError(f"manifest {shown!r}: unknown format {ext!r}; use .parquet, .csv or .jsonl")
    if not columns and not rows:
        raise ValueError(
            f"manifest {shown!r} is empty; write a 'path' column with one media file or frame folder per row"
        )
    if "path" not in columns:
        raise ValueError(
            f"manifest {shown!r} has no 'path' column (found {sorted(columns)}); add a 'path' column with one "
            f"media file or frame folder per row"
        )
    if not rows:
        raise ValueError(f"manifest {shown!r} has a header but no rows; list at least one media path")
    return _rows_to_items(rows, manifest, workers)


def _read_parquet(manifest: str) -> pa.Table:
    try:
        return pq.read_table(manifest)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"manifest {display_path(manifest)!r} is not readable Parquet ({e}); rebuild it with build_manifest"
        ) from e


def _parquet_rows(table: pa.Table) -> tuple[list[str], list[dict[str, Any]]]:
    rows = table.to_pylist()
    for row in rows:
        raw = row.pop("path_bytes", None)
        if raw is not None:  # the exact name where the text column could only show it
            row["path"] = os.fsdecode(raw)
    return table.column_names, rows


def _read_csv_rows(manifest: str) -> tuple[list[str], list[dict[str, Any]]]:
    # surrogateescape keeps names that are not UTF-8 byte for byte; utf-8-sig drops a spreadsheet's BOM.
    with open(manifest, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            # Hand-written CSVs often have a space after each comma; names rarely start or end with one.
            rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None})
        columns = [name.strip() for name in reader.fieldnames or []]
    return columns, rows


def _read_jsonl_rows(manifest: str) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    with open(manifest, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"manifest {display_path(manifest)!r} line {line_no} is not JSON ({e}); fix or remove that line"
                ) from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"manifest {display_path(manifest)!r} line {line_no} is not an object; "
                    f"write one {{\"path\": ...}} per line"
                )
            rows.append(row)
    return sorted({key for row in rows for key in row}), rows


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _rows_to_items(rows: list[dict[str, Any]], manifest: str, workers: int | None) -> list[MediaItem]:
    shown = display_path(manifest)
    base = os.path.dirname(manifest)
    resolved: list[tuple[str, int, dict[str, Any]]] = []  # (absolute path, row number in the file, row)
    for line, row in enumerate(rows, start=1):
        raw = row.get("path")
        if _blank(raw):
            raise ValueError(f"manifest {shown!r} row {line} has an empty 'path'; fill it in or remove the row")
        raw = os.path.expanduser(str(raw))
        resolved.append((os.path.normpath(os.path.join(base, raw)), line, row))  # join keeps absolute paths
    resolved = drop_duplicate_paths(resolved, where=f"in manifest {shown!r}")

    # Derive missing ids the same way build_manifest does, from a root that keeps them short: the manifest's
    # folder for relative paths under it; the common parent of the rest (absolute paths, '../' paths).
    need_id = [i for i, (_, _, row) in enumerate(resolved) if _blank(row.get("item_id"))]

    def from_base(i: int) -> bool:
        given = os.path.expanduser(str(resolved[i][2]["path"]))
        return not os.path.isabs(given) and _is_under(resolved[i][0], base)

    # Over every row, not only those that need an id, so that an id never depends on which rows name theirs.
    others = [os.path.dirname(resolved[i][0]) for i in range(len(resolved)) if not from_base(i)]
    common = os.path.commonpath(others) if others else base
    derived = assign_item_ids([(resolved[i][0], base if from_base(i) else common) for i in need_id])
    ids = ["" if _blank(row.get("item_id")) else str(row.get("item_id")).strip() for _, _, row in resolved]
    for i, item_id in zip(need_id, derived):
        ids[i] = item_id

    first_row: dict[str, int] = {}
    for i, item_id in enumerate(ids):
        line = resolved[i][1]
        if not safe_id(item_id):
            raise ValueError(
                f"manifest {shown!r}: item_id {item_id!r} (row {line}) is not a safe file name; use only "
                f"letters, digits, '.', '_' and '-', not starting with '.', at most {MAX_ID_LENGTH} characters"
            )
        if item_id.lower() in first_row:
            raise ValueError(
                f"manifest {shown!r}: item_id {item_id!r} is used by rows {first_row[item_id.lower()]} and "
                f"{line}; make the ids unique (ids that differ only in case clash too), or drop the item_id "
                f"column to derive ids from the paths"
            )
        first_row[item_id.lower()] = line

    items: list[MediaItem] = []
    to_probe: list[int] = []
    for i, (abs_path, line, row) in enumerate(resolved):
        kind = _row_kind(row, abs_path, manifest, line)
        gt = None if _blank(row.get("gt_path")) else os.path.join(base, str(row["gt_path"]))
        item = MediaItem(item_id=ids[i], path=abs_path, kind=kind, gt_path=gt,
                         gt_layout=None if _blank(row.get("gt_layout")) else str(row["gt_layout"]))
        if any(_blank(row.get(c)) for c in PROBE_COLUMNS):
            to_probe.append(i)
        else:
            item = _row_probe_values(item, row, manifest, line)
        items.append(item)

    probed = probe_many([(items[i].path, items[i].kind) for i in to_probe], workers=workers)
    for i, result in zip(to_probe, probed):
        items[i] = replace(result, item_id=items[i].item_id, gt_path=items[i].gt_path, gt_layout=items[i].gt_layout)
    return items


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _row_kind(row: dict[str, Any], path: str, manifest: str, line: int) -> MediaKind:
    given = row.get("kind")
    if not _blank(given):
        kind = str(given).strip().lower()
        if kind not in MEDIA_KINDS:
            raise ValueError(
                f"manifest {display_path(manifest)!r} row {line}: kind {given!r} is not one of "
                f"{', '.join(MEDIA_KINDS)}; "
                f"fix it or drop the kind column to infer it"
            )
        return kind  # type: ignore[return-value]
    if os.path.isdir(path):
        return "frames"
    return media_kind_of_name(path) or "video"


def _row_probe_values(item: MediaItem, row: dict[str, Any], manifest: str, line: int) -> MediaItem:
    def number(column: str, cast: type) -> Any:
        value = row.get(column)
        if _blank(value):
            return None
        try:
            if cast is float:
                return float(value)
            # int("12") is exact for any size; int(float("12.0")) accepts what spreadsheets write.
            exact = isinstance(value, int) or str(value).strip().lstrip("-").isdigit()
            return int(value) if exact else int(float(value))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"manifest {display_path(manifest)!r} row {line}: {column} {value!r} is not a number; "
                f"fix it or leave it empty to probe the file"
            ) from e

    def text(column: str) -> str | None:
        value = row.get(column)
        return None if _blank(value) else str(value)

    return replace(
        item,
        num_frames=number("num_frames", int),
        fps=number("fps", float),
        width=number("width", int),
        height=number("height", int),
        codec=text("codec"),
        bytes=number("bytes", int),
        error=text("error"),
    )
