"""Finding media under folders, globs and files (`discover`): which files are items, and each item's root."""
from __future__ import annotations

import glob
import os
import re
import warnings
from collections.abc import Sequence

from pipeline.manifest.layouts import is_annotation_folder, sequence_root
from pipeline.manifest.table import ManifestWarning
from pipeline.records import MediaKind
from pipeline.stages.decode import display_path, media_kind_of_name

_GLOB_MAGIC = re.compile(r"[*?[]")


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
    - Dataset layouts (pipeline/manifest/layouts.py): a DAVIS or SA-V ground-truth folder (`Annotations`,
      `Annotations_6fps` beside `JPEGImages`, `JPEGImages_24fps`) is not media and is skipped; a frame folder
      of such a layout is rooted at its parent, so its id is the sequence name.
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
    # A frame folder given (or matched) itself is rooted at its parent, so that its id is its name; so is a
    # dataset layout's frame folder (its id is the sequence name, as its ground truth's folder is named).
    rooted = []
    for p, r, k in items:
        if p == r:
            r = os.path.dirname(p)
        elif k == "frames":
            r = sequence_root(p) or r
        rooted.append((p, r, k))
    return rooted


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
                if not is_annotation_folder(entry.path):  # ground truth beside its media: not media
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
