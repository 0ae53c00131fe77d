"""Item ids: stable, file-name-safe names derived from paths, unique within a manifest (`assign_item_ids`),
and ids for files added to an existing manifest that never rename what it already holds (`assign_new_ids`)."""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any

from pipeline.stages.decode import display_path, utf8_text

MAX_ID_LENGTH = 120
_HASH_CHARS = 8
# Between path components in an id. Two characters so that the common "a/b.mp4" vs "a_b.mp4" pair differs
# without a hash; any remaining collision is resolved by assign_item_ids.
_ID_SEPARATOR = "__"
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def _short_hash(text: str) -> str:
    # os.fsencode gives the exact bytes of the name, so the hash is stable for names that are not UTF-8.
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:_HASH_CHARS]


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
    id cannot clash on macOS or Windows file systems), are resolved: if exactly one member of a colliding group
    is its plain file name unchanged, it keeps its id; the others get '-' plus a hash of their relative path,
    and where that is not enough (the same relative path under two roots), a hash of their absolute path.
    The ids are a function of the whole list, so a file added later can rename one already listed ('sub__x'
    added beside 'sub/x'; 'A.mp4' beside 'a.mp4'); `assign_new_ids` never does.
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


def assign_new_ids(entries: Sequence[tuple[str, str]] | Sequence[tuple[str, str, Any]],
                   taken: Collection[str]) -> list[str]:
    """Ids for (path, root, ...) entries added to a manifest whose ids are `taken`; those never change.

    The new entries get `assign_item_ids`' ids among themselves; one that equals a taken id, compared
    case-insensitively, gets '-' plus a hash of its relative path (or, if that is taken too, of its absolute
    path), so it is the newcomer that is renamed, never the item already listed.
    """
    paths = [os.path.abspath(e[0]) for e in entries]
    roots = [os.path.abspath(e[1]) for e in entries]
    ids = assign_item_ids(entries)
    reserved = {t.lower() for t in taken}
    for i, item_id in enumerate(ids):
        if item_id.lower() in reserved:
            base = item_id_for(paths[i], roots[i])
            choices = (_with_hash(base, _short_hash(_relative_path(paths[i], roots[i]))),
                       _with_hash(base, _short_hash(paths[i])))
            free = [c for c in choices if c.lower() not in reserved]
            if not free:
                raise ValueError(
                    f"cannot name new item {display_path(paths[i])!r}: {item_id!r} and its hashed forms are all "
                    f"taken in the manifest being updated; rename the file"
                )
            ids[i] = free[0]
        reserved.add(ids[i].lower())
    return ids


def safe_id(item_id: str) -> bool:
    return (
        0 < len(item_id) <= MAX_ID_LENGTH
        and not item_id.startswith(".")
        and not _UNSAFE_ID_CHARS.search(item_id)
    )
