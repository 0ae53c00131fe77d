"""Manifests of media: discovering items, stable item ids, probing, and reading and writing manifests.

A manifest is a table with one row per item (a video, a folder of frames, or an image); its rows become
`MediaItem`s. `build_manifest` scans folders and globs and writes Parquet; `read_manifest` also accepts
hand-written CSV or JSONL lists with only a `path` column and probes what they lack. Probing runs in
parallel with dask (threads: PyAV and PIL release the GIL while they read). What counts as readable media
(extensions, which files of a folder are frames) is defined once, in stages/decode.py, and shared here.

Paths are kept as Python `str` everywhere; names that are not valid UTF-8 arrive with surrogate escapes
(os.fsdecode) and are stored losslessly in the Parquet column `path_bytes` (see `MANIFEST_SCHEMA`).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import av
import dask.bag
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.records import MediaItem, MediaKind
from pipeline.stages.decode import (
    FRAME_CODECS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DecodeError,
    decode_video_frames,
    display_path,
    ffmpeg_reason,
    frame_files,
    media_kind_of_name,
    permission_message,
    sniff_media,
    unreachable_message,
    utf8_text,
)

MEDIA_KINDS: tuple[MediaKind, ...] = ("video", "frames", "image")

MAX_ID_LENGTH = 120
_HASH_CHARS = 8
# Between path components in an id. Two characters so that the common "a/b.mp4" vs "a_b.mp4" pair differs
# without a hash; any remaining collision is resolved by assign_item_ids.
_ID_SEPARATOR = "__"
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_GLOB_MAGIC = re.compile(r"[*?[]")

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
    ]
)
_PROBE_COLUMNS = ("num_frames", "width", "height", "bytes")


class ManifestWarning(UserWarning):
    """Something in the input was dropped or skipped; the manifest is still usable."""


# --------------------------------------------------------------------------------------------- text helpers


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short_hash(text: str) -> str:
    # os.fsencode gives the exact bytes of the name, so the hash is stable for names that are not UTF-8.
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:_HASH_CHARS]


# ------------------------------------------------------------------------------------------------ discovery


def discover(paths: Sequence[str | bytes | os.PathLike[str]]) -> list[tuple[str, str, MediaKind]]:
    """Find media under folders, globs and files: (absolute path, root it was found under, kind).

    Rules:
    - A file given directly (or matched by a glob) is its own item, rooted at its folder (or the glob's fixed
      prefix). Its kind comes from the extension; a file with an unknown extension is trusted to be a video,
      because the user named it, and probing records an error if it is not.
    - Folders are walked recursively. A folder that holds two or more images and no videos and no subfolders
      with media is a frame folder: the folder is one item (DAVIS and SA-V ship frames this way). Anything
      else is taken apart: each video and each image is its own item (so images next to videos are single
      images), and subfolders are walked. A folder with a single image yields that image as an image item: a
      one-frame clip is an image, and the image kind records that honestly.
    - Non-media files and hidden entries (names starting with '.', e.g. macOS '._x.jpg' resource forks that
      are not images) are ignored.
    - A folder of unrelated photos looks like a frame folder; list it with a glob ('photos/*.jpg') to get one
      image item per file.
    - Order: the inputs in the order given, each one's items sorted by path bytes; so the first input wins
      when the same file is reached twice (build_manifest drops the repeat).
    """
    found: list[tuple[str, str, MediaKind]] = []
    for given in paths:
        # bytes paths too: names that are not UTF-8 become surrogate escapes
        given = os.path.expanduser(os.fsdecode(given))
        items: list[tuple[str, str, MediaKind]] = []
        if os.path.lexists(given) or not _GLOB_MAGIC.search(given):
            items = _discover_one(os.path.abspath(given), None)
        else:
            prefix = _glob_prefix(given)
            matches = sorted(glob.glob(given, recursive=True), key=os.fsencode)
            if not matches:
                raise ValueError(
                    f"the pattern {display_path(given)!r} matched nothing; check the pattern and the folder"
                )
            for match in matches:
                items.extend(_discover_one(os.path.abspath(match), prefix))
        items.sort(key=lambda entry: os.fsencode(entry[0]))
        found.extend(items)
    return found


def _glob_prefix(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: ids of matches are relative to it."""
    parts = os.path.abspath(pattern).split(os.sep)
    fixed: list[str] = []
    for part in parts:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


def _discover_one(path: str, root: str | None) -> list[tuple[str, str, MediaKind]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"media path {display_path(path)!r} does not exist; check the path or the mount")
    if not os.path.isdir(path):
        kind = media_kind_of_name(path) or "video"
        return [(path, root or os.path.dirname(path), kind)]
    scan_root = root or path
    items = _scan_folder(path, scan_root, ancestors=frozenset({os.path.realpath(path)}))
    # A frame folder given (or matched) itself is rooted at its parent, so that its id is its name.
    return [(p, os.path.dirname(p) if p == r else r, k) for p, r, k in items]


def _scan_folder(folder: str, root: str, ancestors: frozenset[str]) -> list[tuple[str, str, MediaKind]]:
    videos: list[str] = []
    images: list[str] = []
    subfolders: list[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
    except OSError as e:
        warnings.warn(f"skipping folder {display_path(folder)!r}: cannot list it ({e})", ManifestWarning, stacklevel=3)
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.is_file():
                kind = media_kind_of_name(entry.name)
                if kind == "video":
                    videos.append(entry.path)
                elif kind == "image":
                    images.append(entry.path)
            elif kind_by_name := media_kind_of_name(entry.name):
                # A dangling link to media is data the user expects to be listed: say it is skipped.
                warnings.warn(
                    f"skipping {kind_by_name} {display_path(entry.path)!r}: a broken link or not a regular file",
                    ManifestWarning,
                    stacklevel=3,
                )
        except OSError as e:  # a broken link or a vanished entry
            warnings.warn(f"skipping {display_path(entry.path)!r}: {e}", ManifestWarning, stacklevel=3)

    nested: list[tuple[str, str, MediaKind]] = []
    for sub in subfolders:
        real = os.path.realpath(sub)
        if real in ancestors:  # a symlink loop back to a parent: walking it would never end
            warnings.warn(
                f"skipping {display_path(sub)!r}: it links back to a parent folder", ManifestWarning, stacklevel=3
            )
            continue
        nested.extend(_scan_folder(sub, root, ancestors | {real}))

    if len(images) >= 2 and not videos and not nested:
        return [(folder, root, "frames")]
    return [(p, root, "video") for p in videos] + [(p, root, "image") for p in images] + nested


# ---------------------------------------------------------------------------------------------------- ids


def item_id_for(path: str, root: str) -> str:
    """A stable id for `path` from its path relative to `root`, safe as one path component.

    Folders are joined with '__'; characters outside [A-Za-z0-9._-] become '_' (accents are dropped first,
    so 'é' becomes 'e'); leading dots become '_' (so never hidden, never '.' or '..'); ids longer than
    120 characters are cut and end in '-' plus 8 hex digits of a hash of the full relative path. The same
    path and root give the same id on every machine and rebuild. Uniqueness within a manifest is
    `assign_item_ids`' job.
    """
    rel = _relative_path(path, root)
    parts = [p for p in rel.split(os.sep) if p not in ("", ".")]
    text = _ID_SEPARATOR.join(_sanitise_component(p) for p in parts) or "_"
    text = re.sub(r"^\.+", lambda m: "_" * len(m.group(0)), text)
    if len(text) > MAX_ID_LENGTH:
        text = _with_hash(text, _short_hash(rel))
    return text


def _relative_path(path: str, root: str) -> str:
    path, root = os.path.abspath(path), os.path.abspath(root)
    rel = os.path.relpath(path, root)
    if rel == os.curdir:  # the item is its root (a frame folder given as the root): use its name
        rel = os.path.basename(path) or "_"
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ValueError(
            f"cannot name item {display_path(path)!r}: it is not under its root {display_path(root)!r}; "
            f"give a root that contains it"
        )
    return rel


def _sanitise_component(part: str) -> str:
    # NFKD splits 'é' into 'e' + a combining accent, which the ASCII filter then drops; what has no ASCII
    # form (CJK, undecodable bytes) becomes '_'.
    folded = unicodedata.normalize("NFKD", utf8_text(part))
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return _UNSAFE_ID_CHARS.sub("_", folded)


def _with_hash(base: str, digest: str) -> str:
    return base[: MAX_ID_LENGTH - len(digest) - 1] + "-" + digest


def _is_exact_id(path: str, root: str, item_id: str) -> bool:
    """Whether `item_id` is the relative name unchanged (no folders, nothing replaced or cut)."""
    return _relative_path(path, root) == item_id


def assign_item_ids(entries: Sequence[tuple[str, str]] | Sequence[tuple[str, str, Any]]) -> list[str]:
    """Ids for (path, root, ...) entries, unique within the list, in the same order; deterministic.

    Each entry starts from `item_id_for`. Ids that collide, compared case-insensitively (so outputs named by
    id cannot clash on macOS or Windows file systems), are resolved so that existing ids change as little as
    possible when a colliding file is added: if exactly one member of a colliding group is its plain file name
    unchanged, it keeps its id; the others get '-' plus a hash of their relative path, and where that is not
    enough (the same relative path under two roots), a hash of their absolute path.
    """
    paths = [os.path.abspath(e[0]) for e in entries]
    roots = [os.path.abspath(e[1]) for e in entries]
    ids = [item_id_for(p, r) for p, r in zip(paths, roots)]

    groups: dict[str, list[int]] = {}
    for i, item_id in enumerate(ids):
        groups.setdefault(item_id.lower(), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        exact = [i for i in members if _is_exact_id(paths[i], roots[i], ids[i])]
        keep = exact[0] if len(exact) == 1 else None
        for i in members:
            if i != keep:
                ids[i] = _with_hash(ids[i], _short_hash(_relative_path(paths[i], roots[i])))

    # Second round: the same relative path under two roots hashes the same; use the absolute path instead.
    groups = {}
    for i, item_id in enumerate(ids):
        groups.setdefault(item_id.lower(), []).append(i)
    for members in groups.values():
        if len(members) > 1:
            for i in members:
                ids[i] = _with_hash(item_id_for(paths[i], roots[i]), _short_hash(paths[i]))

    seen: dict[str, int] = {}
    for i, item_id in enumerate(ids):
        if item_id.lower() in seen:
            other = seen[item_id.lower()]
            raise ValueError(
                f"items {display_path(paths[other])!r} and {display_path(paths[i])!r} get the same id "
                f"{item_id!r}; a path is listed twice: remove the repeat"
            )
        seen[item_id.lower()] = i
    return ids


# -------------------------------------------------------------------------------------------------- probing


def probe(path: str, kind: MediaKind) -> MediaItem:
    """What one item holds: frames, fps, size (as displayed), codec, bytes. `item_id` is left empty.

    Never raises: any failure gives a MediaItem whose `error` names the path and the cause, so that one bad
    file is a failed row, not a failed manifest.
    """
    path = os.path.abspath(path)
    empty = MediaItem(item_id="", path=path, kind=kind)
    try:
        if kind == "video":
            return _probe_video(path, empty)
        if kind == "frames":
            return _probe_frames(path, empty)
        if kind == "image":
            return _probe_image(path, empty)
        return replace(empty, error=f"{display_path(path)}: unknown kind {kind!r}; use one of {', '.join(MEDIA_KINDS)}")
    except Exception as e:  # noqa: BLE001 -- a probe failure is data about the item, recorded in its row
        reason = f"{type(e).__name__}: {utf8_text(str(e))}"
        return replace(empty, error=f"{display_path(path)}: cannot probe {kind}: {reason}")


def _missing_or_empty(path: str, item: MediaItem, want_dir: bool) -> MediaItem | None:
    shown = display_path(path)
    unreachable = unreachable_message(path)
    if unreachable:
        return replace(item, error=unreachable)
    if not os.path.exists(path):
        return replace(item, error=f"{shown}: file not found")
    if want_dir and not os.path.isdir(path):
        return replace(item, error=f"{shown}: a frame folder must be a folder, found a file")
    if not want_dir and os.path.isdir(path):
        return replace(
            item, error=f"{shown}: is a folder; a {item.kind} must be a file (a folder of frames has kind 'frames')"
        )
    if not want_dir and os.path.getsize(path) == 0:
        return replace(
            item,
            error=f"{shown}: empty file (0 bytes): the copy, download or recording did not finish; copy it again "
            f"from the source or leave it out",
        )
    # Opening proves read permission; the mode bits alone would not (root and ACLs bypass them).
    try:
        if want_dir:
            frame_files(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        return replace(item, error=permission_message(path, is_dir=want_dir))
    return None


_NO_FRAMES = ("the video stream holds no frames (an empty recording or export): nothing to segment; export it "
              "again or leave it out")


def _probe_video(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=False)
    if failed:
        return failed
    size = os.path.getsize(path)
    shown = display_path(path)
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        cause = sniff_media(path)
        error = f"{shown}: not a readable video ({ffmpeg_reason(e)})" + (f": {cause}" if cause else "")
        return replace(item, bytes=size, error=error)
    with container:
        if not container.streams.video:
            # An mp4/mov muxer writes no track for a stream that never got a frame, so an empty recording
            # lands here too.
            error = (f"{shown}: has no video stream (audio only, or a recording that never got a frame): nothing "
                     f"to segment; leave it out")
            return replace(item, bytes=size, error=error)
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        codec = ctx.name if ctx is not None else None
        # The container's frame count (mp4/mov keep one); Matroska/WebM and some AVIs do not.
        num_frames = int(stream.frames or 0)

        # Decode the first frame: it proves the stream decodes, and it carries the display rotation that
        # phones write (the decoder attaches the container's display matrix to each frame).
        try:
            first = next(decode_video_frames(container, stream, shown), None)
        except DecodeError as e:
            reason = ffmpeg_reason(e.__cause__) if e.__cause__ is not None else str(e)
            error = (f"{shown}: cannot decode the first frame ({reason}): the file is damaged; copy it again from the "
                     f"source or re-encode it")
            return replace(item, bytes=size, codec=codec, fps=fps, error=error)
        if first is None:
            return replace(item, bytes=size, codec=codec, fps=fps, error=f"{shown}: {_NO_FRAMES}")
        width, height = first.width, first.height
        if round(first.rotation / 90) % 2:
            width, height = height, width

    if num_frames <= 0:
        num_frames = _count_packets(path)
    if num_frames <= 0:
        return replace(item, bytes=size, codec=codec, fps=fps, error=f"{shown}: {_NO_FRAMES}")
    return replace(item, num_frames=num_frames, fps=fps, width=width, height=height, codec=codec, bytes=size)


def _count_packets(path: str) -> int:
    """Frames in the first video stream, counted by demuxing (no decoding): one packet per frame."""
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            # The demuxer ends with an empty flush packet; it is not a frame.
            if packet.size > 0:
                count += 1
    return count


def _probe_frames(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=True)
    if failed:
        return failed
    files = frame_files(path)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        return replace(item, error=f"{display_path(path)}: the frame folder holds no frames ({extensions})")
    total = sum(os.path.getsize(f) for f in files)
    try:
        with Image.open(files[0]) as first:  # reads the header only
            width, height = first.size
    except PermissionError:
        return replace(item, error=permission_message(files[0], is_dir=False))
    except (OSError, SyntaxError, ValueError) as e:
        return replace(item, error=f"{display_path(path)}: cannot read its first frame {display_path(files[0])} ({e}); "
                                   f"the file is damaged or not an image: replace or remove it")
    codecs = sorted({FRAME_CODECS[os.path.splitext(f)[1].lower()] for f in files})
    return replace(item, num_frames=len(files), width=width, height=height, codec="+".join(codecs), bytes=total)


def _probe_image(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=False)
    if failed:
        return failed
    size = os.path.getsize(path)
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 MP): decoding them would take gigabytes.
        error = (f"{display_path(path)}: too large to decode safely ({e}); downscale it below "
                 f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels first")
        return replace(item, bytes=size, error=error)
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        error = (f"{display_path(path)}: cannot probe image: not a readable image ({e}): damaged, cut short or not "
                 f"an image; replace it")
        return replace(item, bytes=size, error=error)
    with img:
        width, height = img.size
        codec = (img.format or "").lower() or None
        # Phone photos store sideways pixels plus an EXIF orientation; decode turns them upright (see
        # stages/decode.py), so report the upright size. Orientations 5-8 swap width and height.
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return replace(item, num_frames=1, width=width, height=height, codec=codec, bytes=size)


def probe_many(entries: Sequence[tuple[str, MediaKind]], workers: int | None = None) -> list[MediaItem]:
    """`probe` over (path, kind) pairs in parallel (dask, threads), in the same order."""
    if not entries:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    if workers == 1 or len(entries) == 1:
        return [probe(p, k) for p, k in entries]
    bag = dask.bag.from_sequence(list(entries), npartitions=min(len(entries), workers * 4))
    return list(bag.map(lambda entry: probe(entry[0], entry[1])).compute(scheduler="threads", num_workers=workers))


# ----------------------------------------------------------------------------------------- building/writing


def build_manifest(
    paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str], workers: int | None = None
) -> pa.Table:
    """Discover media under `paths`, give each item an id, probe them in parallel and write Parquet.

    Returns the table that was written (schema `MANIFEST_SCHEMA`). Items that fail to probe are rows with
    `error` set. A path reached twice (two inputs overlap) is kept once, the first time, with a warning.
    """
    out_path = os.fspath(out_path)
    if os.path.splitext(out_path)[1].lower() not in (".parquet", ".pq"):
        raise ValueError(f"manifest output {out_path!r} must end in .parquet; build_manifest writes Parquet")
    found = _drop_duplicate_paths(discover(paths), where="among the inputs (they overlap)")
    if not found:
        raise ValueError(
            f"no media found under {[display_path(os.fsdecode(p)) for p in paths]}; expected videos "
            f"({', '.join(sorted(VIDEO_EXTENSIONS))}), images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"or folders of frames"
        )
    ids = assign_item_ids([(p, r) for p, r, _ in found])
    probed = probe_many([(p, k) for p, _, k in found], workers=workers)
    items = [replace(item, item_id=item_id) for item, item_id in zip(probed, ids)]
    table = items_to_table(items)
    write_table_atomic(table, out_path)
    return table


def _drop_duplicate_paths(entries: Iterable[tuple], where: str) -> list:
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
    """The manifest table for `items`, with the explicit `MANIFEST_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for item in items:
        columns["item_id"].append(item.item_id)
        columns["path"].append(display_path(item.path))
        columns["kind"].append(item.kind)
        columns["num_frames"].append(int(item.num_frames))
        columns["fps"].append(item.fps)
        columns["width"].append(int(item.width))
        columns["height"].append(int(item.height))
        columns["codec"].append(utf8_text(item.codec) if item.codec is not None else None)
        columns["bytes"].append(int(item.bytes))
        columns["error"].append(utf8_text(item.error) if item.error is not None else None)
        columns["path_bytes"].append(None if _is_utf8(item.path) else os.fsencode(item.path))
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_table_atomic(table: pa.Table, out_path: str) -> None:
    """Write Parquet to a temporary name beside `out_path`, then rename: readers never see half a file."""
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -------------------------------------------------------------------------------------------------- reading


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
        columns, rows = _read_parquet_rows(manifest)
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


def _read_parquet_rows(manifest: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        table = pq.read_table(manifest)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"manifest {display_path(manifest)!r} is not readable Parquet ({e}); rebuild it with build_manifest"
        ) from e
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
    resolved = _drop_duplicate_paths(resolved, where=f"in manifest {shown!r}")

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
        if not _safe_id(item_id):
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
        item = MediaItem(item_id=ids[i], path=abs_path, kind=kind)
        if any(_blank(row.get(c)) for c in _PROBE_COLUMNS):
            to_probe.append(i)
        else:
            item = _row_probe_values(item, row, manifest, line)
        items.append(item)

    probed = probe_many([(items[i].path, items[i].kind) for i in to_probe], workers=workers)
    for i, result in zip(to_probe, probed):
        items[i] = replace(result, item_id=items[i].item_id)
    return items


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _safe_id(item_id: str) -> bool:
    return (
        0 < len(item_id) <= MAX_ID_LENGTH
        and not item_id.startswith(".")
        and not _UNSAFE_ID_CHARS.search(item_id)
    )


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


def manifest_fingerprint(items: Sequence[MediaItem]) -> str:
    """sha256 over the items' id, path, frames, size and bytes; independent of row order.

    A changed file (size or frame count), a moved file or a renamed id changes it; reordering rows does not,
    since the same items make the same plan.
    """
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda it: it.item_id):
        fields = (
            item.item_id.encode("utf-8"),
            os.fsencode(item.path),
            str(int(item.num_frames)).encode(),
            str(int(item.width)).encode(),
            str(int(item.height)).encode(),
            str(int(item.bytes)).encode(),
        )
        for field in fields:
            # Length prefixes make the encoding unambiguous: no choice of separator can be forged by a name.
            digest.update(len(field).to_bytes(8, "little"))
            digest.update(field)
    return digest.hexdigest()
